"""The health checker: every backend probed on its own jittered cadence, fed to the policy.

Each backend is probed every ``interval`` seconds and the result handed to its
HealthTracker; the injected ``on_transition`` callback hears of every verdict
change and every reported-weight change, ``on_pending`` of every run that may
end in one (see PendingTransition), and of nothing else.

One timer drives every check. It wakes at the earliest due check and starts
all checks due within ``batch_window`` of it, so checks run up to that much
early, never late, and a thousand checks a second cost a hundred wake-ups, not
a thousand timers, futures and task switches. A probe that knows its verdict at
once (a tcp connect to a near peer) is decided inside the wake-up; the others
run as tasks and the check is queued again when they finish.

First probes are spread over the interval by a jitter derived from the
backend's identity (not random), so a reload or a restart does not fire every
check at once and tests replay the same schedule. The clock and the probe are
injected (Protocols below) so tests can run the checker in virtual time or with
scripted results.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from passlb.errors import ConfigError, ConfigIssue
from passlb.health.policy import (
    HealthEvent,
    HealthRecord,
    HealthState,
    HealthTracker,
    PendingTransition,
    ProbeResult,
    Transition,
)
from passlb.health.probes import start_probe
from passlb.health.target import health_path, health_spec, probe_target
from passlb.logs import log_event
from passlb.model import Config, HealthSpec, HealthType, IPAddress
from passlb.state import HealthStatus

log = logging.getLogger(__name__)

CheckKey = tuple[str, str]  # (service name, backend key), as in HealthView
TransitionCallback = Callable[[str, str, HealthStatus], None]

# Checks due within this many seconds of the earliest share its wake-up.
BATCH_WINDOW = 0.01


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class ProbeFunction(Protocol):
    """A probe: its verdict at once, or an awaitable of it (any ``async def`` probe fits)."""

    def __call__(
        self, spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
    ) -> ProbeResult | Awaitable[ProbeResult]: ...


class LoopClock:
    """The running event loop's monotonic clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class CheckPlan:
    """Everything one backend's probe loop needs; equal plans need no restart."""

    spec: HealthSpec
    address: IPAddress
    port: int
    vip: IPAddress


def first_probe_delay(key: CheckKey, interval: float) -> float:
    """Deterministic jitter in [0, interval): the same backend, the same offset."""
    digest = hashlib.blake2b(f"{key[0]}\0{key[1]}".encode(), digest_size=8).digest()
    # 53 bits: exactly what a float holds, so the fraction stays below 1.0.
    return interval * ((int.from_bytes(digest, "big") >> 11) / 2**53)


def plan_checks(config: Config) -> dict[CheckKey, CheckPlan]:
    """The checks a config asks for.

    Raises ConfigError for a check without a port or with timings that would
    spin or never decide; the config loader should have said so first, but a
    reload must fail before it stops a single check.
    """
    plans: dict[CheckKey, CheckPlan] = {}
    issues: dict[str, ConfigIssue] = {}  # by path: a service's check is shared
    for service in config.services:
        for backend in service.backends:
            spec = health_spec(service, backend)
            for issue in _timing_issues(spec, health_path(service, backend)):
                issues.setdefault(issue.path, issue)
            address, port = probe_target(service, backend)
            plans[(service.name, backend.key)] = CheckPlan(spec, address, port, service.vip)
    if issues:
        raise ConfigError(list(issues.values()))
    return plans


def _timing_issues(spec: HealthSpec, where: str) -> list[ConfigIssue]:
    issues = [
        ConfigIssue(f"{where}.{name}", f"must be positive, got {value}")
        for name, value in (("interval", spec.interval), ("timeout", spec.timeout))
        if not value > 0
    ]
    issues.extend(
        ConfigIssue(f"{where}.{name}", f"must be at least 1, got {value}")
        for name, value in (("rise", spec.rise), ("fall", spec.fall))
        if value < 1
    )
    return issues


class _Check:
    """One probing backend: its plan, its tracker, when it is due next, its probe in flight."""

    __slots__ = ("due", "key", "plan", "task", "tracker")

    def __init__(self, key: CheckKey, plan: CheckPlan, tracker: HealthTracker, due: float) -> None:
        self.key = key
        self.plan = plan
        self.tracker = tracker
        self.due = due
        self.task: asyncio.Task[None] | None = None


