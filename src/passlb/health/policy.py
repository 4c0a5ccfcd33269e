"""Health hysteresis for one backend: probe results in, state transitions out.

Pure: no sockets, no clock of its own. The caller hands every result in with
the clock value it was taken at, so tests replay scenarios in virtual time.

States: UNKNOWN (no verdict yet), UP, DOWN. UNKNOWN is kept apart on purpose:
the daemon decides how a backend without a verdict counts (the health view
leaves it out; see ``HealthTracker.status``).

Rules, applied to each result in order ("ok" and "fail" are probe verdicts;
``successes`` / ``failures`` count consecutive results of one kind and the
other counter is reset to 0 by every result):

    state     result   counter after       transition
    -------   ------   -----------------   ------------------------------------
    UNKNOWN   ok       successes += 1      -> UP    when successes reaches rise
    UNKNOWN   fail     failures  += 1      -> DOWN  when failures reaches fall
    UP        ok       successes += 1      none
    UP        fail     failures  += 1      -> DOWN  when failures reaches fall
    DOWN      ok       successes += 1      -> UP    when successes reaches rise
    DOWN      fail     failures  += 1      none
    any       (check type none: nothing to ask)    -> UP at once (``assume_up``)

A result that starts a run against the current state (the first fail while not
DOWN, the first ok while not UP) also returns a PendingTransition when the
threshold is above 1: the state flips if the next ``remaining`` results agree.
It changes nothing here; it lets the daemon prepare the change (build the ring
without the backend) while the run plays out, so the flip applies at once.

Invariants that follow (and that the tests check):
- A transition happens only on the result that crosses a threshold, and a
  Transition event is returned only then; with rise, fall > 1 no single result
  flips the state.
- Every move to UP ends a run of exactly ``rise`` oks, every move to DOWN a
  run of exactly ``fall`` fails; so results alternating ok/fail never move a
  backend unless rise or fall is 1.
- ``since`` is the clock value of the last transition (of the creation while
  UNKNOWN): slow start ramps a recovered backend from there.

Reported weight (the ``X-Load-Balancing-Endpoint-Weight`` header, as Envoy and
the cloud load balancers name it) is tracked from ok results only: a failed
probe says nothing about the load the backend wants. An ok result without a
weight clears it (the backend stopped reporting; its configured weight rules
again). A weight outside 0..1000 is ignored: the previous one stays and the
record's reason says why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from passlb.state import HealthStatus

WEIGHT_HEADER = "X-Load-Balancing-Endpoint-Weight"
MAX_REPORTED_WEIGHT = 1000


class HealthState(enum.StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ProbeResult:
    """One probe's verdict. Probes build these; they never raise instead."""

    ok: bool
    reason: str  # short and human: "HTTP 503 not in (200,)", "port unreachable"
    latency: float  # seconds from start to verdict
    weight: int | None = None  # reported weight, None when the backend sent none


@dataclass(frozen=True)
class Transition:
    backend_key: str
    previous: HealthState
    current: HealthState
    at: float
    reason: str  # the reason of the result that crossed the threshold

    def __str__(self) -> str:
        return f"{self.backend_key} {self.previous} -> {self.current}: {self.reason}"


@dataclass(frozen=True)
class WeightChange:
    backend_key: str
    previous: int | None
    current: int | None
    at: float

    def __str__(self) -> str:
        return f"{self.backend_key} reported weight {self.previous} -> {self.current}"


@dataclass(frozen=True)
class PendingTransition:
    backend_key: str
    toward: HealthState  # UP or DOWN
    remaining: int  # results that must agree before the state flips
    at: float

    def __str__(self) -> str:
        return f"{self.backend_key} -> {self.toward} in {self.remaining} more result(s)"


HealthEvent = Transition | WeightChange | PendingTransition


@dataclass(frozen=True)
class HealthRecord:
    """A snapshot of what the tracker knows, for status pages and metrics."""

    state: HealthState
    since: float
    successes: int
    failures: int
    weight: int | None
    reason: str
    latency: float | None
    checked_at: float | None


