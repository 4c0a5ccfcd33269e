"""The cluster lab: several passlb nodes behind a router that runs BIRD 2.

    clients ── front ── router (BIRD, ECMP, L4 hash) ── back ── lb1..lbN, backends

    with Lab(LabSpec(lbs=3, bgp=True, backends=3)) as lab:
        start_router(lab)                              # BIRD in the router namespace
        text = node_config(lab, lab.lbs[0], services)  # passlb.toml with [bgp] for one node
        next_hops(lab, lab.vip4)                       # the router's ECMP next hops

The router imports every node's VIP routes and installs them in its kernel
table with ``merge paths on``: one route with a next hop per node. It
announces nothing back. Its timers are short (hold time 3 s, reconnect after
1 s) so the lab shows what a node's death costs, bounded by the hold time or
by BFD.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from passlb.lab.lab import Lab
from passlb.lab.topology import LabError, Node

ROUTER_ASN = 64513
NODE_ASN = 64512
HOLD_TIME = 3  # seconds: the least BGP allows


def router_config(lab: Lab, *, bfd: bool = False, hold_time: int = HOLD_TIME) -> str:
    """BIRD config of the router: a session per node and family, ECMP into the kernel."""
    router = lab.router
    lines = [
        f"router id {router.back_ipv4};",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "protocol device {}",
        "protocol kernel kernel4 { ipv4 { import none; export all; }; merge paths on; }",
    ]
    if lab.spec.ipv6:
        lines.append(
            "protocol kernel kernel6 { ipv6 { import none; export all; }; merge paths on; }"
        )
    if bfd:
        lines.append(
            'protocol bfd { interface "*" { min rx interval 100 ms; '
            "min tx interval 100 ms; multiplier 3; }; }"
        )
    for node in lab.lbs:
        peers = [(node.name, node.ipv4, 4)]
        if lab.spec.ipv6:
            peers.append((f"{node.name}_v6", node.ipv6, 6))
        for name, address, version in peers:
            lines.append(
                f"protocol bgp {name} {{\n"
                f"  local as {ROUTER_ASN};\n  neighbor {address} as {NODE_ASN};\n"
                f"  hold time {hold_time};\n  connect delay time 1;\n  connect retry time 1;\n"
                f"  error wait time 1, 5;\n"
                + ("  bfd on;\n" if bfd else "")
                + f"  ipv{version} {{ import all; export none; }};\n}}"
            )
    return "\n".join(lines) + "\n"


def start_router(lab: Lab, *, bfd: bool = False, hold_time: int = HOLD_TIME) -> Path:
    """Run BIRD in the router namespace (the lab's teardown stops it); its control socket."""
    directory = lab.state_dir / "router-bird"
    directory.mkdir(exist_ok=True)
    config = directory / "bird.conf"
    config.write_text(router_config(lab, bfd=bfd, hold_time=hold_time))
    socket = directory / "bird.ctl"
    log = open(directory / "bird.log", "w")  # noqa: SIM115 - bird writes it while it runs
    lab.spawn(
        lab.router.ns,
        ["bird", "-f", "-c", str(config), "-s", str(socket), "-P", str(directory / "bird.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return socket


def node_config(
    lab: Lab,
    node: Node,
    services: str,
    *,
    bfd: bool = False,
    hold_time: int = HOLD_TIME,
    api: str = "127.0.0.1:9180",
) -> str:
    """A passlb config for one node: its interface, its API, [bgp] toward the router,
    then `services` (TOML text, the same on every node)."""
    peers = [lab.router.back_ipv4] + ([lab.router.back_ipv6] if lab.spec.ipv6 else [])
    text = f'interfaces = ["{node.interface}"]\n\n[api]\nlisten = "{api}"\n\n'
    text += (
        f'[bgp]\nasn = {NODE_ASN}\nrouter_id = "{node.ipv4}"\n'
        f'run_dir = "{lab.state_dir / ("bgp-" + node.name)}"\n'
    )
    for address in peers:
        text += (
            f'\n[[bgp.peers]]\naddress = "{address}"\nasn = {ROUTER_ASN}\n'
            f'hold_time = "{hold_time}s"\nbfd = {str(bfd).lower()}\n'
        )
    return text + "\n" + services


def next_hops(lab: Lab, vip: str) -> list[str]:
    """The router's next hops for `vip` (empty: no route), from its kernel table."""
    family = "-6" if ":" in vip else "-4"
    done = lab.run(lab.router.ns, ["ip", "-j", family, "route", "show", vip])
    routes = json.loads(done.stdout or "[]")
    hops: list[str] = []
    for route in routes:
        if route.get("protocol") not in ("bird", "12"):
            continue
        if "gateway" in route:
            hops.append(route["gateway"])
        hops.extend(hop["gateway"] for hop in route.get("nexthops", []) if "gateway" in hop)
    return sorted(hops)


def lb(lab: Lab, name: str) -> Node:
    for node in lab.lbs:
        if node.name == name:
            return node
    raise LabError(f"no load balancer named {name!r}; the lab has {[n.name for n in lab.lbs]}")


STREAM_SCRIPT = """\
import json, sys
from passlb.lab.client import tcp_streams
result = tcp_streams(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                     interval=float(sys.argv[5]), stop_file=sys.argv[6],
                     on_open=lambda: print("ready", flush=True))
print(json.dumps(result), flush=True)
"""
UDP_SCRIPT = """\
import json, sys
from passlb.lab.client import udp_stream
print("ready", flush=True)
result = udp_stream(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                    interval=float(sys.argv[4]), stop_file=sys.argv[5])
print(json.dumps(result), flush=True)
"""
READY_TIMEOUT = 60.0


class Cluster:
    """A built cluster lab with a passlb daemon per node, as tests, the demo
    and the benchmark drive it: start, kill, revive and drain nodes, and run
    long-lived load from a client."""

    def __init__(self, lab: Lab, services: str, *, bfd: bool = False) -> None:
        self.lab = lab
        self.services = services
        self.bfd = bfd
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    def config_file(self, node: Node) -> Path:
        return self.lab.state_dir / f"{node.name}.toml"

    def log_file(self, node: Node) -> Path:
        return self.lab.state_dir / f"{node.name}.log"

    def start_node(self, node: Node) -> None:
        """Start passlb on `node` (it starts its own BIRD)."""
        self.config_file(node).write_text(node_config(self.lab, node, self.services, bfd=self.bfd))
        with open(self.log_file(node), "a") as log:
            self.daemons[node.name] = self.lab.spawn(
                node.ns,
                [sys.executable, "-m", "passlb.cli", "run", str(self.config_file(node))],
                stderr=log,
            )

    def bird_pid(self, node: Node) -> int | None:
        try:
            return int((self.lab.state_dir / f"bgp-{node.name}" / "bird.pid").read_text())
        except (OSError, ValueError):
            return None

    def kill_node(self, node: Node, *, blackhole: bool = True) -> float:
        """An abrupt death: the link goes down first (no BGP goodbye reaches the
        router), then passlb and its BIRD get SIGKILL.

        A switch forgets the MAC of a port whose link went down and floods the
        frames still sent to it to every port, where the other nodes' dsr
        rules forward them too: the dead node's flows go on, duplicated. With
        `blackhole` the switch keeps the dead node's MAC on its port (as for a
        machine that hangs with its link up), so its flows get no service
        until the router drops the next hop: the worst case, bounded by the
        BGP hold time or BFD. Returns the wall-clock time the node went dark."""
        if blackhole:
            self._switch_fdb("replace", node)
        self.lab.run(node.ns, ["ip", "link", "set", node.interface, "down"])
        dark = time.time()
        daemon = self.daemons.pop(node.name)
        daemon.kill()
        daemon.wait()
        pid = self.bird_pid(node)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return dark

    def revive_node(self, node: Node) -> None:
        """Link up (IPv6 addresses and routes left with it: put back), passlb started."""
        router = self.lab.router
        self._switch_fdb("del", node, check=False)
        commands = [
            ["ip", "link", "set", node.interface, "up"],
            ["ip", "route", "replace", "default", "via", router.back_ipv4],
        ]
        if self.lab.spec.ipv6:
            commands += [
                ["ip", "-6", "addr", "replace", f"{node.ipv6}/64", "dev", node.interface, "nodad"],
                ["ip", "-6", "route", "replace", "default", "via", router.back_ipv6],
            ]
        for argv in commands:
            self.lab.run(node.ns, argv)
        self.start_node(node)

    def _switch_fdb(self, verb: str, node: Node, check: bool = True) -> None:
        port = node.name  # the switch end of the node's link has the node's name
        argv = ["bridge", "fdb", verb, node.mac, "dev", port, "master", "static"]
        self.lab.run(self.lab.topology.switch_ns, argv, check=check)

    def status(self, node: Node) -> dict[str, Any]:
        return self.lab.call(node.ns, _status)

    def wait_for_status(
        self, node: Node, condition: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        """Until `node`'s status document meets `condition` (the BGP sessions in it
        are read from BIRD once a second); that document."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status(node)
            if condition(doc):
                return doc
            if time.monotonic() > deadline:
                raise LabError(f"{node.name}'s status did not reach the condition in {timeout:g} s")
            time.sleep(0.1)

    def passlb(
        self, node: Node, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The passlb command line, run on `node` (it talks to that node's daemon)."""
        return self.lab.run(
            node.ns, [sys.executable, "-m", "passlb.cli", *args], check=check, timeout=120
        )

    def wait_for_next_hops(self, vip: str, count: int, timeout: float = 60.0) -> float:
        """Until the router has `count` next hops for `vip`; the wall-clock time it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(next_hops(self.lab, vip)) == count:
                return time.time()
            time.sleep(0.05)
        raise LabError(
            f"the router has next hops {next_hops(self.lab, vip)} for {vip}, not {count},"
            f" after {timeout:g} s"
        )

    def start_load(self, vip: str, port: int, connections: int, udp: bool = True) -> Load:
        """Long-lived TCP connections (and one UDP flow) from the first client,
        streaming until `Load.finish`."""
        client = self.lab.clients[0]
        stop = self.lab.state_dir / f"stop-{time.monotonic_ns()}"
        args = [vip, str(port), str(connections), "110", "0.2", str(stop)]
        tcp = self.lab.spawn(
            client.ns,
            [sys.executable, "-c", STREAM_SCRIPT, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        streams = [tcp]
        if udp:
            streams.append(
                self.lab.spawn(
                    client.ns,
                    [sys.executable, "-c", UDP_SCRIPT, vip, str(port), "110", "0.01", str(stop)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in streams:
            _await_ready(proc)
        return Load(stop, tcp, streams[1] if udp else None)


class Load:
    """Streams running in a client namespace; `finish` stops them and reports."""

    def __init__(
        self,
        stop: Path,
        tcp: subprocess.Popen[str],
        udp: subprocess.Popen[str] | None,
    ) -> None:
        self.stop, self.tcp, self.udp = stop, tcp, udp

    def finish(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        self.stop.touch()
        tcp = _result(self.tcp)
        return tcp, None if self.udp is None else _result(self.udp)


def _await_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if selector.select(READY_TIMEOUT) and proc.stdout.readline().strip() == "ready":
            return
    proc.kill()
    raise LabError(f"a load generator did not start in {READY_TIMEOUT:g} s")


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0 or not out.strip():
        raise LabError(f"a load generator failed (exit status {proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _status() -> dict[str, Any]:
    from passlb.api.client import ApiClient

    return ApiClient("127.0.0.1:9180", timeout=10.0).get("/api/v1/status")
