"""Hysteresis against a flapping backend; health-reported weights steer the split."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

from .daemon_harness import (
    PORT,
    EchoBackend,
    HttpHealthEndpoint,
    MakeDaemon,
    applies_changing,
    health_transitions,
    open_flows,
    proxy_service,
)

INTERVAL = 0.2
TOGGLE = 0.5
TOGGLES = 8


async def test_flapping_backend_moves_the_ring_only_as_rise_and_fall_allow(
    make_daemon: MakeDaemon, net: str
) -> None:
    steady = EchoBackend("steady", f"{net}.11")
    damped = EchoBackend("damped", f"{net}.12")  # rise 3 / fall 3
    eager = EchoBackend("eager", f"{net}.13")  # rise 1 / fall 1: the contrast
    for backend in (steady, damped, eager):
        await backend.start()
    daemon = make_daemon(
        proxy_service(
            "web",
            f"{net}.10",
            [
                f'address = "{steady.address}"\nport = {PORT}',
                f'address = "{damped.address}"\nport = {PORT}',
                f'address = "{eager.address}"\nport = {PORT}\n'
                "[services.backends.health]\nrise = 1\nfall = 1",
            ],
            health=f'type = "tcp"\ninterval = {INTERVAL}\ntimeout = 0.15\nrise = 3\nfall = 3',
        )
    )
    try:
        await daemon.wait_ready()
        started = time.time()
        # Toggle at absolute times, so the up and down windows stay 0.5 s long.
        for n in range(TOGGLES):
            await asyncio.sleep(max(0.0, started + (n + 1) * TOGGLE - time.time()))
            for backend in (damped, eager):
                await (backend.kill() if backend.running else backend.start())
        await asyncio.sleep(TOGGLE)

        def up_down(key: str) -> list[float]:
            return [
                e["ts"]
                for e in health_transitions(daemon, "web", key)
                if e["ts"] >= started and "unknown" not in e["msg"]
            ]

        damped_moves, eager_moves = up_down(damped.key), up_down(eager.key)
        # rise 1 / fall 1 follows nearly every toggle: the flapping is real.
        assert len(eager_moves) >= TOGGLES - 2
        # rise 3 / fall 3: a move needs 3 results in a row, and a 0.5 s window
        # holds at most 3 checks 0.2 s apart while a 1 s cycle holds 5, so at
        # most one window per cycle can move the backend.
        assert len(damped_moves) <= TOGGLES // 2
        gaps = [b - a for a, b in itertools.pairwise(damped_moves)]
        assert all(gap >= 3 * INTERVAL - 0.05 for gap in gaps), gaps
        # No ring change beyond the health transitions.
        ring_changes = [e for e in applies_changing(daemon, damped.key) if e["ts"] >= started]
        assert len(ring_changes) == len(damped_moves)
        assert not [e for e in applies_changing(daemon, steady.key) if e["ts"] >= started]
    finally:
        for backend in (steady, damped, eager):
            await backend.kill()


async def test_reported_weights_change_the_traffic_split(make_daemon: MakeDaemon, net: str) -> None:
    data = [EchoBackend(f"b{h}", f"{net}.{h}") for h in (11, 12)]
    checks = [HttpHealthEndpoint(f"{net}.{h}", 8080, weight=1) for h in (11, 12)]
    servers: list[EchoBackend | HttpHealthEndpoint] = [*data, *checks]
    for server in servers:
        await server.start()
    daemon = make_daemon(
        proxy_service(
            "web",
            f"{net}.10",
            [f'address = "{net}.{h}"\nport = {PORT}\nweight = 5' for h in (11, 12)],
            health='type = "http"\nport = 8080\ninterval = 0.2\ntimeout = 0.15\nrise = 1',
        )
    )
    keys = [f"{net}.{h}:{PORT}" for h in (11, 12)]

    def ring_weights(doc: dict[str, object]) -> list[int]:
        return [daemon.backend(doc, "web", key)["ring_weight"] for key in keys]

    try:
        await daemon.wait_for(lambda d: ring_weights(d) == [1, 1], 5.0, "reported 1:1")
        even = Counter(r.backend for r in await open_flows(f"{net}.10", 600))

        checks[1].weight = 3
        await daemon.wait_for(lambda d: ring_weights(d) == [1, 3], 5.0, "reported 1:3")
        skewed = Counter(r.backend for r in await open_flows(f"{net}.10", 600))
    finally:
        for server in data:
            await server.kill()
        for check in checks:
            await check.stop()

    assert sum(even.values()) == sum(skewed.values()) == 600
    assert abs(even["b11"] / 600 - 0.5) < 0.07, even
    assert abs(skewed["b11"] / 600 - 0.25) < 0.06, skewed
    assert abs(skewed["b12"] / 600 - 0.75) < 0.06, skewed
