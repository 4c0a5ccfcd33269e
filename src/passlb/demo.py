"""`passlb demo`: passthrough load balancing shown with real traffic.

As root on Linux it builds a lab (client, router, load balancer, 3 backends in
network namespaces), runs `passlb run` in the load balancer's namespace in
`dsr` mode, and sends TCP, UDP and TLS flows to the VIP. Each backend's echo
server reports the peer and local address it saw, so the table printed at the
end shows passthrough: the peer is the client, the local address is the VIP.
Then a backend's server is stopped: its health check fails and new flows move
to the others. Everything is removed at the end, also on errors or Ctrl-C.

Without root it runs the `proxy` mode on loopback, where the client address
reaches the backends in a PROXY protocol v2 header.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from passlb.api.client import ApiClient, ApiError
from passlb.errors import PasslbError
from passlb.lab import Lab, LabSpec
from passlb.lab.client import Reply, tcp_requests, tls_requests, udp_requests

API = "127.0.0.1:9180"
TCP_PORT, UDP_PORT, TLS_PORT = 80, 53, 443
CHECK_INTERVAL = 0.5  # seconds; short so the demo shows a failover quickly
CHECK_FALL = 2


def _say(text: str = "") -> None:
    print(text, flush=True)


def dsr_config(lab: Lab) -> str:
    backends = "".join(f'\n[[services.backends]]\naddress = "{b.ipv4}"\n' for b in lab.backends)
    health = (
        f'type = "tcp"\nport = {TCP_PORT}\ninterval = "{CHECK_INTERVAL}s"\n'
        f'timeout = "0.3s"\nrise = 2\nfall = {CHECK_FALL}\n'
    )
    return f"""\
interfaces = ["{lab.lb.interface}"]

[api]
listen = "{API}"

[[services]]
name = "web"
vip = "{lab.vip4}"
protocol = "tcp"
ports = [{TCP_PORT}, {TLS_PORT}]
mode = "dsr"

[services.health]
{health}{backends}
[[services]]
name = "dns"
vip = "{lab.vip4}"
protocol = "udp"
ports = [{UDP_PORT}]
mode = "dsr"

