"""The reconciler against a recording driver: what reaches the data plane, and when."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from ipaddress import ip_address

import pytest

from passlb.control.reconciler import Reconciler, assume_all_healthy, in_thread, next_wakeup
from passlb.dataplane.base import ApplyResult, Flow, ServiceCounters
from passlb.errors import DataplaneError
from passlb.health.testing import VirtualClock
from passlb.model import (
    AdminState,
    Backend,
    Config,
    HealthSpec,
    HealthType,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import BackendRole, DesiredState, HealthStatus


class RecordingDriver:
    """A Driver that remembers every sync and can be told to fail."""

    name = "recording"
    blocking = False

    def __init__(self) -> None:
        self.syncs: list[tuple[DesiredState, bool]] = []
        self.fail_next = 0

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        if self.fail_next:
            self.fail_next -= 1
            raise DataplaneError("kernel said no")
        self.syncs.append((desired, full))
        return ApplyResult(full=full, operations=1, duration=0.0)

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        return {}

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        return []

    def close(self, *, cleanup: bool = False) -> None:
        pass


class Clock(VirtualClock):
    """Virtual time for the reconciler: its clock (called) and its sleeper; time
    moves only by ``advance`` (or by setting ``now`` in the tests that need no loop)."""

    def __init__(self) -> None:
        super().__init__(start=1000.0)

    def __call__(self) -> float:
        return self._now

    @property  # type: ignore[override]
    def now(self) -> float:
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        self._now = value


async def inline(work: Callable[[], DesiredState]) -> DesiredState:
    """The off-loop computation run on the loop: deterministic in virtual time."""
    return work()


def service(name: str, mode: Mode, *addresses: str, drain_timeout: float = 10.0) -> Service:
    return Service(
        name=name,
        vip=ip_address("198.18.0.10"),
        protocol=Protocol.TCP,
        ports=PortSet((PortRange(443, 443),)),
        mode=mode,
        backends=tuple(Backend(ip_address(a)) for a in addresses),
        health=HealthSpec(type=HealthType.NONE),
        ring_size=1009,
        drain_timeout=drain_timeout,
    )


def make(
    *services: Service, drivers: dict[Mode, RecordingDriver] | None = None
) -> tuple[Reconciler, dict[Mode, RecordingDriver], Clock]:
    config = Config(services=services)
    drivers = drivers or {Mode.DSR: RecordingDriver()}
    clock = Clock()
    rec = Reconciler(
        config, drivers, clock=clock, sleep=clock.sleep, off_loop=inline, retry_delay=1.0
    )
    rec.replace_health(assume_all_healthy(config))
    return rec, drivers, clock


@asynccontextmanager
async def running(rec: Reconciler) -> AsyncIterator[None]:
    """rec.run() as a task for the block; cancelled (and awaited) at its end."""
    task = asyncio.create_task(rec.run())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def roles(state: DesiredState, name: str) -> dict[str, BackendRole]:
    sd = state.service(name)
    assert sd is not None
    return {b.key: b.role for b in sd.backends}


def test_first_apply_is_full_then_deltas() -> None:
    rec, drivers, _ = make(service("web", Mode.DSR, "198.18.2.11", "198.18.2.12"))
    assert rec.apply_once().error is None
    rec.set_health("web", "198.18.2.12", HealthStatus(healthy=False))
    assert rec.apply_once().error is None
    (_, first_full), (second, second_full) = drivers[Mode.DSR].syncs
    assert (first_full, second_full) == (True, False)
    assert roles(second, "web")["198.18.2.12"] is BackendRole.DOWN


def test_each_driver_gets_only_its_services() -> None:
    drivers = {Mode.DSR: RecordingDriver(), Mode.PROXY: RecordingDriver()}
    rec, _, _ = make(
        service("a", Mode.DSR, "198.18.2.11"),
        dataclasses.replace(
            service("b", Mode.PROXY, "198.18.2.12"), ports=PortSet((PortRange(80, 80),))
        ),
        drivers=drivers,
    )
    rec.apply_once()
    assert [s.service.name for s in drivers[Mode.DSR].syncs[0][0].services] == ["a"]
    assert [s.service.name for s in drivers[Mode.PROXY].syncs[0][0].services] == ["b"]


def test_a_mode_without_driver_fails_the_apply_by_name() -> None:
    rec, _, _ = make(service("n", Mode.NAT, "198.18.2.11"))
    record = rec.apply_once()
    assert record.error == "no nat driver on this machine"
    assert rec.stats.apply_failures == 1


def test_failure_keeps_applied_state_and_forces_full_retry() -> None:
    rec, drivers, _ = make(service("web", Mode.DSR, "198.18.2.11", "198.18.2.12"))
    rec.apply_once()
    applied = rec.applied
    drivers[Mode.DSR].fail_next = 1
    rec.set_health("web", "198.18.2.11", HealthStatus(healthy=False))
    failed = rec.apply_once()
    assert failed.error == "kernel said no"
    assert rec.applied is applied  # what the kernel still has
    assert rec.apply_once().full  # the retry rewrites everything


def test_drain_gets_deadline_then_cuts_flows() -> None:
    rec, _, clock = make(service("web", Mode.DSR, "198.18.2.11", "198.18.2.12", drain_timeout=5))
    rec.set_admin("web", "198.18.2.11", AdminState.DRAIN)
    state = rec.compute()
    sd = state.service("web")
    assert sd is not None
    drained = sd.backend("198.18.2.11")
    assert drained is not None
    assert drained.role is BackendRole.DRAINING
    assert drained.drain_deadline == clock.now + 5
    assert not drained.cut_flows
    assert next_wakeup(state, clock.now) == clock.now + 5
    clock.now += 5
    later = rec.compute().service("web")
    assert later is not None
    cut = later.backend("198.18.2.11")
    assert cut is not None and cut.cut_flows


def test_enable_ends_the_drain() -> None:
    rec, _, _ = make(service("web", Mode.DSR, "198.18.2.11", "198.18.2.12"))
    rec.set_admin("web", "198.18.2.11", AdminState.DRAIN)
    rec.set_admin("web", "198.18.2.11", AdminState.ENABLED)
    assert rec.drain_starts == {}
    assert roles(rec.compute(), "web")["198.18.2.11"] is BackendRole.ACTIVE


def test_admin_change_for_unknown_backend_is_refused() -> None:
    rec, _, _ = make(service("web", Mode.DSR, "198.18.2.11"))
    with pytest.raises(
        KeyError, match=re.escape("backend: no backend '198.18.2.99' in service 'web'")
    ):
        rec.set_admin("web", "198.18.2.99", AdminState.DRAIN)
    with pytest.raises(KeyError, match=re.escape("service: no service 'nope'")):
        rec.set_admin("nope", "198.18.2.11", AdminState.DRAIN)
    assert rec.admin_overrides == {}


def test_new_config_forgets_overrides_of_removed_backends() -> None:
    rec, _, _ = make(service("web", Mode.DSR, "198.18.2.11", "198.18.2.12"))
    rec.set_admin("web", "198.18.2.11", AdminState.DISABLED)
    rec.set_admin("web", "198.18.2.12", AdminState.DRAIN)
    rec.set_config(Config(services=(service("web", Mode.DSR, "198.18.2.12"),)))
    assert set(rec.admin_overrides) == {("web", "198.18.2.12")}


async def test_run_coalesces_a_burst_into_few_applies() -> None:
    rec, drivers, clock = make(service("web", Mode.DSR, *(f"198.18.2.{i}" for i in range(11, 21))))
    rec.coalesce_delay = 0.05
    async with running(rec):
        await clock.advance(0.05)  # the start-up apply
        for i in range(11, 21):
            rec.set_health("web", f"198.18.2.{i}", HealthStatus(healthy=i % 2 == 0))
            await clock.advance(0.001)  # a burst: each within the coalescing delay
        await clock.advance(0.1)
        syncs = list(drivers[Mode.DSR].syncs)
        await clock.advance(rec.resync_interval - 1)  # nothing more until the resync
        assert drivers[Mode.DSR].syncs == syncs
    assert len(syncs) == 2  # start-up + one for the whole burst
    assert sum(r is BackendRole.ACTIVE for r in roles(syncs[-1][0], "web").values()) == 5


async def test_run_retries_after_a_failure_and_resyncs_on_time() -> None:
    rec, drivers, clock = make(service("web", Mode.DSR, "198.18.2.11"))
    drivers[Mode.DSR].fail_next = 2
    async with running(rec):
        await clock.advance(0.5)
        assert rec.stats.apply_failures == 1 and not drivers[Mode.DSR].syncs
        await clock.advance(1.0)  # retry_delay later: the second failure
        assert rec.stats.apply_failures == 2 and not drivers[Mode.DSR].syncs
        await clock.advance(1.0)
        assert [full for _, full in drivers[Mode.DSR].syncs] == [True]
        await clock.advance(rec.resync_interval - 1)
        assert len(drivers[Mode.DSR].syncs) == 1
        await clock.advance(1.0)  # the periodic full resync
        assert [full for _, full in drivers[Mode.DSR].syncs] == [True, True]


def test_an_unexpected_driver_exception_is_a_failed_apply_not_a_crash() -> None:
    rec, drivers, _ = make(service("web", Mode.DSR, "198.18.2.11"))

    def broken(desired: DesiredState, *, full: bool = False) -> ApplyResult:
        raise RuntimeError("bug")

    drivers[Mode.DSR].sync = broken  # type: ignore[method-assign]
    record = rec.apply_once()
    assert record.error == "internal error: RuntimeError('bug')"
    assert rec.stats.apply_failures == 1 and rec.applied is None


class GatedOffLoop:
    """Runs each computation once the test opens the gate; keeps the results."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = 0
        self.results: list[DesiredState] = []

    async def __call__(self, work: Callable[[], DesiredState]) -> DesiredState:
        self.started += 1
        await self.gate.wait()
        result = work()
        self.results.append(result)
        return result


