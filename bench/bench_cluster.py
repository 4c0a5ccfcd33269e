"""Cluster benchmark: a fleet of three passlb nodes (dsr) behind a BIRD router.

    sudo .venv/bin/python bench/bench_cluster.py [--connections 200] [--seconds 5]

Two parts, each in its own cluster lab (passlb.lab.cluster), written to
docs/benchmarks.md between the cluster markers:

1. Resilience, without and with BFD: under `--connections` long-lived TCP
   connections streaming a message every 200 ms and one UDP flow, a node is
   lost (its frames black-holed at the switch, then passlb and BIRD
   SIGKILLed), added back, and drained. For each: broken connections, the
   longest wait of a message for its echo (how long the lost node's flows
   were without service), UDP datagrams lost, and for the loss the time from
   the death to the router dropping the next hop.
2. Throughput through 1, 2 and 3 nodes (the others drained, so the router
   spreads over the rest): iperf3 bulk with 8 streams to one backend, and new
   TCP connections per second (a Python client, one connection per request,
   four client processes). Per node: the CPU seconds of its passlb and BIRD
   processes. The forwarding itself runs in the kernel's softirq, which a
   namespace lab cannot attribute to a node: the machine's softirq CPU share
   is reported instead. Rounds of 1, 2 and 3 nodes are interleaved.

The machine is shared: the load average at start and end is in the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from docs_section import write_section

from passlb.lab import Lab, LabSpec
from passlb.lab.cluster import Cluster, start_router

PORT = 80
BULK_PORT = 5201
CONN_SCRIPT = """\
import sys, time
from passlb.lab.client import tcp_requests
end = time.monotonic() + float(sys.argv[3])
done = errors = 0
while time.monotonic() < end:
    replies = tcp_requests(sys.argv[1], int(sys.argv[2]), 20)
    done += len(replies)
    errors += sum(1 for r in replies if "error" in r)