def parse_reported_weight(raw: str) -> tuple[int | None, str | None]:
    """Read a weight header value: (weight, None) or (None, why it was ignored)."""
    text = raw.strip()
    if not text.isascii() or not text.isdigit():
        return None, f"ignored {WEIGHT_HEADER} {raw!r}: not an integer 0..{MAX_REPORTED_WEIGHT}"
    value = int(text)
    if value > MAX_REPORTED_WEIGHT:
        return None, f"ignored {WEIGHT_HEADER} {value}: above {MAX_REPORTED_WEIGHT}"
    return value, None


class HealthTracker:
    """The rise/fall state machine of one backend (see the rules above)."""

    def __init__(self, backend_key: str, *, rise: int, fall: int, created_at: float) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1, got rise={rise} fall={fall}")
        self.backend_key = backend_key
        self.rise = rise
        self.fall = fall
        self.state = HealthState.UNKNOWN
        self.since = created_at
        self.successes = 0
        self.failures = 0
        self.weight: int | None = None
        self.reason = "not checked yet"
        self.latency: float | None = None
        self.checked_at: float | None = None

    def observe(self, result: ProbeResult, at: float) -> tuple[HealthEvent, ...]:
        """Feed one result; returns the events it caused (usually none)."""
        self.checked_at = at
        self.latency = result.latency
        self.reason = result.reason
        if result.ok:
            self.successes += 1
            self.failures = 0
            weight = self._track_weight(result.weight, at)
            flip = None
            if self.state is not HealthState.UP:
                flip = self._toward(HealthState.UP, self.successes, self.rise, at)
            if weight is None:
                return () if flip is None else (flip,)
            return (weight,) if flip is None else (weight, flip)
        self.failures += 1
        self.successes = 0
        if self.state is HealthState.DOWN:
            return ()
        flip = self._toward(HealthState.DOWN, self.failures, self.fall, at)
        return () if flip is None else (flip,)

    def assume_up(self, at: float, reason: str) -> Transition | None:
        """UP without probing, for checks of type none."""
        self.reason = reason
        if self.state is HealthState.UP:
            return None
        return self._move(HealthState.UP, at)

    def retune(self, *, rise: int, fall: int) -> None:
        """Take new thresholds (config reload) and keep the verdict.

        The counters restart so the new thresholds apply to whole runs; the
        state stays, so a reload never flaps a backend.
        """
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1, got rise={rise} fall={fall}")
        self.rise = rise
        self.fall = fall
        self.successes = 0
        self.failures = 0

    def status(self) -> HealthStatus | None:
        """The verdict for the desired state; None while UNKNOWN."""
        if self.state is HealthState.UNKNOWN:
            return None
        return HealthStatus(
            healthy=self.state is HealthState.UP, weight=self.weight, since=self.since
        )

    def record(self) -> HealthRecord:
        return HealthRecord(
            state=self.state,
            since=self.since,
            successes=self.successes,
            failures=self.failures,
            weight=self.weight,
            reason=self.reason,
            latency=self.latency,
            checked_at=self.checked_at,
        )

    def _track_weight(self, reported: int | None, at: float) -> WeightChange | None:
        if reported is not None and not 0 <= reported <= MAX_REPORTED_WEIGHT:
            self.reason = (
                f"{self.reason}; ignored reported weight {reported}: "
                f"outside 0..{MAX_REPORTED_WEIGHT}"
            )
            return None
        if reported == self.weight:
            return None
        change = WeightChange(self.backend_key, self.weight, reported, at)
        self.weight = reported
        return change

    def _toward(
        self, state: HealthState, run: int, threshold: int, at: float
    ) -> Transition | PendingTransition | None:
        """The event of a run of `run` results toward `state` (the state is not `state`)."""
        if run >= threshold:
            return self._move(state, at)
        if run == 1:
            return PendingTransition(self.backend_key, state, threshold - 1, at)
        return None

    def _move(self, new_state: HealthState, at: float) -> Transition:
        transition = Transition(self.backend_key, self.state, new_state, at, self.reason)
        self.state = new_state
        self.since = at
        return transition