async def test_the_default_off_loop_runs_the_work_in_another_thread() -> None:
    assert await in_thread(threading.get_ident) != threading.get_ident()


async def test_an_apply_computed_off_loop_never_overwrites_a_newer_one() -> None:
    rec, drivers, _ = make(service("web", Mode.DSR, "198.18.2.11", "198.18.2.12"))
    off_loop = GatedOffLoop()
    rec.off_loop = off_loop
    rec.apply_once()
    off_loop.gate.clear()
    slow = asyncio.create_task(rec.apply_off_loop())  # snapshots: both healthy
    await asyncio.sleep(0)
    assert off_loop.started == 1
    rec.set_health("web", "198.18.2.11", HealthStatus(healthy=False))
    newer = rec.apply_once()  # an apply that overtakes the one in flight
    off_loop.gate.set()
    assert await slow is None
    assert rec.applied is not None
    assert roles(rec.applied, "web")["198.18.2.11"] is BackendRole.DOWN
    syncs = drivers[Mode.DSR].syncs
    assert len(syncs) == 2 and roles(syncs[-1][0], "web")["198.18.2.11"] is BackendRole.DOWN
    assert rec.stats.last_apply is newer
    assert rec._dirty.is_set()  # computed again on the next turn of run()


async def test_run_applies_what_it_computed_off_loop() -> None:
    rec, drivers, clock = make(service("web", Mode.DSR, "198.18.2.11", "198.18.2.12"))
    off_loop = GatedOffLoop()
    rec.off_loop = off_loop
    async with running(rec):
        await clock.advance(0.1)
        rec.set_health("web", "198.18.2.12", HealthStatus(healthy=False))
        await clock.advance(0.1)
    syncs = drivers[Mode.DSR].syncs
    assert [desired for desired, _ in syncs] == off_loop.results
    assert roles(syncs[-1][0], "web")["198.18.2.12"] is BackendRole.DOWN


