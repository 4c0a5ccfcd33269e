"""The systems the data-plane benchmark compares, each a pluggable target.

A target says whether it can run here (`unavailable`), prepares the backends
(DSR needs the VIP on their lo), tells where the backends' iperf3 must bind,
and starts its load balancer in the lab's LB namespace. Every target serves
the same two pools, so the workloads are the same for all:

- `bulk`: VIP port 5201, TCP and UDP, ONE backend (b1) — iperf3's control and
  data connections must reach the same server;
- `web`: VIP port 8080, TCP, every backend (their NGINX HTTP servers).

`direct` has no load balancer: the client talks to b1's own address.
`hop` is `direct` routed through the LB namespace acting as a plain IP
router (no load-balancer software, no nft): the path of a DSR packet without
passlb, so `passlb-dsr / hop` is passlb's own cost. `routed` also sends b1's
replies back through the LB namespace: the path of a NAT packet without
passlb (`passlb-nat / routed`). Like `direct` they serve both pools from b1 alone.
Processes are started with `Lab.spawn`, so the lab's teardown kills them.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dataplane_workloads import BULK_PORT, HTTP_PORT, wait_until_serving

from passlb.lab import Lab, LabError
from passlb.lab.topology import Gateway, Node

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
START_TIMEOUT = 20.0  # seconds for a load balancer to serve its first connection
PROBE_SLICE = 1.0  # seconds between checks that the load balancer is still alive
API_LISTEN = "127.0.0.1:9180"  # the daemon's admin API, inside the LB namespace


@dataclass(frozen=True)
class Endpoint:
    """What a started target offers the workloads."""

    address: str  # where the client connects: the VIP, or b1's own address
    lb_pid: int | None  # the load balancer's main process (None: direct)


class Target(Protocol):
    name: str
    gateway: Gateway  # how backends route replies: via the router or via the LB
    supports_udp: bool

    def unavailable(self) -> str | None:
        """Why this target cannot run here, or None when it can."""
        ...

    def iperf_bind(self, lab: Lab) -> str | None:
        """The address the backends' iperf3 must bind (None: any)."""
        ...

    def prepare_backends(self, lab: Lab) -> None: ...

    def start(self, lab: Lab, workdir: Path) -> Endpoint:
        """Start the load balancer and return once it serves the `web` port."""
        ...


def _missing_module(*modules: str) -> str | None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"module {module} is not importable yet ({exc})"
    return None


def _missing_command(*commands: str) -> str | None:
    for command in commands:
        if shutil.which(command) is None:
            return f"command {command} is not installed"
    return None


def _wait_serving(lab: Lab, address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Return once the client reaches the `web` port; LabError with the load
    balancer's log when it exits or does not serve within START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            lab.call(
                lab.clients[0].ns,
                wait_until_serving,
                address,
                HTTP_PORT,
                PROBE_SLICE,
                timeout=PROBE_SLICE + 5,
            )
            return
        except TimeoutError as exc:
            status = process.poll()
            if status is None and time.monotonic() < deadline:
                continue  # still starting
            state = "still running" if status is None else f"exited with status {status}"
            raise LabError(f"{exc} (load balancer {state}):\n{log.read_text()[-2000:]}") from exc


