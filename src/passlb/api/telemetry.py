"""What the daemon remembers for operators: recent events, rates, rate history,
health transitions, timing histograms.

Pure values fed by the daemon (no I/O, no clock of their own): the API, the
status page and /metrics read them.
"""

from __future__ import annotations

import bisect
import collections
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping
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


# The history keeps each series at three resolutions, so a graph can span
# minutes at one point a second or hours at one a minute: (step s, points).
HISTORY_TIERS = ((1, 600), (10, 360), (60, 360))  # 10 min, 1 h, 6 h
HISTORY_METRICS = ("new_flows", "packets", "bytes", "active_flows")
# A service's own series (the sum over its backends) has this backend key.
SERVICE_TOTAL = ""

SeriesKey = tuple[str, str]  # (service, backend key or SERVICE_TOTAL)
# An active-flow count stands for the samples up to this many seconds after
# it: counts come with status reads (proxy) or the background count of the
# kernel's flow tables (dsr, nat: every 5 s plus what the count takes).
ACTIVE_FLOWS_CARRY = 12.0


class _Tier:
    """One resolution: a ring of ``size`` points ``step`` seconds apart.

    Samples falling into the same step are averaged into one point. Values
    live in float32 arrays (16 bytes a point for the four metrics), so a
    backend's whole history is about 21 KiB. Active flows are NaN where no
    count was taken in that step (counting them walks the flow table: it is
    not done every second).
    """

    def __init__(self, step: int, size: int) -> None:
        self.step = step
        self.size = size
        self.times: collections.deque[float] = collections.deque(maxlen=size)
        self.series: dict[SeriesKey, array[float]] = {}
        self._bucket: int | None = None
        self._sums: dict[SeriesKey, list[float]] = {}
        self._counts: dict[SeriesKey, list[int]] = {}

    def add(self, now: float, values: Mapping[SeriesKey, tuple[float, ...]]) -> None:
        bucket = math.floor(now / self.step)
        if self._bucket is not None and bucket != self._bucket:
            self._close()
        self._bucket = bucket
        metrics = len(HISTORY_METRICS)
        for key, sample in values.items():
            sums = self._sums.setdefault(key, [0.0] * metrics)
            counts = self._counts.setdefault(key, [0] * metrics)
            for i, value in enumerate(sample):
                if not math.isnan(value):
                    sums[i] += value
                    counts[i] += 1

    def _close(self) -> None:
        """The finished step becomes a point of every series (NaN where it had no sample)."""
        assert self._bucket is not None
        metrics = len(HISTORY_METRICS)
        full = len(self.times) == self.size
        self.times.append(float(self._bucket * self.step))
        for key in self._sums.keys() - self.series.keys():
            # A series first seen now has nothing before: NaN for the points so far.
            self.series[key] = array("f", [math.nan] * (metrics * (len(self.times) - 1)))
        for key, values in self.series.items():
            sums = self._sums.get(key)
            counts = self._counts.get(key)
            point = [
                sums[i] / counts[i]
                if sums is not None and counts is not None and counts[i]
                else math.nan
                for i in range(metrics)
            ]
            if full:
                del values[:metrics]
            values.extend(point)
        self._sums.clear()
        self._counts.clear()

    def forget(self, keep: Iterable[SeriesKey]) -> None:
        wanted = set(keep)
        for key in self.series.keys() - wanted:
            del self.series[key]

    def read(self, key: SeriesKey) -> dict[str, list[float | None]]:
        values = self.series.get(key)
        metrics = len(HISTORY_METRICS)
        points = len(self.times)
        if values is None:
            return {name: [None] * points for name in HISTORY_METRICS}
        return {
            name: [_finite(values[p * metrics + i]) for p in range(points)]
            for i, name in enumerate(HISTORY_METRICS)
        }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


