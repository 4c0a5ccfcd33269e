"""Edge-protection benchmark (issue 15): what an allow list costs, and SYN floods.

    sudo .venv/bin/python bench/bench_edge.py [--rounds 3] [--seconds 5]

1. The cost of an allow list on dsr's fast path: one service with no list,
   then 10, 1,000 and 100,000 CIDRs (the client's address among them), taking
   turns for `--rounds` rounds; new TCP connections/s (wrk, `Connection:
   close`) and UDP packets/s (iperf3, 64-byte datagrams) as medians and as a
   ratio to the service without a list measured in the same rounds.
2. SYN floods: 200,000 SYNs at 20,000/s from 65,536 spoofed sources in
   198.19.0.0/16 (our own raw-socket generator) while a second client opens a
   new connection every 20 ms: dsr with the SYN protection (syn_timeout 2 s) and
   without it (syn_timeout = tcp_timeout), nat with syn_proxy on and off. The
   table shows the legitimate connections' success rate, the flow-table
   entries (dsr) or conntrack entries (nat) right after the flood, and the
   flood's achieved rate.

Everything runs in labs this run creates (198.18.0.0/15 inside namespaces).
The result goes into docs/benchmarks.md between the edge markers. Needs root,
iperf3, wrk and nginx (Debian packages).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from bench_dataplane import TUNING, start_backend_servers
from dataplane_workloads import BULK_PORT, HTTP_PORT, connection_rate, udp_pps
from docs_section import write_section

from passlb.dataplane.backend_setup import apply_backend_setup
from passlb.dataplane.base import Driver
from passlb.dataplane.nft.conntrack import NetlinkConntrack
from passlb.dataplane.nft.dsr import DsrDriver
from passlb.dataplane.nft.nat import NatDriver
from passlb.dataplane.nft.runner import NftRunner
from passlb.dataplane.nft.testing import desired, ports, service
from passlb.lab import Lab, LabSpec
from passlb.lab.flood_run import flood_with_clients
from passlb.model import Backend, ClientRules, IPNetwork, Mode, Protocol, Service

LIST_SIZES = (0, 10, 1_000, 100_000)
FLOOD_PACKETS, FLOOD_RATE = 200_000, 20_000
ECHO = 80


def allow_list(size: int, client: str) -> tuple[IPNetwork, ...]:
    """`size` CIDRs that cannot merge (every other /32 of 10.0.0.0/8), the client's last.

    Only the list's size matters here: no traffic goes to these addresses.
    """
    if size == 0:
        return ()
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    others = [ip_network(ipaddress.IPv4Address(base + 2 * i)) for i in range(size - 1)]
    return (*others, ip_network(client))


def fast_path_service(lab: Lab, size: int) -> Service:
    svc = service(
        "web",
        lab.vip4,
        [Backend(ip_address(lab.backends[0].ipv4))],
        protocol=Protocol.TCP_UDP,
        port_set=ports(HTTP_PORT, BULK_PORT),
        flow_table_size=1 << 20,
    )
    return replace(svc, clients=ClientRules(allow=allow_list(size, lab.clients[0].ipv4)))


ListResults = dict[int, dict[str, list[float]]]  # list size -> "conn"/"udp" -> one per round


def measure_allow_lists(rounds: int, seconds: float, workdir: Path) -> ListResults:
    results: ListResults = {n: {"conn": [], "udp": []} for n in LIST_SIZES}
    with Lab(LabSpec(backends=1, clients=1, backend_gateway="router", ipv6=False)) as lab:
        apply_backend_setup(lab.vip4, netns=lab.backends[0].ns)
        for ns in (lab.clients[0].ns, lab.lb.ns):
            for setting in TUNING:
                lab.run(ns, ["sysctl", "-q", "-w", setting])
        start_backend_servers(lab, workdir, lab.vip4)  # dsr: iperf3 answers UDP from the VIP
        driver = DsrDriver([lab.lb.interface], NftRunner(lab.lb.ns))
        try:
            for round_ in range(rounds):
                for size in LIST_SIZES:
                    driver.sync(desired(fast_path_service(lab, size)))
                    conn = connection_rate(lab, lab.vip4, seconds)
                    udp = udp_pps(lab, lab.vip4, seconds)
                    results[size]["conn"].append(conn.value)
                    results[size]["udp"].append(udp.value)
                    print(
                        f"round {round_ + 1} list {size:>6}: {conn.value:8.0f} conn/s"
                        f" ({conn.note}), {udp.value:6.1f} kpps ({udp.note})",
                        flush=True,
                    )
        finally:
            driver.close(cleanup=True)
    return results


def flood_run(
    lab: Lab, driver: Driver, svc: Service, occupancy: Callable[[], int]
) -> dict[str, Any]:
    driver.sync(desired(svc))
    run = flood_with_clients(lab, ECHO, occupancy, packets=FLOOD_PACKETS, rate=FLOOD_RATE)
    return {
        "ok": len(run.new) - len(run.failed),
        "total": len(run.new),
        "occupied": run.occupied,
        "flood_rate": run.flood.rate,
        "sent": run.flood.sent,
    }


def flood_service(lab: Lab, mode: Mode, **changes: Any) -> Service:
    svc = service(
        "web",
        lab.vip4,
        [Backend(ip_address(b.ipv4)) for b in lab.backends],
        port_set=ports(ECHO),
        flow_table_size=1 << 20,
    )
    return replace(svc, mode=mode, **changes)


def measure_floods() -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    spec = LabSpec(backends=2, clients=2, backend_gateway="router", ipv6=False)
    with Lab(spec) as lab:
        for b in lab.backends:
            apply_backend_setup(lab.vip4, netns=b.ns)
            lab.start_servers(b, tcp=[ECHO])
        for label, syn_timeout in (("dsr, syn_timeout 2s", 2.0), ("dsr, protection off", 300.0)):
            dsr = DsrDriver([lab.lb.interface], NftRunner(lab.lb.ns))
            svc = flood_service(lab, Mode.DSR)
            svc = replace(svc, conntrack=replace(svc.conntrack, syn_timeout=syn_timeout))
            try:
                result = flood_run(lab, dsr, svc, functools.partial(_dsr_entries, dsr))
            finally:
                dsr.close(cleanup=True)
            rows.append((label, result))
            print(label, result, flush=True)
    with Lab(replace(spec, backend_gateway="lb")) as lab:
        for b in lab.backends:
            lab.start_servers(b, tcp=[ECHO])
        for label, syn_proxy in (("nat, syn_proxy on", True), ("nat, syn_proxy off", False)):
            conntrack = NetlinkConntrack(lab.lb.ns)
            nat = NatDriver(NftRunner(lab.lb.ns), conntrack)
            svc = flood_service(lab, Mode.NAT, syn_proxy=syn_proxy)
            try:
                result = flood_run(lab, nat, svc, functools.partial(_tracked, conntrack))
            finally:
                nat.close(cleanup=True)
            rows.append((label, result))
            print(label, result, flush=True)
    return rows


def _dsr_entries(driver: DsrDriver) -> int:
    return driver.counters()["web"].total.active_flows


def _tracked(conntrack: NetlinkConntrack) -> int:
    return sum(conntrack.count(4).values())


def report(
    lists: ListResults,
    floods: list[tuple[str, dict[str, Any]]],
    rounds: int,
    seconds: float,
) -> str:
    lines = [
        "## Edge protection (issue 15)",
        "",
        f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"Linux {platform.release()}), load average at start {os.getloadavg()[0]:.1f}: the "
        "machine is shared with other work, so the ratios (same run, interleaved) matter "
        "more than the absolute numbers. `bench/bench_edge.py`.",
        "",
        f"### dsr fast path with an allow list ({rounds} interleaved rounds of"
        f" {seconds:.0f} s, medians)",
        "",
        "A ratio is the median over rounds of (this list / no list) measured back to back"
        " in the same round, with the lowest and highest round in brackets.",
        "",
        "| allow_clients | new TCP conn/s | ratio | UDP kpps (64 B) | ratio |",
        "|---|---|---|---|---|",
    ]
    for size in LIST_SIZES:
        conn = statistics.median(lists[size]["conn"])
        udp = statistics.median(lists[size]["udp"])
        name = "none" if size == 0 else f"{size:,} CIDRs"
        lines.append(
            f"| {name} | {conn:,.0f} | {_ratio(lists, size, 'conn')} | {udp:,.1f} | "
            f"{_ratio(lists, size, 'udp')} |"
        )
    if all(_spans_one(lists, size) for size in LIST_SIZES[1:]):
        lines += [
            "",
            "Every list's spread between rounds holds 1.00 for both workloads: at this load"
            " the run cannot tell an allow list's cost from the noise.",
        ]
    lines += [
        "",
        f"### SYN flood: {FLOOD_PACKETS:,} SYNs at up to {FLOOD_RATE:,}/s"
        " from 65,536 spoofed sources",
        "",
        "A second client opens a new connection every 20 ms during the flood (3 s timeout). "
        "Occupancy is read right after the flood: dsr flow-table entries (table size "
        "1,048,576), or the LB's conntrack entries (nf_conntrack_max 262,144).",
        "",
        "| run | legitimate connections ok | flow table / conntrack entries | flood rate |",
        "|---|---|---|---|",
    ]
    for label, r in floods:
        pct = 100.0 * r["ok"] / r["total"] if r["total"] else 0.0
        lines.append(
            f"| {label} | {r['ok']}/{r['total']} ({pct:.1f} %) | {r['occupied']:,} | "
            f"{r['flood_rate']:,.0f}/s |"
        )
    return "\n".join(lines) + "\n"


def _round_ratios(lists: ListResults, size: int, kind: str) -> list[float]:
    return [v / b for v, b in zip(lists[size][kind], lists[0][kind], strict=True)]


def _spans_one(lists: ListResults, size: int) -> bool:
    return all(
        min(ratios) <= 1.0 <= max(ratios)
        for ratios in (_round_ratios(lists, size, kind) for kind in ("conn", "udp"))
    )


def _ratio(lists: ListResults, size: int, kind: str) -> str:
    ratios = _round_ratios(lists, size, kind)
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="passlb-bench-edge-") as tmp:
        lists = measure_allow_lists(args.rounds, args.seconds, Path(tmp))
    floods = measure_floods()
    section = report(lists, floods, args.rounds, args.seconds)
    print(section)
    write_section("edge", section)


if __name__ == "__main__":
    main()
