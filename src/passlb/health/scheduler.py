"""The health checker: one asyncio task per (service, backend), fed to the policy.

Each task probes its backend every ``interval`` seconds and hands the result to
the backend's HealthTracker; the injected ``on_transition`` callback hears of
every verdict change and every reported-weight change, and of nothing else.

First probes are spread over the interval by a jitter derived from the
backend's identity (not random), so a reload or a restart does not fire every
check at once and tests replay the same schedule. The clock and the probe are
injected (Protocols below) so tests can run the checker in virtual time or with
scripted results.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from passlb.control.desired import HealthStatus
from passlb.errors import ConfigError, ConfigIssue
from passlb.health.policy import (
    HealthEvent,
    HealthRecord,
    HealthState,
    HealthTracker,
    ProbeResult,
    Transition,
)
from passlb.health.probes import probe as run_probe
from passlb.health.target import health_path, health_spec, probe_target
from passlb.logs import log_event
from passlb.model import Config, HealthSpec, HealthType, IPAddress

log = logging.getLogger(__name__)

CheckKey = tuple[str, str]  # (service name, backend key), as in HealthView
TransitionCallback = Callable[[str, str, HealthStatus], None]


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class ProbeFunction(Protocol):
    async def __call__(
        self, spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
    ) -> ProbeResult: ...


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


class HealthChecker:
    """Runs every backend's checks and keeps their verdicts.

    Use as ``async with HealthChecker(callback) as checker: await checker.update(config)``
    or call ``close()``; both cancel and await every task.

    UNKNOWN backends (no verdict yet) are left out of ``view()``, which is how
    the desired state tells them apart; ``state()`` and ``records()`` show them.
    A ``none`` check runs no task: its backend is UP from the start.
    """

    def __init__(
        self,
        on_transition: TransitionCallback,
        *,
        probe: ProbeFunction = run_probe,
        clock: Clock | None = None,
    ) -> None:
        self._on_transition = on_transition
        self._probe = probe
        self._clock: Clock = clock if clock is not None else LoopClock()
        self._plans: dict[CheckKey, CheckPlan] = {}
        self._trackers: dict[CheckKey, HealthTracker] = {}
        self._tasks: dict[CheckKey, asyncio.Task[None]] = {}
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

        Backends whose check did not change keep their task and their state.
        A changed check restarts its task but keeps the verdict (with fresh
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
            self._tasks[key] = asyncio.create_task(
                self._run(key, plan, tracker), name=f"health {key[0]}/{key[1]}"
            )

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
        await self._stop(list(self._tasks))

    async def _stop(self, keys: list[CheckKey]) -> None:
        tasks = [task for key in keys if (task := self._tasks.pop(key, None)) is not None]
        for task in tasks:
            task.cancel()
        for task, outcome in zip(
            tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                log.error("%s ended with an error", task.get_name(), exc_info=outcome)

    async def _run(self, key: CheckKey, plan: CheckPlan, tracker: HealthTracker) -> None:
        interval = plan.spec.interval
        for due in self._schedule(key, interval):
            delay = due - self._clock.now()
            if delay > 0:
                await self._clock.sleep(delay)
            result = await self._probe(plan.spec, plan.address, plan.port, vip=plan.vip)
            self._report(key, tracker, tracker.observe(result, self._clock.now()))

    def _schedule(self, key: CheckKey, interval: float) -> Iterator[float]:
        # A steady cadence from the jittered start; a probe that overran its
        # slot is followed at once, not by a burst of the missed ones.
        due = self._clock.now() + first_probe_delay(key, interval)
        while True:
            yield due
            due = max(due + interval, self._clock.now())

    def _report(
        self, key: CheckKey, tracker: HealthTracker, events: tuple[HealthEvent, ...]
    ) -> None:
        if not events:
            return
        status = tracker.status()
        if status is None:
            return
        for event in events:
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
        try:
            self._on_transition(key[0], key[1], status)
        except Exception:
            # The callback belongs to the daemon; its failure must not stop this check.
            log.exception("health callback for %s/%s failed", key[0], key[1])
