"""The reconciler: keeps every driver's data plane equal to the desired state.

Inputs arrive as events (config loaded, health transition, admin change); each
marks the state dirty. The loop coalesces bursts, computes the desired state
once, and hands each driver the services of its mode. It also wakes up for
time-driven changes (drain deadlines, slow-start ramps), resyncs fully every
`resync_interval`, and retries with a full resync after a failed apply.

The loop computes the desired state off the event loop (a worker thread:
Maglev rings take tens of milliseconds each, and health checks must not wait
for them) from a snapshot of the inputs, then diffs it and hands it to the
drivers: a blocking driver's sync (dsr, nat: kernel I/O) in a worker thread,
the others on the loop (Driver.blocking). Applies stay serialised; a computed
state is dropped, and computed again, when another apply went through while
it was being computed, so an older state never overwrites a newer one.

Time comes from an injected clock and sleeper (time.monotonic and
asyncio.sleep by default), so tests run the loop in virtual time
(health.testing.VirtualClock).

A health change announced ahead (``prepare``: a backend's first failed check
of the ``fall`` it takes to go down) gets its rings built in the background
meanwhile, so the change itself applies without building any.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from passlb.control.desired import (
    compute_desired,
    cut_removals,
    diff_desired,
    update_drain_starts,
    update_removed,
)
from passlb.dataplane.base import Driver, Repairs, describe_repairs
from passlb.errors import PasslbError
from passlb.model import MAX_WEIGHT, MIN_WEIGHT, AdminState, Config, Mode
from passlb.state import BackendRole, DesiredState, HealthStatus, HealthView, RemovedBackend

log = logging.getLogger("passlb.reconciler")

Clock = Callable[[], float]
# Waits on `clock`'s time (asyncio.sleep for time.monotonic; a virtual clock's in tests).
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")
# Runs a pure computation away from the event loop (asyncio.to_thread by default).
OffLoop = Callable[[Callable[[], T]], Awaitable[T]]


async def in_thread(work: Callable[[], T]) -> T:
    return await asyncio.to_thread(work)


@dataclass
class ApplyRecord:
    at: float  # wall-clock time
    duration: float
    full: bool
    changes: str  # a one-line summary of the diff
    error: str | None = None
    compute_duration: float = 0.0  # desired-state computation, Maglev ring builds included
    # What a full resync found changed in the data plane and put back (ApplyResult.repairs).
    repairs: Repairs = field(default_factory=dict)


@dataclass
class ReconcilerStats:
    applies: int = 0
    apply_failures: int = 0
    last_apply: ApplyRecord | None = None
    history: list[ApplyRecord] = field(default_factory=list)


def with_admin_overrides(
    config: Config,
    overrides: Mapping[tuple[str, str], AdminState],
    weights: Mapping[tuple[str, str], int] | None = None,
) -> Config:
    """The config with runtime admin states (drain/enable/disable) and weights applied."""
    if not overrides and not weights:
        return config
    weights = weights or {}
    services = []
    for svc in config.services:
        backends = tuple(
            dataclasses.replace(
                b,
                admin=overrides.get((svc.name, b.key), b.admin),
                weight=weights.get((svc.name, b.key), b.weight),
            )
            for b in svc.backends
        )
        services.append(dataclasses.replace(svc, backends=backends))
    return dataclasses.replace(config, services=tuple(services))


def assume_all_healthy(config: Config) -> dict[tuple[str, str], HealthStatus]:
    """Every backend healthy: what `explain` asks about, and what a starting
    daemon assumes until checks say otherwise (so a restart never empties the
    ring it adopts from the kernel)."""
    return {
        (s.name, b.key): HealthStatus(healthy=True) for s in config.services for b in s.backends
    }


def split_by_mode(state: DesiredState) -> dict[Mode, DesiredState]:
    by_mode: dict[Mode, DesiredState] = {}
    for mode in Mode:
        services = tuple(s for s in state.services if s.service.mode is mode)
        by_mode[mode] = DesiredState(services=services)
    return by_mode


def next_wakeup(state: DesiredState, now: float, slow_start_tick: float = 1.0) -> float | None:
    """When the desired state changes by itself: a drain deadline, or a weight ramp."""
    times: list[float] = []
    for svc in state.services:
        for b in svc.backends:
            if b.role is BackendRole.DRAINING and b.drain_deadline is not None and not b.cut_flows:
                times.append(b.drain_deadline)
        if svc.service.health.slow_start > 0 and any(
            b.role is BackendRole.ACTIVE for b in svc.backends
        ):
            times.append(now + slow_start_tick)
    return min(times) if times else None


def _apply_error(err: Exception) -> str:
    """The error text of a failed apply; a bug (not a PasslbError) is logged with its
    traceback, and must not end the reconciler: the next apply is a full one."""
    if isinstance(err, PasslbError):
        return str(err)
    log.error("apply raised", exc_info=err)
    return f"internal error: {err!r}"


class Reconciler:
    def __init__(
        self,
        config: Config,
        drivers: Mapping[Mode, Driver],
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        resync_interval: float = 300.0,  # a full resync re-reads every ring from the kernel
        retry_delay: float = 1.0,
        coalesce_delay: float = 0.005,
        on_apply: Callable[[ApplyRecord], None] | None = None,
        off_loop: OffLoop[DesiredState] = in_thread,
    ) -> None:
        self.config = config
        self.drivers = drivers
        self.clock = clock
        self.sleep = sleep
        self.resync_interval = resync_interval
        self.retry_delay = retry_delay
        self.coalesce_delay = coalesce_delay
        self.health: dict[tuple[str, str], HealthStatus] = {}
        self.admin_overrides: dict[tuple[str, str], AdminState] = {}
        self.weight_overrides: dict[tuple[str, str], int] = {}
        self.on_apply = on_apply
        self.off_loop = off_loop
        self.drain_starts: dict[tuple[str, str], float] = {}
        # Backends gone from the config whose flows still drain (desired.py, rule 8).
        self.removed: dict[tuple[str, str], RemovedBackend] = {}
        self.applied: DesiredState | None = None
        self.desired: DesiredState | None = None
        self.stats = ReconcilerStats()
        self._dirty = asyncio.Event()
        self._need_full = True
        self._applies_done = 0  # tells an off-loop computation whether it was overtaken
        # Announced health changes whose rings to build ahead, latest status wins.
        self._to_prepare: dict[tuple[str, str], HealthStatus] = {}
        self._prepare_wanted = asyncio.Event()
        self._note_drains()

    # -- inputs ---------------------------------------------------------------

    def set_config(self, config: Config) -> None:
        """Take a validated config; unchanged services keep their flows (diff apply),
        removed backends drain."""
        before = self.effective_config()
        self.config = config
        live = {(s.name, b.key) for s in config.services for b in s.backends}
        for overrides in (self.admin_overrides, self.weight_overrides):
            for gone in [k for k in overrides if k not in live]:
                del overrides[gone]
        self.removed = update_removed(
            before, self.effective_config(), self.removed, self.drain_starts, self.clock()
        )
        self._note_drains()
        self._dirty.set()

    def set_health(self, service: str, backend: str, status: HealthStatus) -> None:
        self.health[(service, backend)] = status
        self._dirty.set()

    def prepare(self, service: str, backend: str, status: HealthStatus) -> None:
        """A health change that may come soon: build the rings it would need now,
        in the background (while ``run`` runs), so that ``set_health`` applies it
        without building any. Best effort: nothing is applied."""
        known = self.health.get((service, backend))
        if known is not None and known.healthy == status.healthy:
            return
        self._to_prepare[(service, backend)] = status
        self._prepare_wanted.set()

    def replace_health(self, view: HealthView) -> None:
        self.health = dict(view)
        self._dirty.set()

    def set_admin(self, service: str, backend: str, state: AdminState) -> None:
        """A runtime admin change; raises KeyError when there is no such backend."""
        self._check_changeable(service, backend)
        self.admin_overrides[(service, backend)] = state
        self._note_drains()
        self._dirty.set()

    def set_weight(self, service: str, backend: str, weight: int) -> None:
        """A runtime weight, kept until a reload drops the backend.

        Raises KeyError when there is no such backend, ValueError for a weight
        outside the config's bounds; either way nothing changes.
        """
        self._check_changeable(service, backend)
        if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise ValueError(f"must be between {MIN_WEIGHT} and {MAX_WEIGHT}, got {weight}")
        self.weight_overrides[(service, backend)] = weight
        self._dirty.set()

    def check_names(self, service: str, backend: str | None) -> None:
        """KeyError naming the field ("service: …" or "backend: …") when there
        is no such service, or no such backend in it (backend None: not asked)."""
        svc = self.config.service(service)
        if svc is None:
            raise KeyError(f"service: no service {service!r}")
        draining = (service, backend) in self.removed  # known until its drain ends
        if backend is not None and svc.backend(backend) is None and not draining:
            raise KeyError(f"backend: no backend {backend!r} in service {service!r}")

    def _check_changeable(self, service: str, backend: str) -> None:
        """check_names, and a removed backend (still draining) is refused too."""
        self.check_names(service, backend)
        if (service, backend) in self.removed:
            raise KeyError(
                f"backend: {backend!r} was removed from service {service!r} and drains; "
                "to keep it, list it in the config again and reload"
            )

    def request_full_resync(self) -> None:
        self._need_full = True
        self._dirty.set()

    def effective_config(self) -> Config:
        return with_admin_overrides(self.config, self.admin_overrides, self.weight_overrides)

    def _note_drains(self) -> None:
        self.drain_starts = update_drain_starts(
            self.effective_config(), self.drain_starts, self.clock()
        )

    # -- applying -------------------------------------------------------------

    def compute(self) -> DesiredState:
        return self._computation()()

    def _computation(
        self, config: Config | None = None, health: HealthView | None = None
    ) -> Callable[[], DesiredState]:
        """compute_desired over copies of the inputs: safe to call from another thread."""
        return functools.partial(
            compute_desired,
            self.effective_config() if config is None else config,
            dict(self.health if health is None else health),
            dict(self.drain_starts),
            self.clock(),
            removed=dict(self.removed),
        )

    def apply_once(self, *, full: bool = False) -> ApplyRecord:
        """Compute the desired state and push it to every driver, all in the calling
        thread (for tools and tests without an event loop). Never raises."""
        started = time.perf_counter()
        desired = self.compute()
        compute_duration = time.perf_counter() - started
        full = self._begin(desired, full)
        found: Repairs = {}
        try:
            for driver, part in self._parts(desired):
                found.update(driver.sync(part, full=full).repairs)
        except Exception as err:
            return self._finish(desired, full, started, compute_duration, _apply_error(err))
        return self._finish(desired, full, started, compute_duration, None, found)

    async def apply_off_loop(self, *, full: bool = False) -> ApplyRecord | None:
        """Compute the desired state off the event loop and push it to every
        driver, a blocking driver's sync in a worker thread (Driver.blocking).
        None (and the state marked dirty) when another apply went through while
        computing: the state computed here is older than what the drivers hold
        by now. Never raises."""
        computation = self._computation()
        applies_before = self._applies_done
        started = time.perf_counter()
        desired = await self.off_loop(computation)
        compute_duration = time.perf_counter() - started
        if self._applies_done != applies_before:
            self._dirty.set()
            return None
        full = self._begin(desired, full)
        found: Repairs = {}
        try:
            for driver, part in self._parts(desired):
                if driver.blocking:
                    result = await asyncio.to_thread(driver.sync, part, full=full)
                else:
                    result = driver.sync(part, full=full)
                found.update(result.repairs)
        except Exception as err:
            return self._finish(desired, full, started, compute_duration, _apply_error(err))
        return self._finish(desired, full, started, compute_duration, None, found)

    def _begin(self, desired: DesiredState, full: bool) -> bool:
        """Take `desired` as the state being applied; whether the apply is full."""
        self._applies_done += 1
        self.desired = desired
        return full or self._need_full

    def _parts(self, desired: DesiredState) -> list[tuple[Driver, DesiredState]]:
        """Each driver with the services of its mode; PasslbError for a mode without one."""
        parts = []
        for mode, part in split_by_mode(desired).items():
            driver = self.drivers.get(mode)
            if driver is None:
                if part.services:
                    raise PasslbError(f"no {mode} driver on this machine")
                continue
            parts.append((driver, part))
        return parts

    def _finish(
        self,
        desired: DesiredState,
        full: bool,
        started: float,
        compute_duration: float,
        error: str | None,
        repaired: Repairs | None = None,
    ) -> ApplyRecord:
        """Record an apply (what changed, how long, whether it failed) and log it."""
        changes = str(diff_desired(self.applied, desired))
        record = ApplyRecord(
            at=time.time(),
            duration=time.perf_counter() - started,
            full=full,
            changes=changes,
            error=error,
            compute_duration=compute_duration,
            repairs=repaired or {},
        )
        self.stats.applies += 1
        self.stats.last_apply = record
        self.stats.history = [*self.stats.history[-49:], record]
        if error is None and record.repairs:
            log.warning(
                "resync repaired drift: the data plane had changed behind passlb: %s",
                describe_repairs(record.repairs),
            )
        if error is None:
            self.applied = desired
            self._need_full = False
            # Removed backends whose flows are now cut have nothing left to drain:
            # the next apply leaves them out.
            for done in cut_removals(desired):
                if self.removed.pop(done, None) is not None:
                    self._dirty.set()
            log.info(
                "apply ok full=%s duration_ms=%.1f changes=%s",
                full,
                record.duration * 1000,
                changes,
            )
        else:
            self.stats.apply_failures += 1
            self._need_full = True
            log.error("apply failed full=%s error=%s", full, error)
        if self.on_apply is not None:
            self.on_apply(record)
        return record

    async def run(self) -> None:
        """Apply on every change, at deadlines, periodically; retry after failures."""
        preparer = asyncio.create_task(self._prepare_rings(), name="ring preparer")
        try:
            await self._reconcile()
        finally:
            preparer.cancel()
            await asyncio.gather(preparer, return_exceptions=True)

    async def _reconcile(self) -> None:
        last_full = self.clock()
        self._dirty.set()
        while True:
            now = self.clock()
            wake = [last_full + self.resync_interval]
            if self.desired is not None and (t := next_wakeup(self.desired, now)) is not None:
                wake.append(t)
            if await self._dirty_within(max(0.0, min(wake) - now)):
                await self.sleep(self.coalesce_delay)  # let a burst of events settle
            self._dirty.clear()
            # A millisecond early counts as due: now + (due - now) may round below
            # `due`, and a resync missed by rounding would wake the loop at once, again.
            full = self.clock() >= last_full + self.resync_interval - 0.001
            record = await self.apply_off_loop(full=full)
            if record is None:
                continue
            if record.full and record.error is None:
                last_full = self.clock()
            if record.error is not None:
                await self.sleep(self.retry_delay)
                self._dirty.set()

    async def _dirty_within(self, timeout: float) -> bool:
        """Wait until the state is dirty (True) or `timeout` passed on the
        reconciler's sleeper (False): the sleeper, not the loop's timer, so that
        tests can run the reconciler in virtual time."""
        if self._dirty.is_set():
            return True
        dirty = asyncio.ensure_future(self._dirty.wait())
        timer = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait((dirty, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (dirty, timer):
                waiter.cancel()
            await asyncio.gather(dirty, timer, return_exceptions=True)
        return self._dirty.is_set()

    async def _prepare_rings(self) -> None:
        """Build, one service at a time and off the loop, the rings that the
        announced health changes would need; the desired state's ring cache
        keeps them for the apply."""
        while True:
            await self._prepare_wanted.wait()
            self._prepare_wanted.clear()
            while self._to_prepare:
                (name, key), status = self._to_prepare.popitem()
                config = self.effective_config()
                service = config.service(name)
                if service is None:
                    continue
                alone = dataclasses.replace(config, services=(service,))
                coming = {**self.health, (name, key): status}
                try:
                    await self.off_loop(self._computation(alone, coming))
                except Exception:
                    # Only a head start is lost: the apply computes what it needs.
                    log.exception("building the rings ahead for %s/%s failed", name, key)