class HealthChecker:
    """Runs every backend's checks and keeps their verdicts.

    Use as ``async with HealthChecker(callback) as checker: await checker.update(config)``
    or call ``close()``; both cancel and await every task.

    UNKNOWN backends (no verdict yet) are left out of ``view()``, which is how
    the desired state tells them apart; ``state()`` and ``records()`` show them.
    A ``none`` check is never probed: its backend is UP from the start.
    """

    def __init__(
        self,
        on_transition: TransitionCallback,
        *,
        on_pending: TransitionCallback | None = None,
        probe: ProbeFunction = start_probe,
        clock: Clock | None = None,
        batch_window: float = BATCH_WINDOW,
    ) -> None:
        self._on_transition = on_transition
        self._on_pending = on_pending
        self._probe = probe
        self._clock: Clock = clock if clock is not None else LoopClock()
        self._batch_window = batch_window
        self._plans: dict[CheckKey, CheckPlan] = {}
        self._trackers: dict[CheckKey, HealthTracker] = {}
        self._checks: dict[CheckKey, _Check] = {}  # the probed ones (not type none)
        # (due, tie-breaker, check); entries of stopped checks stay until popped.
        self._queue: list[tuple[float, int, _Check]] = []
        self._order = itertools.count()
        self._timer: asyncio.Task[None] | None = None
        self._timer_due: float | None = None  # when the timer task wakes; None: no task
        self._starting = False  # inside a wake-up: checks queued now are seen by it
        self._updating = asyncio.Lock()  # one reload at a time

    async def __aenter__(self) -> HealthChecker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def update(self, config: Config) -> None:
        """Start, stop and restart checks to match `config`.

        Backends whose check did not change keep their cadence and their state.
        A changed check restarts its cadence but keeps the verdict (with fresh
        counters), so a reload never flaps a backend; a new backend starts
        UNKNOWN; a removed one is forgotten.
        """
        plans = plan_checks(config)
        async with self._updating:
            await self._apply(plans)

    async def _apply(self, plans: dict[CheckKey, CheckPlan]) -> None:
        removed = [key for key in self._plans if key not in plans]
        changed = [key for key, plan in plans.items() if self._plans.get(key, plan) != plan]
        await self._stop([*removed, *changed])
        for key in removed:
            del self._trackers[key]
            del self._plans[key]
        now = self._clock.now()
        for key, plan in plans.items():
            if key in self._plans and key not in changed:
                continue
            tracker = self._trackers.get(key)
            if tracker is None:
                tracker = HealthTracker(
                    key[1], rise=plan.spec.rise, fall=plan.spec.fall, created_at=now
                )
                self._trackers[key] = tracker
            else:
                tracker.retune(rise=plan.spec.rise, fall=plan.spec.fall)
            self._plans[key] = plan
            if plan.spec.type is HealthType.NONE:
                transition = tracker.assume_up(now, "not checked (type none)")
                self._report(key, tracker, () if transition is None else (transition,))
                continue
            check = _Check(key, plan, tracker, now + first_probe_delay(key, plan.spec.interval))
            self._checks[key] = check
            self._queue_check(check, check.due)

    def view(self) -> dict[CheckKey, HealthStatus]:
        """Verdicts of every backend that has one (UNKNOWN ones are absent)."""
        return {
            key: status
            for key, tracker in self._trackers.items()
            if (status := tracker.status()) is not None
        }

    def state(self, service: str, backend_key: str) -> HealthState | None:
        """UNKNOWN, UP or DOWN; None for a backend the checker does not know."""
        tracker = self._trackers.get((service, backend_key))
        return None if tracker is None else tracker.state

    def record(self, service: str, backend_key: str) -> HealthRecord | None:
        """One backend's record; None for a backend the checker does not know."""
        tracker = self._trackers.get((service, backend_key))
        return None if tracker is None else tracker.record()

    def records(self) -> dict[CheckKey, HealthRecord]:
        return {key: tracker.record() for key, tracker in self._trackers.items()}

    async def close(self) -> None:
        await self._stop(list(self._checks))
        timer, self._timer, self._timer_due = self._timer, None, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)

    async def _stop(self, keys: list[CheckKey]) -> None:
        tasks = []
        for key in keys:
            check = self._checks.pop(key, None)
            if check is not None and check.task is not None:
                check.task.cancel()
                tasks.append(check.task)
        for task, outcome in zip(
            tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                log.error("%s ended with an error", task.get_name(), exc_info=outcome)

    # -- the timer ------------------------------------------------------------

    def _queue_check(self, check: _Check, due: float) -> None:
        check.due = due
        heapq.heappush(self._queue, (due, next(self._order), check))
        if self._starting or (self._timer_due is not None and self._timer_due <= due):
            return
        # The timer sleeps past this check (or is not running): start it anew.
        # Rare in a steady state: a check is queued again by its own wake-up.
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.create_task(self._run_timer(), name="health-check timer")

    async def _run_timer(self) -> None:
        while self._queue:
            self._timer_due = wake = self._queue[0][0]
            # Sleep even when late: a wake-up always yields to the loop.
            await self._clock.sleep(max(0.0, wake - self._clock.now()))
            self._start_due(wake + self._batch_window)
        self._timer, self._timer_due = None, None

    def _start_due(self, horizon: float) -> None:
        """Start every check due by `horizon`, each once."""
        due_now = []
        while self._queue and self._queue[0][0] <= horizon:
            _, _, check = heapq.heappop(self._queue)
            if self._checks.get(check.key) is check:  # else stopped or replaced
                due_now.append(check)
        self._starting = True
        try:
            for check in due_now:
                self._start(check)
        finally:
            self._starting = False

    def _start(self, check: _Check) -> None:
        plan = check.plan
        try:
            outcome = self._probe(plan.spec, plan.address, plan.port, vip=plan.vip)
        except Exception as exc:
            outcome = self._probe_failed(check, exc)
        if isinstance(outcome, ProbeResult):
            self._finish(check, outcome)
        else:
            check.task = asyncio.create_task(
                self._await_probe(check, outcome), name=f"health {check.key[0]}/{check.key[1]}"
            )

    async def _await_probe(self, check: _Check, outcome: Awaitable[ProbeResult]) -> None:
        try:
            result = await outcome
        except Exception as exc:
            result = self._probe_failed(check, exc)
        check.task = None
        if self._checks.get(check.key) is check:
            self._finish(check, result)

    def _probe_failed(self, check: _Check, exc: Exception) -> ProbeResult:
        # The probe is injected; its bug must not end this backend's checks.
        log.error("probe of %s/%s raised", *check.key, exc_info=exc)
        return ProbeResult(False, f"probe error: {type(exc).__name__}: {exc}", 0.0)

    def _finish(self, check: _Check, result: ProbeResult) -> None:
        now = self._clock.now()
        self._report(check.key, check.tracker, check.tracker.observe(result, now))
        # A steady cadence from the jittered start; a probe that overran its
        # slot is followed at once, not by a burst of the missed ones.
        self._queue_check(check, max(check.due + check.plan.spec.interval, now))

    def _report(
        self, key: CheckKey, tracker: HealthTracker, events: tuple[HealthEvent, ...]
    ) -> None:
        changed = False
        for event in events:
            if isinstance(event, PendingTransition):
                self._announce(key, tracker, event)
                continue
            changed = True
            if isinstance(event, Transition):
                log_event(
                    log,
                    logging.INFO,
                    "health_transition",
                    service=key[0],
                    backend=key[1],
                    previous=event.previous.value,
                    current=event.current.value,
                    reason=event.reason,
                )
            else:
                log_event(
                    log,
                    logging.INFO,
                    "reported_weight",
                    service=key[0],
                    backend=key[1],
                    previous=event.previous,
                    current=event.current,
                )
        status = tracker.status()
        if not changed or status is None:
            return
        try:
            self._on_transition(key[0], key[1], status)
        except Exception:
            # The callback belongs to the daemon; its failure must not stop this check.
            log.exception("health callback for %s/%s failed", key[0], key[1])

    def _announce(self, key: CheckKey, tracker: HealthTracker, event: PendingTransition) -> None:
        if self._on_pending is None:
            return
        coming = HealthStatus(
            healthy=event.toward is HealthState.UP, weight=tracker.weight, since=event.at
        )
        try:
            self._on_pending(key[0], key[1], coming)
        except Exception:
            log.exception("pending-health callback for %s/%s failed", key[0], key[1])