def _spawn_logged(lab: Lab, ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return lab.spawn(ns, argv, stdout=out, stderr=subprocess.STDOUT)


class Direct:
    """No load balancer: the physical limit of this lab (client -> router -> b1)."""

    name = "direct"
    gateway: Gateway = "router"
    supports_udp = True

    def unavailable(self) -> str | None:
        return None

    def iperf_bind(self, lab: Lab) -> str | None:
        return None

    def prepare_backends(self, lab: Lab) -> None:
        pass

    def start(self, lab: Lab, workdir: Path) -> Endpoint:
        return Endpoint(address=lab.backends[0].ipv4, lb_pid=None)


class Hop(Direct):
    """b1 reached through the LB namespace as a plain IP router: the router
    sends b1's /32 to the LB, which routes it on (ip_forward=1, the lab's
    default, and no nft tables); b1 answers the router directly, as in DSR."""

    name = "hop"

    def start(self, lab: Lab, workdir: Path) -> Endpoint:
        tables = lab.run(lab.lb.ns, ["nft", "list", "tables"]).stdout.strip()
        if tables:
            raise LabError(f"the LB namespace must route without nft, but has: {tables}")
        b1 = lab.backends[0].ipv4
        lab.run(lab.router.ns, ["ip", "route", "add", f"{b1}/32", "via", lab.lb.ipv4])
        forwarded = _forwarded_datagrams(lab)
        lab.call(
            lab.clients[0].ns,
            wait_until_serving,
            b1,
            HTTP_PORT,
            START_TIMEOUT,
            timeout=START_TIMEOUT + 5,
        )
        if _forwarded_datagrams(lab) == forwarded:
            raise LabError(f"the client reached {b1} without the LB forwarding a packet")
        return Endpoint(address=b1, lb_pid=None)


class Routed(Hop):
    """`hop` with b1's replies routed back through the LB namespace too (b1's
    gateway is the LB): the path of a NAT packet without passlb, nft or
    conntrack, so `passlb-nat / routed` is passlb's own cost."""

    name = "routed"
    gateway: Gateway = "lb"


def _forwarded_datagrams(lab: Lab) -> int:
    """The LB namespace's `Ip: ForwDatagrams` counter (/proc/net/snmp is per namespace)."""
    snmp = lab.run(lab.lb.ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    names, values = [line.split() for line in snmp if line.startswith("Ip:")][:2]
    return int(values[names.index("ForwDatagrams")])


class Passlb:
    """`passlb run` in the LB namespace with a config for one mode."""

    def __init__(self, mode: str, driver_module: str) -> None:
        self.mode = mode  # "dsr" | "nat" | "proxy"
        self.driver_module = driver_module
        self.name = f"passlb-{mode}"
        # NAT rewrites the destination: replies must come back through the LB
        # to be rewritten again. DSR replies bypass the LB; proxy replies go
        # to the LB's own address anyway.
        self.gateway: Gateway = "lb" if mode == "nat" else "router"
        self.supports_udp = True

    def unavailable(self) -> str | None:
        return _missing_module(self.driver_module, "passlb.daemon") or (
            None if _passlb_command().exists() else f"{_passlb_command()} is missing"
        )

    def iperf_bind(self, lab: Lab) -> str | None:
        # The DSR backend holds the VIP and must answer from it: iperf3's UDP
        # socket connects back to the client from its bound address.
        return lab.vip4 if self.mode == "dsr" else None

    def prepare_backends(self, lab: Lab) -> None:
        if self.mode == "dsr":
            for backend in lab.backends:
                lab.run(backend.ns, [str(_passlb_command()), "backend-setup", "--vip", lab.vip4])

    def start(self, lab: Lab, workdir: Path) -> Endpoint:
        if self.mode == "proxy":
            # The proxy listens on the VIP, so the LB must own it; the router
            # already sends the VIP prefix to the LB.
            lab.run(lab.lb.ns, ["ip", "addr", "add", f"{lab.vip4}/32", "dev", "lo"])
        config = workdir / f"{self.name}.toml"
        config.write_text(passlb_config(self.mode, lab.vip4, lab.lb, lab.backends))
        log = workdir / f"{self.name}.log"
        argv = [str(_passlb_command()), "run", str(config)]
        process = _spawn_logged(lab, lab.lb.ns, argv, log)
        _wait_serving(lab, lab.vip4, process, log)
        return Endpoint(address=lab.vip4, lb_pid=process.pid)


def _passlb_command() -> Path:
    """The `passlb` script of the environment running the benchmark."""
    return Path(sys.executable).parent / "passlb"


def passlb_config(mode: str, vip: str, lb: Node, backends: tuple[Node, ...]) -> str:
    """TOML for the `bulk` and `web` services in `mode`, health checks off
    (every backend serves from the start; checks would only add noise)."""
    lines = [f'interfaces = ["{lb.interface}"]', "", "[api]", f'listen = "{API_LISTEN}"', ""]
    lines += ["[log]", 'level = "warning"', ""]
    if mode == "proxy":
        lines += ["[proxy]", 'workers = "auto"', ""]  # relay processes, as NGINX runs workers
    for name, protocol, port, pool in (
        ("bulk", "tcp+udp", BULK_PORT, backends[:1]),
        ("web", "tcp", HTTP_PORT, backends),
    ):
        lines += [
            "[[services]]",
            f'name = "{name}"',
            f'vip = "{vip}"',
            f'protocol = "{protocol}"',
            f"ports = {port}",
            f'mode = "{mode}"',
            "",
            "[services.health]",
            'type = "none"',
            "",
        ]
        for backend in pool:
            lines += ["[[services.backends]]", f'address = "{backend.ipv4}"']
            if mode == "proxy":
                lines.append(f"port = {port}")
            lines.append("")
    return "\n".join(lines)


class Haproxy:
    """HAProxy in TCP mode (Debian package), default thread count."""

    name = "haproxy"
    gateway: Gateway = "router"
    supports_udp = False  # HAProxy proxies TCP (and QUIC), not plain UDP

    def unavailable(self) -> str | None:
        return _missing_command("haproxy")

    def iperf_bind(self, lab: Lab) -> str | None:
        return None

    def prepare_backends(self, lab: Lab) -> None:
        pass

    def start(self, lab: Lab, workdir: Path) -> Endpoint:
        lab.run(lab.lb.ns, ["ip", "addr", "add", f"{lab.vip4}/32", "dev", "lo"])
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(lab.vip4, lab.backends))
        log = workdir / "haproxy.log"
        # -db: stay in the foreground, so the spawned pid is HAProxy itself.
        process = _spawn_logged(lab, lab.lb.ns, ["haproxy", "-db", "-f", str(config)], log)
        _wait_serving(lab, lab.vip4, process, log)
        return Endpoint(address=lab.vip4, lb_pid=process.pid)


def haproxy_config(vip: str, backends: tuple[Node, ...]) -> str:
    lines = [
        "global",
        "    maxconn 8000",  # within the 20,000-descriptor limit of this machine
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "frontend bulk",
        f"    bind {vip}:{BULK_PORT}",
        "    default_backend bulk",
        "backend bulk",
        f"    server {backends[0].name} {backends[0].ipv4}:{BULK_PORT}",
        "frontend web",
        f"    bind {vip}:{HTTP_PORT}",
        "    default_backend web",
        "backend web",
        "    balance roundrobin",
        *(f"    server {b.name} {b.ipv4}:{HTTP_PORT}" for b in backends),
    ]
    return "\n".join(lines) + "\n"


class Nginx:
    """NGINX stream module (Debian package), `worker_processes auto`."""

    name = "nginx"
    gateway: Gateway = "router"
    supports_udp = True

    def unavailable(self) -> str | None:
        if missing := _missing_command("nginx"):
            return missing
        if not NGINX_STREAM_MODULE.exists():
            return f"{NGINX_STREAM_MODULE} is missing (Debian: libnginx-mod-stream)"
        return None

    def iperf_bind(self, lab: Lab) -> str | None:
        return None

    def prepare_backends(self, lab: Lab) -> None:
        pass

    def start(self, lab: Lab, workdir: Path) -> Endpoint:
        lab.run(lab.lb.ns, ["ip", "addr", "add", f"{lab.vip4}/32", "dev", "lo"])
        prefix = workdir / "nginx-lb"
        prefix.mkdir()
        config = prefix / "nginx.conf"
        config.write_text(nginx_stream_config(lab.vip4, lab.backends, prefix))
        log = workdir / "nginx-lb.log"
        argv = ["nginx", "-p", str(prefix), "-c", str(config)]
        process = _spawn_logged(lab, lab.lb.ns, argv, log)
        _wait_serving(lab, lab.vip4, process, log)
        return Endpoint(address=lab.vip4, lb_pid=process.pid)


def nginx_stream_config(vip: str, backends: tuple[Node, ...], prefix: Path) -> str:
    web = "\n".join(f"        server {b.ipv4}:{HTTP_PORT};" for b in backends)
    return f"""\
load_module {NGINX_STREAM_MODULE};
daemon off;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
stream {{
    upstream bulk {{ server {backends[0].ipv4}:{BULK_PORT}; }}
    upstream web {{
{web}
    }}
    server {{ listen {vip}:{BULK_PORT}; proxy_pass bulk; }}
    server {{ listen {vip}:{BULK_PORT} udp; proxy_pass bulk; }}
    server {{ listen {vip}:{HTTP_PORT}; proxy_pass web; }}
}}
"""


def backend_http_config(prefix: Path) -> str:
    """NGINX on a backend: a tiny fixed response, so the load balancer, not
    the backend, is what the connection-rate and latency workloads measure."""
    return f"""\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {HTTP_PORT} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


ALL_TARGETS: tuple[Target, ...] = (
    Direct(),
    Hop(),
    Routed(),
    Passlb("dsr", "passlb.dataplane.nft.dsr"),
    Passlb("nat", "passlb.dataplane.nft.nat"),
    Passlb("proxy", "passlb.dataplane.proxy.driver"),
    Haproxy(),
    Nginx(),
)
