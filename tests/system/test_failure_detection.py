"""A backend's server dies under a steady stream of new flows, then comes back.

How fast the daemon reacts (interval x fall + one interval) is bench_daemon.py's
measure; here the waits only keep a hung test finite, as a busy machine is slower."""

from __future__ import annotations

import asyncio
import time

from .daemon_harness import (
    EchoBackend,
    MakeDaemon,
    Stream,
    applies_changing,
    proxy_service,
    where_ring_sends,
)

INTERVAL = 0.2
RISE = 2
FALL = 2


async def test_dead_backend_leaves_the_ring_and_returns(make_daemon: MakeDaemon, net: str) -> None:
    backends = [EchoBackend(f"b{i}", f"{net}.{10 + i}") for i in (1, 2, 3)]
    for backend in backends:
        await backend.start()
    victim = backends[1]
    daemon = make_daemon(
        proxy_service(
            "web",
            f"{net}.10",
            [f'address = "{b.address}"\nport = {b.port}' for b in backends],
            health=f'type = "tcp"\ninterval = {INTERVAL}\ntimeout = 0.1\n'
            f"rise = {RISE}\nfall = {FALL}",
        )
    )
    await daemon.wait_ready()

    async with Stream(f"{net}.10") as stream:
        await asyncio.sleep(0.5)
        killed_at = time.time()
        await victim.kill()
        await daemon.wait_for(
            lambda d: daemon.backend(d, "web", victim.key)["role"] == "down", 30.0, "victim down"
        )
        await asyncio.sleep(0.5)
        restarted_at = time.time()
        await victim.start()
        await daemon.wait_for(
            lambda d: daemon.backend(d, "web", victim.key)["role"] == "active",
            30.0,
            "victim back",
        )
        back_from = len(stream.results)
        while not any(r.backend == victim.name for r in stream.results[back_from:]):
            await asyncio.sleep(0.05)  # the pytest timeout bounds a victim that never returns

    changes = applies_changing(daemon, victim.key)
    removed_at = next(e["ts"] for e in changes if e["ts"] >= killed_at)
    returned_at = next(e["ts"] for e in changes if e["ts"] >= restarted_at)

    # A flow still open when the server died may fail with it; flows done before may not.
    before = [r for r in stream.results if r.finished < killed_at]
    assert {r.backend for r in before} == {"b1", "b2", "b3"}
    assert not [r for r in before if r.error]

    # Only flows the ring gave the victim may fail, and only until it left the ring.
    failed = stream.errors()
    assert failed, "the stream should have hit the dead backend before detection"
    assert all(r.finished >= killed_at and r.started <= removed_at for r in failed)
    assert all(r.src_port for r in failed), failed
    assert {where_ring_sends(daemon.config_path, "web", r) for r in failed} == {victim.key}

    gone = [r for r in stream.results if removed_at < r.started < restarted_at]
    assert len(gone) > 20
    assert {r.backend for r in gone} == {"b1", "b3"}

    back = [r for r in stream.results if r.started > returned_at]
    assert "b2" in {r.backend for r in back}
    assert not [r for r in back if r.error]