[services.health]
{health}{backends}"""


def _fetch_status() -> dict[str, Any]:
    return ApiClient(API, timeout=5.0).get("/api/v1/status")


def _wait_until_down(lab: Lab, address: str, timeout: float = 10.0) -> None:
    """Until the daemon reports the backend out of the ring (health checks failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = lab.call(lab.lb.ns, _fetch_status)
        roles = [b["role"] for s in doc["services"] for b in s["backends"] if b["key"] == address]
        # In sync: the kernel holds the change, not only the daemon's decision.
        if roles and all(role == "down" for role in roles) and doc["state"]["in_sync"]:
            return
        time.sleep(0.1)
    raise PasslbError(f"the daemon did not take backend {address} down within {timeout:.0f} s")


def _wait_for_daemon(lab: Lab, daemon: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise PasslbError(f"the passlb daemon exited with status {daemon.returncode}")
        try:
            doc = lab.call(lab.lb.ns, _fetch_status)
        except ApiError:
            time.sleep(0.2)
            continue
        if doc["applies"] > 0 and doc["last_apply"]["error"] is None:
            return
        time.sleep(0.2)
    raise PasslbError("the passlb daemon did not apply its config in time")


def _rx_packets(lab: Lab) -> int:
    out = lab.run(lab.lb.ns, ["ip", "-j", "-s", "link", "show", lab.lb.interface]).stdout
    packets: int = json.loads(out)[0]["stats64"]["rx"]["packets"]
    return packets


def _table(replies: Sequence[Reply], names: Sequence[str]) -> list[str]:
    by_backend: dict[str, list[Reply]] = collections.defaultdict(list)
    failed = 0
    for r in replies:
        if "backend" in r:
            by_backend[str(r["backend"])].append(r)
        else:
            failed += 1
    rows = [f"  {'backend':<8} {'flows':>6}  {'client address seen':<22} {'local address seen'}"]
    for name in names:
        got = by_backend.get(name, [])
        peers = sorted({str(r["peer"][0]) for r in got})
        locals_ = sorted({f"{r['local'][0]}:{r['local'][1]}" for r in got})
        rows.append(f"  {name:<8} {len(got):>6}  {','.join(peers) or '-':<22} {','.join(locals_)}")
    if failed:
        rows.append(f"  failed requests: {failed}")
    return rows


def run_dsr_demo(flows: int) -> int:
    with Lab(LabSpec(backends=3, clients=1, backend_gateway="router", ipv6=False)) as lab:
        client = lab.clients[0]
        names = [b.name for b in lab.backends]
        _say(f"lab {lab.prefix}: client {client.ipv4} -> router -> load balancer {lab.lb.ipv4}")
        _say(f"  backends {', '.join(f'{b.name}={b.ipv4}' for b in lab.backends)}")
        _say(f"  VIP {lab.vip4} (the router sends it to the load balancer)")
        servers = {}
        for b in lab.backends:
            servers[b.name] = lab.start_servers(b, tcp=[TCP_PORT], udp=[UDP_PORT], tls=[TLS_PORT])
            lab.run(b.ns, [sys.executable, "-m", "passlb.cli", "backend-setup", "--vip", lab.vip4])
        workdir = Path(tempfile.mkdtemp(prefix="passlb-demo-"))
        config = workdir / "passlb.toml"
        config.write_text(dsr_config(lab))
        _say(f"\nrunning: passlb run {config}  (mode dsr, in the load balancer's namespace)")
        daemon = lab.spawn(
            lab.lb.ns,
            [sys.executable, "-m", "passlb.cli", "run", "--cleanup", str(config)],
            stderr=open(workdir / "daemon.log", "w"),  # noqa: SIM115 - closed with the process
        )
        try:
            _wait_for_daemon(lab, daemon)
            rx_before = _rx_packets(lab)
            tcp = lab.call(client.ns, tcp_requests, lab.vip4, TCP_PORT, flows)
            udp = lab.call(client.ns, udp_requests, lab.vip4, UDP_PORT, flows // 3)
            tls = lab.call(
                client.ns, tls_requests, lab.vip4, TLS_PORT, 30, "vip.lab.test", lab.ca_file
            )
            _say(f"\n{flows} TCP flows to {lab.vip4}:{TCP_PORT}:")
            _say("\n".join(_table(tcp, names)))
            _say(f"\n{flows // 3} UDP datagrams to {lab.vip4}:{UDP_PORT} (each its own flow):")
            _say("\n".join(_table(udp, names)))
            _say(
                f"\n30 TLS connections to vip.lab.test:{TLS_PORT}, each backend's own "
                "certificate verified by the client (the load balancer holds no key):"
            )
            _say("\n".join(_table(tls, names)))
            received = _rx_packets(lab) - rx_before
            forwarded = sum(
                b["packets"]
                for svc in lab.call(lab.lb.ns, _fetch_status)["services"]
                for b in svc["backends"]
            )
            _say(
                "\nPassthrough: every backend saw the client's own address as its peer and"
                f"\nthe VIP {lab.vip4} as its local address."
                f"\nDirect server return: the load balancer's interface received {received}"
                f"\npackets while passlb forwarded {forwarded} client packets; the backends'"
                "\nreplies went to the client through the router, never through the load balancer."
            )

            victim = lab.backends[1]
            _say(f"\nStopping the servers on {victim.name}; its health check will fail ...")
            servers[victim.name].send_signal(signal.SIGTERM)
            servers[victim.name].wait(timeout=5)
            stopped = time.monotonic()
            _wait_until_down(lab, victim.ipv4)
            _say(
                f"passlb took {victim.name} out of the ring {time.monotonic() - stopped:.1f} s "
                f"later (checks every {CHECK_INTERVAL} s, down after {CHECK_FALL} failures)."
            )
            after = lab.call(client.ns, tcp_requests, lab.vip4, TCP_PORT, flows)
            _say(f"{flows} new TCP flows after {victim.name} failed:")
            _say("\n".join(_table(after, names)))
            status = lab.run(lab.lb.ns, [sys.executable, "-m", "passlb.cli", "status"])
            _say("\n$ passlb status\n" + status.stdout)
            ok = received < 1.5 * forwarded and all("backend" in r for r in tcp + udp + tls)
            ok = ok and all(r.get("backend") not in (None, victim.name) for r in after)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        _say("demo done; removing the lab" + ("" if ok else " (some checks FAILED)"))
        return 0 if ok else 1


def run_demo(mode: str = "auto", flows: int = 300) -> int:
    if not 1 <= flows <= 10_000:
        raise PasslbError(f"--flows: must be between 1 and 10000, got {flows}")
    root = os.geteuid() == 0 and sys.platform == "linux"
    if mode == "auto":
        mode = "dsr" if root else "proxy"
    if mode == "proxy":
        from passlb.demo_proxy import run_proxy_demo

        return run_proxy_demo(flows)
    if not root:
        raise PasslbError(f"demo --mode {mode} needs root on Linux; try --mode proxy")
    if mode == "dsr":
        return run_dsr_demo(flows)
    raise PasslbError(f"demo --mode {mode}: not available yet")