async def test_an_announced_change_has_its_ring_built_before_it_happens() -> None:
    web = dataclasses.replace(
        service("web", Mode.DSR, *(f"198.18.2.{i}" for i in range(11, 14))), ring_size=1019
    )
    rec, _, clock = make(web)
    off_loop = GatedOffLoop()
    rec.off_loop = off_loop
    async with running(rec):
        await clock.advance(0.1)
        computed = len(off_loop.results)
        # Already healthy: nothing to prepare.
        rec.prepare("web", "198.18.2.12", HealthStatus(healthy=True))
        await clock.advance(0.05)
        assert len(off_loop.results) == computed
        rec.prepare("web", "198.18.2.12", HealthStatus(healthy=False))
        await clock.advance(0.05)
        (prepared,) = off_loop.results[computed:]
        assert rec.applied is not None and roles(rec.applied, "web")["198.18.2.12"] is (
            BackendRole.ACTIVE
        )  # prepared, not applied
        rec.set_health("web", "198.18.2.12", HealthStatus(healthy=False))
        await clock.advance(0.05)
    assert rec.applied is not None
    assert roles(rec.applied, "web")["198.18.2.12"] is BackendRole.DOWN
    applied, ahead = rec.applied.service("web"), prepared.service("web")
    assert applied is not None and ahead is not None and applied.ring is not None
    assert applied.ring is ahead.ring  # the very ring built ahead, from the cache


