"""Data-plane benchmark: direct vs passlb (dsr, nat, proxy) vs HAProxy vs NGINX, in the lab.

    sudo .venv/bin/python bench/bench_dataplane.py [--targets direct,passlb-dsr,...] [--quick]

Every target gets its own lab (client -> router -> LB + one backend, all in
198.18.0.0/15 inside namespaces this run creates) and the same workloads
(`dataplane_workloads`), taking turns with the other targets (the idle ones
stopped) for three rounds; the table shows medians. Then the dsr driver's
`sync` is timed for 1, 100 and 1,000 services (`dataplane_control`). The
result goes into docs/benchmarks.md between the data-plane markers; a full
run takes about ten minutes. A target whose code or program is missing is
reported as not measured rather than failing the run. Needs root; installs
iperf3, wrk, HAProxy and the NGINX stream module from Debian when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataplane_control import SyncCost, sync_cost
from dataplane_memory import (
    BATCH,
    IdleMemory,
    idle_connection_memory,
    process_tree,
    tree_rss_kib,
)
from dataplane_report import (
    Cell,
    control_table,
    format_value,
    goal_lines,
    hop_table,
    idle_lines,
    results_table,
)
from dataplane_targets import (
    ALL_TARGETS,
    NGINX_STREAM_MODULE,
    Endpoint,
    Target,
    backend_http_config,
)
from dataplane_workloads import (
    BULK_PORT,
    HTTP_PORT,
    Measurement,
    connection_rate,
    latency,
    tcp_bulk,
    udp_pps,
    wait_until_serving,
)
from docs_section import write_section

from passlb.lab import Lab, LabError, LabSpec

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
# One backend, as `direct` has: spread over three NGINX processes that share
# the same 2 vCPUs, the load balancers lost about a tenth of their connection
# rate to wake-ups on the backend side, which is no cost of theirs.
BACKENDS = 1
CONTROL_BACKENDS = 3  # per service, in the control-plane cost
READY_TIMEOUT = 10.0
SETTLE = 2.0  # seconds after resuming a stopped load balancer, before measuring it
PAUSE = 0.5  # seconds between workloads, so one's leftovers (TIME_WAIT, queues) settle
CONTROL_SERVICES = (1, 100, 1000)
CONTROL_RING_SIZE = 4099
IDLE_CONNECTIONS = 10_000
IDLE_TARGET = "passlb-proxy"
IDLE_BUDGET = 120.0  # seconds to open, measure and close all the idle connections

# Client and LB make many short connections: widen the ephemeral ports and
# reuse TIME_WAIT ones, so the connection-rate test measures forwarding, not
# port exhaustion.
TUNING = ("net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1")

log = logging.getLogger("bench_dataplane")


@dataclass(frozen=True)
class Settings:
    seconds: float  # per throughput / rate workload
    round_trips: int  # per latency workload
    rounds: int  # each workload this many times per target; the table shows the median
    control_services: tuple[int, ...]
    idle_connections: int  # held open at once through passlb-proxy for its memory cost


@dataclass(frozen=True)
class Run:
    """How long the run took and how busy the machine was around it."""

    elapsed: float  # seconds
    load_before: tuple[float, float, float]  # 1, 5 and 15 min load averages at the start
    load_after: tuple[float, float, float]


@dataclass(frozen=True)
class Running:
    """A target started in its own lab, ready for the workloads."""

    target: Target
    lab: Lab
    endpoint: Endpoint


# A workload: the rows it fills, and how to measure them on a running target.
Workload = tuple[tuple[str, ...], Callable[[Running, Settings], tuple[Measurement, ...]]]


def _latencies(running: Running, settings: Settings, keep_alive: bool) -> tuple[Measurement, ...]:
    result = latency(
        running.lab, running.endpoint.address, settings.round_trips, keep_alive=keep_alive
    )
    return Measurement(result.p50_us, "µs"), Measurement(result.p99_us, "µs")


# Latency first, on a quiet system; the connection-rate test last, as it
# leaves the most state behind (TIME_WAIT sockets, conntrack entries).
WORKLOADS: tuple[Workload, ...] = (
    (("lat_new_p50", "lat_new_p99"), lambda r, s: _latencies(r, s, keep_alive=False)),
    (("lat_open_p50", "lat_open_p99"), lambda r, s: _latencies(r, s, keep_alive=True)),
    (("bulk1",), lambda r, s: (tcp_bulk(r.lab, r.endpoint.address, 1, s.seconds),)),
    (("bulk4",), lambda r, s: (tcp_bulk(r.lab, r.endpoint.address, 4, s.seconds),)),
    (("udp",), lambda r, s: (udp_pps(r.lab, r.endpoint.address, s.seconds),)),
    (("cps",), lambda r, s: (connection_rate(r.lab, r.endpoint.address, s.seconds),)),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0:
        print("bench_dataplane: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    names = [t.name for t in ALL_TARGETS]
    wanted = args.targets.split(",") if args.targets else names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"bench_dataplane: unknown targets {unknown}; known: {names}", file=sys.stderr)
        return 2
    targets = [t for t in ALL_TARGETS if t.name in wanted]
    settings = (
        Settings(
            seconds=2, round_trips=500, rounds=1, control_services=(1, 100), idle_connections=2000
        )
        if args.quick
        else Settings(
            seconds=4,
            round_trips=2000,
            rounds=3,
            control_services=CONTROL_SERVICES,
            idle_connections=IDLE_CONNECTIONS,
        )
    )
    install_missing_packages(targets)

    started = time.monotonic()
    load_before = os.getloadavg()
    not_measured: dict[str, str] = {}
    with contextlib.ExitStack() as labs:
        running = []
        for target in targets:
            why = target.unavailable()
            if why is None:
                try:
                    running.append(labs.enter_context(start_target(target)))
                    continue
                except Exception as exc:  # one broken target must not lose the others' numbers
                    log.error("%s: failed to start:\n%s", target.name, traceback.format_exc())
                    why = f"failed to start: {_first_line(exc)}"
            log.info("%s: not measured: %s", target.name, why)
            not_measured[target.name] = why
        results = measure(running, settings)
        idle = measure_idle_connections(running, settings.idle_connections)

    costs: list[SyncCost] = []
    if not args.no_control:
        costs = measure_control_plane(settings)

    section = render_section(
        results,
        not_measured,
        idle,
        costs,
        settings,
        Run(time.monotonic() - started, load_before, os.getloadavg()),
    )
    print(section)
    if not args.no_write:
        write_section("dataplane", section, args.docs)
        log.info("wrote %s", args.docs)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets",
        help="comma-separated subset of: " + ",".join(t.name for t in ALL_TARGETS),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round of 2 s workloads, 500 round trips, up to 100 services",
    )
    parser.add_argument("--no-control", action="store_true", help="skip the control-plane cost")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    parser.add_argument("--docs", type=Path, default=DOCS, help="Markdown file to update")
    return parser.parse_args(argv)


# -- targets and workloads --------------------------------------------------------


@contextlib.contextmanager
def start_target(target: Target) -> Iterator[Running]:
    """A lab for `target` with backends serving and the target started; the
    lab (and everything started in it) is torn down when the block ends."""
    spec = LabSpec(backends=BACKENDS, clients=1, backend_gateway=target.gateway, ipv6=False)
    with (
        Lab(spec) as lab,
        tempfile.TemporaryDirectory(prefix=f"passlb-bench-{target.name}-") as tmp,
    ):
        workdir = Path(tmp)
        for ns in (lab.clients[0].ns, lab.lb.ns):
            for setting in TUNING:
                lab.run(ns, ["sysctl", "-q", "-w", setting])
        target.prepare_backends(lab)
        start_backend_servers(lab, workdir, target.iperf_bind(lab))
        log.info("%s: starting", target.name)
        yield Running(target, lab, target.start(lab, workdir))


def measure(running: Sequence[Running], settings: Settings) -> dict[str, dict[str, Cell]]:
    """Every workload on every running target, `settings.rounds` times.

    The targets take turns round by round, so a drift of the machine (another
    tenant, thermal, page cache) spreads over all of them instead of landing
    on whichever target happened to run last. While one target is measured
    the other load balancers are stopped (SIGSTOP): on 2 vCPUs a daemon's
    periodic resync elsewhere would show up in this target's numbers. A cell
    is the median of its successful rounds, or the first failure when none
    succeeded.
    """
    samples: dict[str, dict[str, list[Measurement]]] = {r.target.name: {} for r in running}
    failures: dict[str, dict[str, str]] = {r.target.name: {} for r in running}
    for r in running:
        _signal_tree(r, signal.SIGSTOP)
    try:
        for round_number in range(1, settings.rounds + 1):
            for r in running:
                _signal_tree(r, signal.SIGCONT)
                # Let a resumed daemon catch up (its overdue resync) before timing.
                time.sleep(SETTLE)
                try:
                    _measure_round(r, settings, round_number, samples, failures)
                finally:
                    _signal_tree(r, signal.SIGSTOP)
    finally:
        for r in running:
            _signal_tree(r, signal.SIGCONT)
    results: dict[str, dict[str, Cell]] = {}
    for r in running:
        name = r.target.name
        cells: dict[str, Cell] = dict(failures[name])
        for key, measured in samples[name].items():
            median = statistics.median(m.value for m in measured)
            cells[key] = Measurement(median, measured[0].unit)
        if r.endpoint.lb_pid is not None:
            cells["rss"] = Measurement(tree_rss_kib(r.endpoint.lb_pid) / 1024, "MiB")
        results[name] = cells
    return results


def _measure_round(
    r: Running,
    settings: Settings,
    round_number: int,
    samples: dict[str, dict[str, list[Measurement]]],
    failures: dict[str, dict[str, str]],
) -> None:
    name = r.target.name
    for keys, workload in WORKLOADS:
        if keys == ("udp",) and not r.target.supports_udp:
            failures[name]["udp"] = "no UDP"
            continue
        try:
            values = workload(r, settings)
        except Exception as exc:  # the cell says what went wrong; the others go on
            log.warning("%s %s round %d: %s", name, keys[0], round_number, exc)
            for key in keys:
                failures[name].setdefault(key, f"failed: {_first_line(exc)}")
            continue
        for key, value in zip(keys, values, strict=True):
            samples[name].setdefault(key, []).append(value)
            note = f" ({value.note})" if value.note else ""
            log.info("%s %s round %d: %s%s", name, key, round_number, format_value(value), note)
        time.sleep(PAUSE)


def _signal_tree(r: Running, sig: signal.Signals) -> None:
    """Send `sig` to the target's load balancer and its descendants (none for direct)."""
    if r.endpoint.lb_pid is None:
        return
    for pid in process_tree(r.endpoint.lb_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def start_backend_servers(lab: Lab, workdir: Path, iperf_bind: str | None) -> None:
    """NGINX (HTTP) on every backend; an iperf3 server on the first."""
    for backend in lab.backends:
        prefix = workdir / f"nginx-{backend.name}"
        prefix.mkdir()
        config = prefix / "nginx.conf"
        config.write_text(backend_http_config(prefix))
        with open(prefix / "stderr.log", "wb") as out:
            lab.spawn(
                backend.ns,
                ["nginx", "-p", str(prefix), "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    for backend in lab.backends:
        lab.call(
            backend.ns,
            wait_until_serving,
            "127.0.0.1",
            HTTP_PORT,
            READY_TIMEOUT,
            timeout=READY_TIMEOUT + 5,
        )
    argv = ["iperf3", "-s", "-p", str(BULK_PORT), "--forceflush"]
    if iperf_bind is not None:
        argv += ["-B", iperf_bind]
    with open(workdir / "iperf3-server.log", "wb") as errors:
        iperf = lab.spawn(lab.backends[0].ns, argv, stdout=subprocess.PIPE, stderr=errors)
    _wait_for_output(iperf, b"Server listening", READY_TIMEOUT)


def _wait_for_output(process: subprocess.Popen[bytes], text: bytes, timeout: float) -> None:
    """Return once the process printed `text` on stdout; LabError after `timeout`.

    Reads the pipe's file descriptor directly: a buffered reader could hold
    the line already while select() sees nothing more to read.
    """
    assert process.stdout is not None
    fd, seen = process.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            chunk = os.read(fd, 4096)
            seen += chunk
            if text in seen:
                return
            if not chunk:
                break
    raise LabError(
        f"{process.args!r} did not print {text!r} (exit status {process.poll()}): {seen!r}"
    )


def measure_idle_connections(running: Sequence[Running], count: int) -> IdleMemory | str | None:
    """Issue 7: what `count` idle connections cost the proxy's memory. The
    measurement, or why there is none (None: the proxy was not benchmarked)."""
    proxy = next((r for r in running if r.target.name == IDLE_TARGET), None)
    if proxy is None or proxy.endpoint.lb_pid is None:
        return None
    log.info("%s: %d idle connections", IDLE_TARGET, count)
    try:
        idle = proxy.lab.call(
            proxy.lab.clients[0].ns,
            idle_connection_memory,
            proxy.endpoint.address,
            HTTP_PORT,
            count,
            proxy.endpoint.lb_pid,
            IDLE_BUDGET,
            timeout=IDLE_BUDGET + 30,
        )
    except Exception as exc:  # reported in the section; the other numbers stand
        log.warning("%s idle connections: %s", IDLE_TARGET, exc)
        return f"failed: {_first_line(exc)}"
    log.info(
        "%s idle connections: RSS %d -> %d KiB (%.1f KiB each), %d KiB after closing",
        IDLE_TARGET,
        idle.rss_before_kib,
        idle.rss_open_kib,
        idle.per_connection_kib,
        idle.rss_closed_kib,
    )
    return idle


# -- control plane ----------------------------------------------------------------


def measure_control_plane(settings: Settings) -> list[SyncCost]:
    costs = []
    log.info("control plane: dsr driver sync")
    try:
        with Lab(LabSpec(backends=CONTROL_BACKENDS, clients=1, ipv6=False)) as lab:
            for services in settings.control_services:
                cost = sync_cost(lab, services, CONTROL_RING_SIZE)
                log.info(
                    "control plane, %d services: first sync %.3f s, ring change %.3f s",
                    services,
                    cost.first_sync,
                    cost.change_sync,
                )
                costs.append(cost)
    except Exception:  # the data-plane table is still worth writing
        log.error("control-plane cost failed:\n%s", traceback.format_exc())
    return costs


# -- the report -------------------------------------------------------------------


def render_section(
    results: dict[str, dict[str, Cell]],
    not_measured: dict[str, str],
    idle: IdleMemory | str | None,
    costs: list[SyncCost],
    settings: Settings,
    run: Run,
) -> str:
    today = datetime.date.today().isoformat()
    parts = [
        "## Data plane: direct vs passlb vs HAProxy vs NGINX",
        "",
        f"Run {today} with `python bench/bench_dataplane.py` ({run.elapsed:.0f} s, "
        f"median of {settings.rounds} round(s)) on "
        f"{machine_description()}. Load average (1/5/15 min): "
        f"{_load(run.load_before)} at the start, {_load(run.load_after)} at the end "
        "(other work on the machine shows up here).",
        "",
        results_table(results) if results else "No target could be measured.",
        "",
    ]
    hop = hop_table(results)
    if hop is not None:
        parts += [
            "What the extra namespace hop costs, and what passlb adds on top of it: "
            "`hop` is the DSR path (client → router → LB namespace → b1, replies "
            "b1 → router) with the LB namespace a plain IP router, no passlb and no nft; "
            "`routed` is the NAT path (replies b1 → LB namespace → router too), equally "
            "without passlb, nft or conntrack. "
            "Ratios of the medians (throughput: below 1 is slower; latency: above 1 is slower).",
            "",
            hop,
            "",
        ]
    goals = goal_lines(results)
    if goals:
        parts += ["Speed targets of issues 4, 5 and 7:", "", *goals, ""]
    if idle is not None:
        parts += [
            f"### {IDLE_TARGET}: memory per idle connection (issue 7)",
            "",
            idle_lines(idle, IDLE_TARGET),
            "",
        ]
    if not_measured:
        parts += ["Not measured:", ""]
        parts += [f"- `{name}`: {why}" for name, why in not_measured.items()]
        parts.append("")
    if costs:
        parts += [
            "### Control plane: dsr driver `sync`",
            "",
            f"Services on one VIP (a port each), {CONTROL_BACKENDS} backends each, "
            f"{CONTROL_RING_SIZE}-slot rings, real nft in a lab namespace, timed by the "
            "driver (render + diff + one transaction). The change in every service drains "
            "one backend in each (about a third of every ring moves); the change in one "
            "service brings it back in the first service only. Peak RSS: of the benchmark "
            "process, which runs the driver (as the daemon would), up to that line.",
            "",
            control_table([_cost_row(c) for c in costs]),
            "",
        ]
    parts += methodology(settings)
    return "\n".join(parts)


def _load(averages: tuple[float, float, float]) -> str:
    return " / ".join(f"{a:.2f}" for a in averages)


def _cost_row(cost: SyncCost) -> list[str]:
    def timed(seconds: float, elements: int) -> str:
        return f"{seconds * 1000:,.0f} ms ({elements:,} elements)"

    return [
        f"{cost.services:,}",
        f"{cost.services * cost.ring_size:,}",
        timed(cost.first_sync, cost.first_operations),
        timed(cost.change_sync, cost.change_operations),
        timed(cost.single_sync, cost.single_operations),
        f"{cost.peak_rss_mib:,.0f} MiB",
    ]


def methodology(settings: Settings) -> list[str]:
    s = f"{settings.seconds:g} s"
    return [
        "### How it was measured",
        "",
        f"- Each target has its own lab: client → router → LB + one backend (b1), "
        "veth pairs on two bridges, all in network namespaces on this one machine; the "
        "bridges run no firewall (bridge-nf-call-* = 0: this host loads br_netfilter, "
        "which otherwise runs the iptables hooks on every bridged frame). "
        "`direct` is client → router → backend b1's own address (no LB hop): the limit here. "
        "`hop` is the same address routed through the LB namespace: the router sends b1's "
        "/32 to the LB, which forwards it as a plain IP router (ip_forward=1, no nft; the "
        "target checks that the LB's forwarded-packet counter moves), and b1 answers the "
        "router directly, as in DSR. It is the DSR path without passlb; but passlb-dsr "
        "forwards at netdev ingress (`fwd`), before the IP stack, while `hop` goes "
        "through IP routing, so the wire path is the same and the kernel code is not. "
        "`routed` is `hop` with b1's gateway the LB, so the replies cross it too: the "
        "NAT path without passlb. "
        "All labs stay up during the run; the targets take turns, one round of every "
        f"workload each, {settings.rounds} round(s); a cell is the median of its rounds. "
        "The load balancers not being measured are stopped (SIGSTOP) meanwhile.",
        "- Pools: both services, `bulk` (port 5201, TCP+UDP, iperf3) and `web` (port 8080, "
        "NGINX with 1 worker returning a 3-byte body), have the one backend b1, which is "
        "what `direct`, `hop` and `routed` reach too, so every target asks the same of the "
        "backend. (Until 2026-11-28 `web` had 3 backends: on these 2 vCPUs three NGINX "
        "processes cost the load balancers about a tenth of their connection rate in "
        "wake-ups, which `direct`, hitting one NGINX, did not pay: passlb-dsr / hop was "
        "0.76 with three, 0.84-0.92 with one, in runs of the same hour.)",
        f"- TCP bulk: iperf3 for {s}, receiver goodput. UDP: iperf3 `-u -l 64 -b 0` "
        f"for {s}, datagrams the backend received per second (the sender runs flat out; "
        "loss is expected).",
        f"- Connections/s: wrk, 2 threads, 64 connections, `Connection: close`, {s}: "
        "every request is a new TCP connection through the LB.",
        f"- Latency: {settings.round_trips:,} sequential HTTP GETs with no other load, "
        'timed in Python around the socket calls; "new connection" includes connect and '
        'close, "open connection" reuses one keep-alive connection.',
        "- Memory: resident set of the LB's process and its children after the workloads "
        "(the passlb daemon, HAProxy, NGINX master + workers). Idle connections "
        f"(passlb-proxy): {settings.idle_connections:,} TCP connections opened from the "
        f"client in batches of {BATCH}, each batch once the proxy holds its sockets, held "
        "idle while the RSS is read, then closed; after all the other workloads, so the "
        "daemon's heap has already grown to its working size.",
        '- passlb runs `passlb run` with health checks off (`type = "none"`); HAProxy '
        "(mode tcp, roundrobin) and NGINX stream (`worker_processes auto`) run with "
        "their defaults otherwise. Ratios in parentheses are to `direct` (for latency, "
        "higher is worse).",
        "",
        "Caveats: 2 vCPUs shared by the client, the router, the LB and the backends, so "
        "every workload competes with its own load generator and the LB's CPU use shows "
        'up as lost throughput elsewhere. The "wire" is veth in memory, not a NIC: no '
        "offload, no interrupts spread over queues. Rounds of one cell vary a lot on this "
        "shared VM: differences "
        "between targets smaller than the spread of their rounds (often ±20 %, p99s far more) "
        "are noise; p99 latencies in particular catch scheduler hiccups of the VM.",
    ]


def machine_description() -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if found:
            model = found.group(1).strip()
    tools = ", ".join(v for v in (_tool_version(argv) for argv in TOOL_VERSIONS) if v)
    return f"{os.cpu_count()} vCPUs ({model}), Linux {platform.release()}; {tools}"


TOOL_VERSIONS = (
    ["iperf3", "--version"],
    ["wrk", "--version"],
    ["haproxy", "-v"],
    ["nginx", "-v"],
)


def _tool_version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    output = (done.stdout + done.stderr).strip()
    found = re.search(r"\d+\.\d+(\.\d+)?", output)
    return f"{argv[0]} {found.group(0)}" if found else None


# -- packages ---------------------------------------------------------------------


def install_missing_packages(targets: Sequence[Target]) -> None:
    """apt-get install what the chosen targets need and is missing (as root only)."""
    names = {t.name for t in targets}
    wanted: list[str] = []
    if shutil.which("iperf3") is None:
        wanted.append("iperf3")
    if shutil.which("wrk") is None:
        wanted.append("wrk")
    if shutil.which("nginx") is None:
        wanted.append("nginx-full")  # backends serve HTTP with it; includes the stream module
    elif "nginx" in names and not NGINX_STREAM_MODULE.exists():
        wanted.append("libnginx-mod-stream")
    if "haproxy" in names and shutil.which("haproxy") is None:
        wanted.append("haproxy")
    if not wanted or shutil.which("apt-get") is None:
        return
    log.info("installing Debian packages: %s", " ".join(wanted))
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *wanted]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.warning(
                "apt-get install failed; the targets needing it are skipped:\n%s", done.stderr
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


if __name__ == "__main__":
    sys.exit(main())
