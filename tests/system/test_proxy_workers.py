"""`passlb run` with `[proxy] workers = 2`: two relay processes serve, status counts
their flows, and the daemon's stop leaves no worker behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .daemon_harness import PORT, Connection, EchoBackend, MakeDaemon, open_flows, proxy_service


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def sockets_of(pid: int) -> int:
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:
            continue
    return count


async def test_two_workers_serve_are_counted_and_stop_with_the_daemon(
    make_daemon: MakeDaemon, net: str
) -> None:
    servers = [EchoBackend(f"b{h}", f"{net}.{h}") for h in (11, 12)]
    for server in servers:
        await server.start()
    services = proxy_service(
        "web",
        f"{net}.10",
        [f'address = "{net}.{h}"\nport = {PORT}' for h in (11, 12)],
        health='type = "tcp"\ninterval = 0.2\ntimeout = 0.15\nrise = 1',
    )
    daemon = make_daemon("[proxy]\nworkers = 2\n" + services)
    try:
        await daemon.wait_ready()
        workers = children_of(daemon.pid)
        assert len(workers) == 2
        idle = {pid: sockets_of(pid) for pid in workers}

        held = [await Connection.open(f"{net}.10") for _ in range(16)]
        assert all(n > 0 for n in (sockets_of(pid) - idle[pid] for pid in workers))
        results = await open_flows(f"{net}.10", 30)
        assert [r.error for r in results if r.error] == []
        assert {r.backend for r in results} == {"b11", "b12"}

        await daemon.wait_for(
            lambda d: (
                sum(b["new_flows"] for b in d["services"][0]["backends"]) == 46
                and d["services"][0]["active_flows"] == 16
            ),
            5,
            "46 new flows and the 16 held ones active, counted over both workers",
        )
        status = await daemon.cli("status")
        assert status.returncode == 0 and "web" in status.stdout
        for conn in held:
            assert await conn.ask() == conn.backend
            conn.close()

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0
        messages = [e["msg"] for e in daemon.log()]
        for pid in workers:
            assert any(
                m.startswith("proxy worker ") and f"(pid {pid}) started" in m for m in messages
            )
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists()  # reaped, not left running or a zombie
    finally:
        for server in servers:
            await server.kill()