async def test_a_blocking_driver_syncs_in_a_worker_thread_and_the_others_on_the_loop() -> None:
    threads: dict[str, int] = {}

    class ThreadNoting(RecordingDriver):
        def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
            threads[self.name] = threading.get_ident()
            return super().sync(desired, full=full)

    kernel, proxy = ThreadNoting(), ThreadNoting()
    kernel.name, kernel.blocking, proxy.name = "kernel", True, "proxy"
    rec, _, _ = make(
        service("a", Mode.DSR, "198.18.2.11"),
        dataclasses.replace(
            service("b", Mode.PROXY, "198.18.2.12"), ports=PortSet((PortRange(80, 80),))
        ),
        drivers={Mode.DSR: kernel, Mode.PROXY: proxy},
    )
    record = await rec.apply_off_loop(full=True)
    assert record is not None and record.error is None
    assert threads["proxy"] == threading.get_ident() != threads["kernel"]


def test_a_removed_backend_drains_is_cut_at_its_deadline_then_leaves() -> None:
    web = service("web", Mode.DSR, "198.18.2.11", "198.18.2.12", drain_timeout=5)
    rec, drivers, clock = make(web)
    rec.apply_once()
    rec.set_config(Config(services=(service("web", Mode.DSR, "198.18.2.11", drain_timeout=5),)))
    with pytest.raises(KeyError, match="removed from service 'web' and drains"):
        rec.set_admin("web", "198.18.2.12", AdminState.ENABLED)
    rec.apply_once()
    draining = drivers[Mode.DSR].syncs[-1][0].service("web")
    assert draining is not None
    gone = draining.backend("198.18.2.12")
    assert gone is not None and gone.removed and not gone.cut_flows
    assert gone.drain_deadline == clock.now + 5
    assert next_wakeup(draining_state := drivers[Mode.DSR].syncs[-1][0], clock.now) == clock.now + 5
    assert draining_state.service("web") is draining
    clock.now += 5
    rec.apply_once()
    cut = drivers[Mode.DSR].syncs[-1][0].service("web")
    assert cut is not None
    assert (cut_backend := cut.backend("198.18.2.12")) is not None and cut_backend.cut_flows
    assert rec.removed == {}  # the cut is applied: nothing is left to drain
    rec.apply_once()
    after = drivers[Mode.DSR].syncs[-1][0].service("web")
    assert after is not None and [b.key for b in after.backends] == ["198.18.2.11"]


def test_listing_a_removed_backend_again_cancels_its_drain() -> None:
    web = service("web", Mode.DSR, "198.18.2.11", "198.18.2.12", drain_timeout=5)
    rec, drivers, clock = make(web)
    rec.apply_once()
    rec.set_config(Config(services=(service("web", Mode.DSR, "198.18.2.11", drain_timeout=5),)))
    rec.apply_once()
    clock.now += 1
    rec.set_config(Config(services=(web,)))
    clock.now += 10
    rec.apply_once()
    assert rec.removed == {}
    for state, _ in drivers[Mode.DSR].syncs:
        sd = state.service("web")
        assert sd is not None
        assert not any(b.cut_flows or b.cut_udp for b in sd.backends)
    assert roles(drivers[Mode.DSR].syncs[-1][0], "web")["198.18.2.12"] is BackendRole.ACTIVE
