"""What the daemon remembers for operators: recent events, rates, timing histograms.

Pure values fed by the daemon (no I/O, no clock of their own): the API, the
status page and /metrics read them.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from passlb.dataplane.base import BackendCounters, ServiceCounters

EVENT_CAPACITY = 256

# Seconds; applies run from sub-millisecond deltas to ~1 s full 65537-slot writes.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EventLog:
    """A bounded ring of recent events; each gets an increasing ``seq``.

    Readers poll with the last seq they saw and get only newer events.
    """

    def __init__(self, capacity: int = EVENT_CAPACITY) -> None:
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._seq = 0

    def add(self, at: float, kind: str, message: str, **fields: object) -> dict[str, Any]:
        self._seq += 1
        event: dict[str, Any] = {"seq": self._seq, "at": at, "kind": kind, "message": message}
        event.update(fields)
        self._events.append(event)
        return event

    def since(self, seq: int = 0) -> list[dict[str, Any]]:
        return [e for e in self._events if e["seq"] > seq]

    @property
    def last_seq(self) -> int:
        return self._seq


@dataclass(frozen=True)
class Rates:
    """Per-second rates between two counter reads."""

    packets: float = 0.0
    bytes: float = 0.0
    new_flows: float = 0.0


class RateTracker:
    """Rates from successive counter reads of the data plane.

    A counter that went down (a driver restarted its counters, a backend was
    re-created) gives rate 0 for that interval rather than a negative one.
    """

    def __init__(self) -> None:
        self._previous: tuple[float, dict[tuple[str, str], BackendCounters]] | None = None
        self._rates: dict[tuple[str, str], Rates] = {}

    def observe(self, now: float, counters: Mapping[str, ServiceCounters]) -> None:
        current = {
            (service, key): c
            for service, svc in counters.items()
            for key, c in svc.backends.items()
        }
        if self._previous is not None:
            then, before = self._previous
            elapsed = now - then
            if elapsed <= 0:
                return
            self._rates = {
                key: _rates(before.get(key, BackendCounters()), c, elapsed)
                for key, c in current.items()
            }
        self._previous = (now, current)

    def rates(self, service: str, backend: str) -> Rates:
        return self._rates.get((service, backend), Rates())

    def all(self) -> dict[tuple[str, str], Rates]:
        """Every backend's rates, by (service, backend key)."""
        return dict(self._rates)


def _rates(before: BackendCounters, after: BackendCounters, elapsed: float) -> Rates:
    def per_second(old: int, new: int) -> float:
        return max(0, new - old) / elapsed

    return Rates(
        packets=per_second(before.packets, after.packets),
        bytes=per_second(before.bytes, after.bytes),
        new_flows=per_second(before.new_flows, after.new_flows),
    )


@dataclass
class Histogram:
    """A Prometheus-style cumulative histogram (buckets are upper bounds)."""

    buckets: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; +Inf last
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it); the last bound is +Inf."""
        total = 0
        out = []
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass
class Telemetry:
    """Everything the daemon counts beyond the reconciler's own stats."""

    events: EventLog = field(default_factory=EventLog)
    rates: RateTracker = field(default_factory=RateTracker)
    apply_duration: Histogram = field(default_factory=Histogram)
    ring_build: Histogram = field(default_factory=Histogram)
    reloads: int = 0
    reload_failures: int = 0