print(done, errors)
"""


def services(lab: Lab, backends: str) -> str:
    return (
        f'[[services]]\nname = "web"\nvip = "{lab.vip4}"\nprotocol = "tcp+udp"\n'
        f"ports = [{PORT}, {BULK_PORT}]\n"
        'mode = "dsr"\n\n[services.health]\ntype = "tcp"\n'
        f'port = {PORT}\ninterval = "0.5s"\ntimeout = "0.3s"\n{backends}'
    )


def build(bfd: bool, backends: int) -> tuple[Lab, Cluster]:
    lab = Lab(LabSpec(lbs=3, bgp=True, backends=backends, ipv6=False)).build()
    listed = "".join(f'\n[[services.backends]]\naddress = "{b.ipv4}"\n' for b in lab.backends)
    cluster = Cluster(lab, services(lab, listed), bfd=bfd)
    for b in lab.backends:
        lab.start_servers(b, tcp=[PORT], udp=[PORT])
        lab.run(b.ns, [sys.executable, "-m", "passlb.cli", "backend-setup", "--vip", lab.vip4])
    start_router(lab, bfd=bfd)
    for node in lab.lbs:
        cluster.start_node(node)
    cluster.wait_for_next_hops(lab.vip4, 3)
    return lab, cluster


def resilience(bfd: bool, connections: int) -> dict[str, dict[str, Any]]:
    lab, cluster = build(bfd, backends=3)
    results: dict[str, dict[str, Any]] = {}
    try:
        victim = lab.lbs[2]
        # Loss.
        load = cluster.start_load(lab.vip4, PORT, connections)
        time.sleep(1.0)
        killed = cluster.kill_node(victim)
        dropped = cluster.wait_for_next_hops(lab.vip4, 2)
        time.sleep(1.0)
        tcp, udp = load.finish()
        results["loss"] = _summary(tcp, udp, router_drop=dropped - killed)
        # Added back.
        load = cluster.start_load(lab.vip4, PORT, connections)
        cluster.revive_node(victim)
        cluster.wait_for_next_hops(lab.vip4, 3)
        time.sleep(1.0)
        results["add"] = _summary(*load.finish())
        # Drain.
        load = cluster.start_load(lab.vip4, PORT, connections)
        drained = time.time()
        cluster.passlb(victim, "node", "drain", "--timeout", "60")
        moved = time.time() - drained
        cluster.passlb(victim, "node", "undrain")
        cluster.wait_for_next_hops(lab.vip4, 3)
        results["drain"] = _summary(*load.finish(), drain_reported=moved)
    finally:
        lab.teardown()
    return results


def _summary(tcp: dict[str, Any], udp: dict[str, Any] | None, **extra: float) -> dict[str, Any]:
    return {
        "opened": tcp["opened"],
        "broken": len(tcp["broken"]),
        "max_wait": tcp["max_wait"],
        "udp_lost": len(udp["lost"]) if udp else 0,
        "udp_sent": udp["sent"] if udp else 0,
        "udp_backends": len(udp["by_backend"]) if udp else 0,
        **extra,
    }


def _cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _softirq_share() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return values[6], sum(values)  # softirq, total


def throughput(rounds: int, seconds: float) -> dict[int, dict[str, list[float]]]:
    lab, cluster = build(False, backends=1)
    table: dict[int, dict[str, list[float]]] = {n: {} for n in (1, 2, 3)}
    backend = lab.backends[0]
    iperf = lab.spawn(backend.ns, ["iperf3", "-s", "-p", str(BULK_PORT)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        drained: set[str] = set()
        for _ in range(rounds):
            for serving in (1, 2, 3):
                wanted = {n.name for n in lab.lbs[serving:]}
                for node in lab.lbs:
                    if node.name in wanted and node.name not in drained:
                        cluster.passlb(node, "node", "drain", "--no-wait")
                    elif node.name not in wanted and node.name in drained:
                        cluster.passlb(node, "node", "undrain")
                drained = wanted
                cluster.wait_for_next_hops(lab.vip4, serving)
                _measure(lab, cluster, serving, seconds, table[serving])
    finally:
        iperf.kill()
        lab.teardown()
    return table


def _measure(
    lab: Lab, cluster: Cluster, serving: int, seconds: float, into: dict[str, list[float]]
) -> None:
    pids = {n.name: [cluster.daemons[n.name].pid, cluster.bird_pid(n)] for n in lab.lbs}
    cpu_before = {
        name: sum(_cpu_seconds(p) for p in ps if p is not None) for name, ps in pids.items()
    }
    soft0, total0 = _softirq_share()
    started = time.monotonic()
    bulk = lab.run(
        lab.clients[0].ns,
        ["iperf3", "-c", lab.vip4, "-p", str(BULK_PORT), "-P", "8", "-t", str(seconds), "-J"],
        timeout=seconds + 30,
    )
    report = json.loads(bulk.stdout)
    into.setdefault("bulk_gbit", []).append(report["end"]["sum_received"]["bits_per_second"] / 1e9)
    clients = [
        lab.spawn(
            lab.clients[0].ns,
            [sys.executable, "-c", CONN_SCRIPT, lab.vip4, str(PORT), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    done = errors = 0
    for proc in clients:
        out, _ = proc.communicate(timeout=seconds + 60)
        count, failed = (int(v) for v in out.split())
        done, errors = done + count, errors + failed
    into.setdefault("conn_per_s", []).append(done / seconds)
    into.setdefault("conn_errors", []).append(errors)
    elapsed = time.monotonic() - started
    soft1, total1 = _softirq_share()
    into.setdefault("softirq_pct", []).append(100 * (soft1 - soft0) / max(1, total1 - total0))
    for name, ps in pids.items():
        used = sum(_cpu_seconds(p) for p in ps if p is not None) - cpu_before[name]
        into.setdefault(f"cpu_{name}_pct", []).append(100 * used / elapsed)
    print(f"  {serving} node(s): { ({k: round(v[-1], 2) for k, v in into.items()}) }", flush=True)


def report(
    resilient: dict[bool, dict[str, dict[str, Any]]],
    table: dict[int, dict[str, list[float]]],
    connections: int,
    loads: tuple[str, str],
) -> str:
    lines = [
        "## Cluster",
        "",
        f"`bench/bench_cluster.py`, {datetime.date.today()}: three passlb nodes (dsr) behind a"
        " router running BIRD 2 (ECMP, L4 hash, BGP hold time 3 s), three backends, one client;"
        f" all on one {os.cpu_count()}-CPU machine shared with other work (load average"
        f" {loads[0]} at start, {loads[1]} at the end).",
        "",
        f"Resilience under {connections} long-lived TCP connections (a 64-byte message"
        " every 200 ms each, echoed) and one UDP flow (100 datagrams/s). Loss: the node's"
        " frames are black-holed at the switch (a node that hangs with its link up), then"
        " its passlb and BIRD are SIGKILLed. Longest wait: the longest any message waited"
        " for its echo, i.e. how long the lost node's flows were without service. UDP"
        " datagrams are lost only when the one UDP flow hashed onto the lost node. A drain"
        " is reported 2 s after the last packet (the quiet period).",
        "",
        "| event | BFD | connections | broken | longest wait | UDP lost / sent |"
        " router dropped the node after |",
        "|---|---|---|---|---|---|---|",
    ]
    for bfd, events in resilient.items():
        for event, r in events.items():
            drop = f"{r['router_drop']:.2f} s" if "router_drop" in r else "-"
            if "drain_reported" in r:
                drop = f"drain reported the traffic moved after {r['drain_reported']:.1f} s"
            lines.append(
                f"| {event} | {'yes' if bfd else 'no'} | {r['opened']} | **{r['broken']}** |"
                f" {r['max_wait']:.2f} s | {r['udp_lost']} / {r['udp_sent']} | {drop} |"
            )
    lines += [
        "",
        "Throughput through 1, 2 and 3 serving nodes (the others drained; medians of the"
        " interleaved rounds). Bulk: iperf3, 8 streams, one backend. Connections: four"
        " Python clients, a new connection per request to the Python echo backend (the"
        " client and the backend bound this number, not the nodes). CPU: the node's passlb"
        " and BIRD processes; the forwarding is softirq work in the kernel, shown for the"
        " whole machine.",
        "",
        "| serving nodes | bulk Gbit/s (range) | connections/s (range) | errors |"
        " node CPU (lb1 / lb2 / lb3 daemons) | machine softirq |",
        "|---|---|---|---|---|---|",
    ]
    for serving, values in table.items():
        med = {k: statistics.median(v) for k, v in values.items()}
        cpus = " / ".join(f"{med[f'cpu_lb{i}_pct']:.1f} %" for i in (1, 2, 3))
        bulk, conns = values["bulk_gbit"], values["conn_per_s"]
        lines.append(
            f"| {serving} | {med['bulk_gbit']:.2f} ({min(bulk):.2f}-{max(bulk):.2f}) |"
            f" {med['conn_per_s']:.0f} ({min(conns):.0f}-{max(conns):.0f}) |"
            f" {med['conn_errors']:.0f} | {cpus} | {med['softirq_pct']:.1f} % |"
        )
    lines += [
        "",
        "On two shared cores the aggregate cannot grow with the nodes: every node, the"
        " router, the client and the backend run on the same CPUs, so more nodes only"
        " spread the same softirq work. What the fleet buys here is resilience, not rate.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the docs")
    args = parser.parse_args()
    load_start = f"{os.getloadavg()[0]:.1f}"
    resilient = {}
    for bfd in (False, True):
        print(f"resilience, BFD {'on' if bfd else 'off'}", flush=True)
        resilient[bfd] = resilience(bfd, args.connections)
        print(json.dumps(resilient[bfd], indent=1), flush=True)
    print("throughput", flush=True)
    table = throughput(args.rounds, args.seconds)
    text = report(resilient, table, args.connections, (load_start, f"{os.getloadavg()[0]:.1f}"))
    print(text)
    if not args.no_write:
        write_section("cluster", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
