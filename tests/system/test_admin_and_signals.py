"""`passlb drain|enable|disable` against the running daemon, and how it stops."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

from .daemon_harness import (
    PORT,
    Connection,
    EchoBackend,
    MakeDaemon,
    open_flows,
    proxy_service,
)

DRAIN_TIMEOUT = 20


async def test_drain_enable_disable_through_the_cli(make_daemon: MakeDaemon, net: str) -> None:
    backends = [EchoBackend(f"b{h}", f"{net}.{h}") for h in (11, 12, 13)]
    for backend in backends:
        await backend.start()
    daemon = make_daemon(
        proxy_service(
            "web",
            f"{net}.10",
            [f'address = "{b.address}"\nport = {PORT}' for b in backends],
            settings=f'drain_timeout = "{DRAIN_TIMEOUT}s"',
            health='type = "tcp"\ninterval = 0.2\ntimeout = 0.15',
        )
    )
    connections: list[Connection] = []
    try:
        await daemon.wait_ready()
        connections = [await Connection.open(f"{net}.10") for _ in range(15)]
        by_backend = Counter(c.backend for c in connections)
        name = by_backend.most_common(1)[0][0]
        target = next(b for b in backends if b.name == name)
        theirs = [c for c in connections if c.backend == name]
        others = [c for c in connections if c.backend != name]

        drained = await daemon.cli("drain", "web", target.key)
        assert drained.returncode == 0, drained.stderr
        await daemon.wait_for(
            lambda d: daemon.backend(d, "web", target.key)["role"] == "draining", 2.0, "drain"
        )
        fresh = await open_flows(f"{net}.10", 60)
        assert name not in {r.backend for r in fresh}
        assert not [r for r in fresh if r.error]
        assert [await c.ask() for c in theirs] == [name] * len(theirs)
        shown = await daemon.cli("status")
        line = next(row for row in shown.stdout.splitlines() if target.key in row)
        assert "draining" in line and "drain ends in" in line, line
        remaining = daemon.backend(await daemon.status(), "web", target.key)["drain_deadline_in"]
        assert DRAIN_TIMEOUT - 5 < remaining <= DRAIN_TIMEOUT

        enabled = await daemon.cli("enable", "web", target.key)
        assert enabled.returncode == 0, enabled.stderr
        await daemon.wait_for(
            lambda d: daemon.backend(d, "web", target.key)["role"] == "active", 2.0, "enable"
        )
        assert name in {r.backend for r in await open_flows(f"{net}.10", 60)}

        disabled = await daemon.cli("disable", "web", target.key)
        assert disabled.returncode == 0, disabled.stderr
        await daemon.wait_for(
            lambda d: daemon.backend(d, "web", target.key)["role"] == "disabled", 2.0, "disable"
        )
        assert [await c.ask() for c in theirs] == [None] * len(theirs)  # cut at once
        assert [await c.ask() for c in others] == [c.backend for c in others]
        assert name not in {r.backend for r in await open_flows(f"{net}.10", 60)}

        unknown = await daemon.cli("drain", "web", f"{net}.99:{PORT}")
        assert unknown.returncode == 4
        assert f"{net}.99:{PORT}" in unknown.stderr
    finally:
        for connection in connections:
            connection.close()
        for backend in backends:
            await backend.kill()


async def test_sigterm_stops_cleanly(make_daemon: MakeDaemon, net: str) -> None:
    backend = EchoBackend("b1", f"{net}.11")
    await backend.start()
    daemon = make_daemon(
        proxy_service("web", f"{net}.10", [f'address = "{backend.address}"\nport = {PORT}'])
    )
    try:
        await daemon.wait_ready(checked=False)
        assert {r.backend for r in await open_flows(f"{net}.10", 3)} == {"b1"}
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(10) == 0
        assert any(e["msg"].startswith("stopped") for e in daemon.log())
        assert all(r.error for r in await open_flows(f"{net}.10", 2))  # the relay is gone
    finally:
        await backend.kill()


async def test_second_signal_forces_exit(make_daemon: MakeDaemon, net: str) -> None:
    backend = EchoBackend("b1", f"{net}.11")
    await backend.start()
    daemon = make_daemon(
        proxy_service("web", f"{net}.10", [f'address = "{backend.address}"\nport = {PORT}'])
    )
    host, _, port = daemon.api.rpartition(":")
    try:
        await daemon.wait_ready(checked=False)
        # An admin client that never finishes its request body holds the
        # graceful shutdown (the API waits for requests in progress).
        _, stuck = await asyncio.open_connection(host, int(port))
        stuck.write(
            b"POST /api/v1/reload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        await stuck.drain()
        await asyncio.sleep(0.2)
        daemon.signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert daemon.process is not None and daemon.process.poll() is None, "not held"
        forced_at = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(5) == 1
        assert time.monotonic() - forced_at < 2.0
        assert any("second signal" in e["msg"] for e in daemon.log())
        stuck.close()
    finally:
        await backend.kill()