class History:
    """Rates and active flows per backend and per service, over minutes to hours.

    Fed by the daemon: ``observe_rates`` each time the counter sampler has new
    rates, ``observe_active`` whenever active flows were counted (a status or
    metrics read). Bounded: HISTORY_TIERS points per series, and ``forget``
    drops series of services and backends a reload removed.
    """

    def __init__(self, tiers: tuple[tuple[int, int], ...] = HISTORY_TIERS) -> None:
        self.tiers = tuple(_Tier(step, size) for step, size in tiers)
        self._active: dict[SeriesKey, tuple[float, float]] = {}  # key -> (at, count)

    def observe_active(self, now: float, counters: Mapping[str, ServiceCounters]) -> None:
        """Active flows just counted; rate samples up to ACTIVE_FLOWS_CARRY
        seconds later carry them."""
        for service, svc in counters.items():
            for key, c in svc.backends.items():
                self._active[(service, key)] = (now, float(c.active_flows))
            self._active[(service, SERVICE_TOTAL)] = (now, float(svc.total.active_flows))

    def _active_at(self, now: float, key: SeriesKey) -> float:
        at, count = self._active.get(key, (-math.inf, math.nan))
        return count if now - at <= ACTIVE_FLOWS_CARRY else math.nan

    def observe_rates(self, now: float, rates: Mapping[SeriesKey, Rates]) -> None:
        values: dict[SeriesKey, tuple[float, ...]] = {}
        totals: dict[str, list[float]] = {}
        for (service, backend), r in rates.items():
            values[(service, backend)] = (
                r.new_flows,
                r.packets,
                r.bytes,
                self._active_at(now, (service, backend)),
            )
            total = totals.setdefault(service, [0.0, 0.0, 0.0])
            total[0] += r.new_flows
            total[1] += r.packets
            total[2] += r.bytes
        for service, (new_flows, packets, nbytes) in totals.items():
            active = self._active_at(now, (service, SERVICE_TOTAL))
            values[(service, SERVICE_TOTAL)] = (new_flows, packets, nbytes, active)
        for tier in self.tiers:
            tier.add(now, values)

    def forget(self, keep: Iterable[SeriesKey]) -> None:
        """Drop every series not in ``keep`` (after a reload)."""
        wanted = set(keep)
        for tier in self.tiers:
            tier.forget(wanted)
        for key in self._active.keys() - wanted:
            del self._active[key]

    def tier_for(self, seconds: float) -> _Tier:
        """The finest tier whose ring spans ``seconds``, else the coarsest."""
        for tier in self.tiers:
            if tier.step * tier.size >= seconds:
                return tier
        return self.tiers[-1]

    def read(self, keys: Iterable[SeriesKey], seconds: float) -> dict[str, Any]:
        """The last ``seconds`` of each series in ``keys``, at the tier that spans them."""
        tier = self.tier_for(seconds)
        skip = max(0, len(tier.times) - math.ceil(seconds / tier.step))
        times = list(tier.times)[skip:]
        return {
            "step": tier.step,
            "times": times,
            "series": [
                {
                    "service": service,
                    "backend": backend or None,
                    **{
                        name: points[skip:]
                        for name, points in tier.read((service, backend)).items()
                    },
                }
                for service, backend in keys
            ],
        }


HEALTH_HISTORY_LENGTH = 8  # transitions kept per backend


class HealthHistory:
    """The last health transitions of each backend, with their reasons."""

    def __init__(self, length: int = HEALTH_HISTORY_LENGTH) -> None:
        self._length = length
        self._transitions: dict[tuple[str, str], collections.deque[dict[str, Any]]] = {}

    def add(self, service: str, backend: str, at: float, healthy: bool, reason: str) -> None:
        ring = self._transitions.setdefault(
            (service, backend), collections.deque(maxlen=self._length)
        )
        ring.append({"at": at, "health": "up" if healthy else "down", "reason": reason})

    def of(self, service: str, backend: str) -> list[dict[str, Any]]:
        """Newest first."""
        return list(reversed(self._transitions.get((service, backend), ())))

    def all(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every backend's transitions, newest first."""
        return {key: list(reversed(ring)) for key, ring in self._transitions.items()}

    def forget(self, keep: Iterable[tuple[str, str]]) -> None:
        wanted = set(keep)
        for key in self._transitions.keys() - wanted:
            del self._transitions[key]


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


@dataclass(frozen=True)
class FlowCount:
    """Active flows by (service, backend key), as one background count found them."""

    at: float  # wall clock when the count finished
    took: float  # seconds the count took
    active: Mapping[tuple[str, str], int]


@dataclass
class Telemetry:
    """Everything the daemon counts beyond the reconciler's own stats."""

    events: EventLog = field(default_factory=EventLog)
    rates: RateTracker = field(default_factory=RateTracker)
    history: History = field(default_factory=History)
    health_history: HealthHistory = field(default_factory=HealthHistory)
    apply_duration: Histogram = field(default_factory=Histogram)
    ring_build: Histogram = field(default_factory=Histogram)
    reloads: int = 0
    reload_failures: int = 0
    # What full resyncs found changed in the data plane, by (service, kind), summed.
    resync_repairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    flow_count: FlowCount | None = None  # the last finished count of the blocking drivers
    counting_flows: bool = False  # a count is running now
