"""The health checker in virtual time with scripted probes, and once for real."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

import pytest

from passlb.errors import ConfigError
from passlb.health.policy import HealthState, ProbeResult
from passlb.health.scheduler import HealthChecker, first_probe_delay
from passlb.health.testing import VirtualClock
from passlb.model import (
    Backend,
    Config,
    HealthSpec,
    HealthType,
    IPAddress,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import HealthStatus

VIP = IPv4Address("198.18.0.10")
B1, B2, B3 = (IPv4Address(f"198.18.1.{i}") for i in (11, 12, 13))
INTERVAL = 0.1
SPEC = HealthSpec(interval=INTERVAL, timeout=0.05, rise=2, fall=3)


def config(*backends: Backend, spec: HealthSpec = SPEC, name: str = "web") -> Config:
    return Config(
        services=(
            Service(
                name=name,
                vip=VIP,
                protocol=Protocol.TCP,
                ports=PortSet((PortRange(80, 80),)),
                mode=Mode.NAT,
                backends=backends,
                health=spec,
            ),
        )
    )


def always_up(_: float) -> bool:
    return True


@dataclass
class ScriptedProbe:
    """Answers from a script: address -> (clock value -> result), recording each call."""

    clock: VirtualClock
    scripts: dict[IPAddress, Callable[[float], bool]] = field(default_factory=dict)
    weights: dict[IPAddress, int | None] = field(default_factory=dict)
    calls: list[tuple[float, IPAddress, int, IPAddress | None]] = field(default_factory=list)

    async def __call__(
        self, spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
    ) -> ProbeResult:
        now = self.clock.now()
        self.calls.append((now, address, port, vip))
        ok = self.scripts.get(address, always_up)(now)
        return ProbeResult(ok, "ok" if ok else "refused", 0.001, self.weights.get(address))

    def times(self, address: IPAddress) -> list[float]:
        return [at for at, probed, _, _ in self.calls if probed == address]


@dataclass
class Recorder:
    events: list[tuple[float, str, str, HealthStatus]] = field(default_factory=list)
    clock: VirtualClock | None = None

    def __call__(self, service: str, backend_key: str, status: HealthStatus) -> None:
        at = self.clock.now() if self.clock else 0.0
        self.events.append((at, service, backend_key, status))

    def healthy(self, backend_key: str) -> list[bool]:
        return [status.healthy for _, _, key, status in self.events if key == backend_key]


@asynccontextmanager
async def virtual_checker(
    scripts: dict[IPAddress, Callable[[float], bool]] | None = None,
) -> AsyncIterator[tuple[HealthChecker, VirtualClock, ScriptedProbe, Recorder]]:
    clock = VirtualClock()
    scripted = ScriptedProbe(clock, scripts or {})
    recorder = Recorder(clock=clock)
    async with HealthChecker(recorder, probe=scripted, clock=clock) as checker:
        yield checker, clock, scripted, recorder


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_first_probes_are_jittered_then_steady() -> None:
    async def scenario() -> None:
        async with virtual_checker() as (checker, clock, scripted, _):
            await checker.update(config(Backend(B1), Backend(B2)))
            await clock.advance(0.55)
            for address in (B1, B2):
                offset = first_probe_delay(("web", str(address)), INTERVAL)
                expected = [
                    offset + i * INTERVAL for i in range(6) if offset + i * INTERVAL <= 0.55
                ]
                assert scripted.times(address) == pytest.approx(expected)
            assert scripted.times(B1)[0] != scripted.times(B2)[0]
            assert {(port, vip) for _, _, port, vip in scripted.calls} == {(80, VIP)}

    run(scenario)


def test_killed_backend_goes_down_in_time_and_comes_back_after_rise() -> None:
    def b1_up(now: float) -> bool:
        return not 1.0 <= now < 2.0  # killed at 1.0, back at 2.0

    async def scenario() -> None:
        async with virtual_checker({B1: b1_up}) as (checker, clock, _, recorder):
            await checker.update(config(Backend(B1), Backend(B2)))
            await clock.advance(0.5)
            view = checker.view()
            assert set(view) == {("web", "198.18.1.11"), ("web", "198.18.1.12")}
            assert all(status.healthy for status in view.values())
            await clock.advance(2.5)

        b1_events = [
            (at, status.healthy, status.since)
            for at, _, key, status in recorder.events
            if key == "198.18.1.11"
        ]
        assert [healthy for _, healthy, _ in b1_events] == [True, False, True]
        _, (down_at, _, down_since), (up_at, _, up_since) = b1_events
        assert 1.0 < down_at <= 1.0 + INTERVAL * SPEC.fall + INTERVAL
        assert down_since == down_at
        assert 2.0 < up_at <= 2.0 + INTERVAL * SPEC.rise + INTERVAL
        assert up_since == up_at
        assert recorder.healthy("198.18.1.12") == [True]  # its neighbour never moved

    run(scenario)


def test_flapping_backend_causes_no_transition() -> None:
    flips = {"n": 0}

    def alternate(_: float) -> bool:
        flips["n"] += 1
        return flips["n"] <= 2 or flips["n"] % 2 == 1  # up twice, then fail/ok/fail/ok...

    def from_start(_: float) -> bool:
        flips["m"] = flips.get("m", 0) + 1
        return flips["m"] % 2 == 0

    async def scenario() -> None:
        async with virtual_checker({B1: alternate, B2: from_start}) as (checker, clock, sc, rec):
            await checker.update(config(Backend(B1), Backend(B2)))
            await clock.advance(5.0)
            assert len(sc.times(B1)) >= 45 and len(sc.times(B2)) >= 45
            assert rec.healthy("198.18.1.11") == [True]  # the first verdict, then nothing
            assert rec.healthy("198.18.1.12") == []
            assert checker.state("web", "198.18.1.12") is HealthState.UNKNOWN
            assert ("web", "198.18.1.12") not in checker.view()

    run(scenario)


def test_reported_weight_changes_are_announced() -> None:
    async def scenario() -> None:
        async with virtual_checker() as (checker, clock, scripted, recorder):
            scripted.weights[B1] = 100
            await checker.update(config(Backend(B1), spec=replace(SPEC, rise=1)))
            await clock.advance(0.35)
            scripted.weights[B1] = 40
            await clock.advance(0.3)
            weights = [status.weight for _, _, _, status in recorder.events]
            assert weights == [100, 40]
            assert checker.view()[("web", "198.18.1.11")].weight == 40

    run(scenario)


def test_update_keeps_unchanged_backends_and_handles_the_rest() -> None:
    async def scenario() -> None:
        async with virtual_checker({B2: lambda _: False}) as (checker, clock, scripted, rec):
            await checker.update(config(Backend(B1), Backend(B2)))
            await clock.advance(1.0)
            b1_since = checker.view()[("web", "198.18.1.11")].since
            assert checker.state("web", "198.18.1.12") is HealthState.DOWN
            probes_before = len(scripted.times(B1))
            events_before = len(rec.events)

            # B1 unchanged, B2 removed, B3 added.
            await checker.update(config(Backend(B1), Backend(B3)))
            assert checker.state("web", "198.18.1.12") is None
            assert checker.state("web", "198.18.1.13") is HealthState.UNKNOWN
            assert checker.view()[("web", "198.18.1.11")].since == b1_since
            removed_probes = len(scripted.times(B2))
            await clock.advance(1.0)
            assert len(scripted.times(B2)) == removed_probes
            # The unchanged task kept its cadence: one probe per interval, no restart.
            assert len(scripted.times(B1)) - probes_before == pytest.approx(10, abs=1)
            assert rec.healthy("198.18.1.11") == [True]
            assert [key for _, _, key, _ in rec.events[events_before:]] == ["198.18.1.13"]

            # A changed check (slower, stricter) keeps the verdict and its since.
            slower = replace(SPEC, interval=0.2, fall=5)
            await checker.update(config(Backend(B1), Backend(B3), spec=slower))
            assert checker.view()[("web", "198.18.1.11")].since == b1_since
            before = len(scripted.times(B1))
            await clock.advance(1.0)
            assert len(scripted.times(B1)) - before == pytest.approx(5, abs=1)
            assert rec.healthy("198.18.1.11") == [True]

    run(scenario)


def test_none_check_is_up_at_once_without_probing() -> None:
    async def scenario() -> None:
        async with virtual_checker({B1: lambda _: False}) as (checker, clock, scripted, rec):
            await checker.update(config(Backend(B1)))
            await clock.advance(1.0)
            assert checker.state("web", "198.18.1.11") is HealthState.DOWN
            await checker.update(config(Backend(B1), spec=HealthSpec(type=HealthType.NONE)))
            assert checker.view()[("web", "198.18.1.11")] == HealthStatus(True, None, 1.0)
            probes = len(scripted.calls)
            await clock.advance(1.0)
            assert len(scripted.calls) == probes
            assert rec.healthy("198.18.1.11") == [False, True]

    run(scenario)


def test_close_cancels_and_awaits_probes_in_flight() -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        cancelled: list[IPAddress] = []

        async def hanging_probe(
            spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
        ) -> ProbeResult:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(address)
                raise
            raise AssertionError("unreachable")

        checker = HealthChecker(Recorder(), probe=hanging_probe)
        await checker.update(config(Backend(B1), spec=replace(SPEC, interval=0.01)))
        await asyncio.wait_for(started.wait(), 1.0)
        before = {t for t in asyncio.all_tasks() if t.get_name().startswith("health ")}
        assert len(before) == 1
        await checker.close()
        assert cancelled == [B1]
        assert all(task.done() for task in before)

    run(scenario)


def test_a_failing_callback_does_not_stop_the_checks() -> None:
    async def scenario() -> None:
        clock = VirtualClock()
        scripted = ScriptedProbe(clock, {B1: lambda now: now < 1.0})
        calls: list[bool] = []

        def explode(service: str, key: str, status: HealthStatus) -> None:
            calls.append(status.healthy)
            raise RuntimeError("daemon bug")

        async with HealthChecker(explode, probe=scripted, clock=clock) as checker:
            await checker.update(config(Backend(B1)))
            await clock.advance(2.0)
        assert calls == [True, False]

    run(scenario)


async def wait_for_state(
    checker: HealthChecker, key: str, state: HealthState, changed: asyncio.Event, limit: float
) -> None:
    async with asyncio.timeout(limit):
        while checker.state("web", key) is not state:
            changed.clear()
            await changed.wait()


def test_real_tcp_backend_killed_and_restarted() -> None:
    interval = 0.1
    # Real time on a shared 2-core machine: allow scheduling slack beyond the bound.
    slack = 0.3

    async def scenario() -> None:
        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        changed = asyncio.Event()
        seen: list[bool] = []

        def on_transition(service: str, key: str, status: HealthStatus) -> None:
            seen.append(status.healthy)
            changed.set()

        spec = HealthSpec(interval=interval, timeout=0.05, rise=2, fall=3)
        backend = Backend(IPv4Address("127.0.0.1"), port=port)
        key = backend.key
        loop = asyncio.get_running_loop()
        try:
            async with HealthChecker(on_transition) as checker:
                await checker.update(config(backend, spec=spec))
                await wait_for_state(checker, key, HealthState.UP, changed, 1.0)

                server.close()
                await server.wait_closed()
                killed = loop.time()
                await wait_for_state(checker, key, HealthState.DOWN, changed, 2.0)
                assert loop.time() - killed <= interval * spec.fall + interval + slack
                assert "refused" in checker.records()[("web", key)].reason

                server = await asyncio.start_server(accept, "127.0.0.1", port)
                back = loop.time()
                await wait_for_state(checker, key, HealthState.UP, changed, 2.0)
                assert loop.time() - back <= interval * spec.rise + interval + slack
            assert seen == [True, False, True]
        finally:
            server.close()
            await server.wait_closed()

    run(scenario)


def test_a_bad_reload_changes_nothing() -> None:
    async def scenario() -> None:
        async with virtual_checker() as (checker, clock, scripted, _):
            await checker.update(config(Backend(B1)))
            await clock.advance(0.5)
            with pytest.raises(ConfigError, match=r"services\[web\]\.health\.interval"):
                await checker.update(
                    config(Backend(B1), Backend(B2), spec=replace(SPEC, interval=0))
                )
            before = len(scripted.times(B1))
            await clock.advance(0.5)
            assert len(scripted.times(B1)) - before == pytest.approx(5, abs=1)
            assert checker.state("web", "198.18.1.12") is None

    run(scenario)


def test_one_wake_up_starts_every_check_due_in_its_window() -> None:
    """200 checks at 10 per second share wake-ups, each keeps its own jittered cadence."""
    backends = [Backend(IPv4Address(f"198.18.3.{i}")) for i in range(1, 201)]
    window = 0.01

    async def scenario() -> None:
        clock = VirtualClock()
        scripted = ScriptedProbe(clock)
        async with HealthChecker(
            Recorder(), probe=scripted, clock=clock, batch_window=window
        ) as checker:
            await checker.update(config(*backends))
            await clock.advance(1.0)
        for backend in backends:
            offset = first_probe_delay(("web", str(backend.address)), INTERVAL)
            due = [offset + i * INTERVAL for i in range(11) if offset + i * INTERVAL <= 1.0]
            times = scripted.times(backend.address)
            # Once per interval, at its jittered time or at most one window early.
            assert len(times) in (len(due), len(due) + 1)
            for at, planned in zip(times, due, strict=False):
                assert planned - window - 1e-9 <= at <= planned + 1e-9
        wake_ups = {at for at, *_ in scripted.calls}
        assert len(scripted.calls) >= 1900
        assert len(wake_ups) <= 1.0 / window + 1  # 2,000 probes, at most ~100 wake-ups
        # Jitter is kept: the first probes spread over the whole interval.
        firsts = sorted(scripted.times(b.address)[0] for b in backends)
        assert firsts[0] < 0.01 and firsts[-1] > 0.09

    run(scenario)


def test_a_verdict_known_at_once_needs_no_task() -> None:
    """A probe that returns its result (not an awaitable) is decided inside the wake-up."""

    async def scenario() -> None:
        clock = VirtualClock()
        scripted = ScriptedProbe(clock, {B1: lambda now: now < 0.5})
        calls: list[float] = []
        tasks_seen: set[str] = set()

        def instant(
            spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
        ) -> ProbeResult:
            calls.append(clock.now())
            tasks_seen.update(t.get_name() for t in asyncio.all_tasks())
            ok = scripted.scripts[B1](clock.now())
            return ProbeResult(ok, "ok" if ok else "refused", 0.0)

        recorder = Recorder(clock=clock)
        async with HealthChecker(recorder, probe=instant, clock=clock) as checker:
            await checker.update(config(Backend(B1)))
            await clock.advance(1.0)
        assert len(calls) == 10
        assert not any(name.startswith("health ") for name in tasks_seen)
        assert recorder.healthy("198.18.1.11") == [True, False]

    run(scenario)


def test_a_pending_transition_is_announced_fall_minus_one_intervals_ahead() -> None:
    async def scenario() -> None:
        clock = VirtualClock()
        scripted = ScriptedProbe(clock, {B1: lambda now: now < 0.5})
        pending = Recorder(clock=clock)
        transitions = Recorder(clock=clock)
        async with HealthChecker(
            transitions, on_pending=pending, probe=scripted, clock=clock
        ) as checker:
            await checker.update(config(Backend(B1)))
            await clock.advance(1.5)
        (up_ahead, down_ahead) = pending.events
        (up, down) = transitions.events
        assert up_ahead[3].healthy and not down_ahead[3].healthy
        assert up[0] - up_ahead[0] == pytest.approx(INTERVAL * (SPEC.rise - 1))
        assert down[0] - down_ahead[0] == pytest.approx(INTERVAL * (SPEC.fall - 1))
        assert not down[3].healthy

    run(scenario)


def test_a_slow_probe_is_followed_at_once_not_by_a_burst() -> None:
    async def scenario() -> None:
        clock = VirtualClock()
        calls: list[float] = []

        async def slow(
            spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
        ) -> ProbeResult:
            calls.append(clock.now())
            await clock.sleep(2.5 * INTERVAL)
            return ProbeResult(True, "ok", 2.5 * INTERVAL)

        async with HealthChecker(Recorder(), probe=slow, clock=clock) as checker:
            await checker.update(config(Backend(B1)))
            await clock.advance(1.0)
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert gaps and all(gap == pytest.approx(2.5 * INTERVAL) for gap in gaps)

    run(scenario)


@pytest.mark.parametrize("at_once", [False, True], ids=["awaited", "at-once"])
def test_a_raising_probe_counts_as_failed_and_checks_go_on(at_once: bool) -> None:
    async def scenario() -> None:
        clock = VirtualClock()
        calls: list[float] = []

        def broken(
            spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
        ) -> Awaitable[ProbeResult]:
            calls.append(clock.now())
            if at_once:
                raise RuntimeError("probe bug")

            async def later() -> ProbeResult:
                raise RuntimeError("probe bug")

            return later()

        async with HealthChecker(Recorder(), probe=broken, clock=clock) as checker:
            await checker.update(config(Backend(B1), Backend(B2)))
            await clock.advance(1.0)
            record = checker.record("web", "198.18.1.11")
        assert len(calls) == 20
        assert record is not None and record.state is HealthState.DOWN
        assert record.reason == "probe error: RuntimeError: probe bug"

    run(scenario)
