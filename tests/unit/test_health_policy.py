"""The rise/fall state machine, fed scripted results in virtual time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passlb.health.policy import (
    HealthState,
    HealthTracker,
    PendingTransition,
    ProbeResult,
    Transition,
    WeightChange,
    parse_reported_weight,
)
from passlb.state import HealthStatus

UP, DOWN, UNKNOWN = HealthState.UP, HealthState.DOWN, HealthState.UNKNOWN


def result(ok: bool, weight: int | None = None) -> ProbeResult:
    return ProbeResult(ok, "ok" if ok else "refused", 0.001, weight)


def feed(tracker: HealthTracker, script: str, start: float = 0.0) -> list[tuple[int, HealthState]]:
    """Feed '+' (ok) and '-' (fail) one second apart; return (index, new state) per transition."""
    moves = []
    for index, mark in enumerate(script):
        for event in tracker.observe(result(mark == "+"), start + index):
            if isinstance(event, Transition):
                moves.append((index, event.current))
    return moves


def pending(tracker: HealthTracker, script: str) -> list[tuple[int, HealthState, int]]:
    """Feed like ``feed``; return (index, toward, remaining) per PendingTransition."""
    found = []
    for index, mark in enumerate(script):
        for event in tracker.observe(result(mark == "+"), float(index)):
            if isinstance(event, PendingTransition):
                found.append((index, event.toward, event.remaining))
    return found


@pytest.mark.parametrize(
    ("rise", "fall", "script", "expected"),
    [
        # The first result of a run against the state announces the flip to come.
        (2, 3, "++-+---", [(0, UP, 1), (2, DOWN, 2), (4, DOWN, 2)]),
        (3, 2, "--+-++", [(0, DOWN, 1), (2, UP, 2), (4, UP, 2)]),
        # A threshold of 1 flips at once: nothing to announce.
        (1, 1, "+-+-", []),
        # Results that agree with the state announce nothing.
        (1, 3, "++++", []),
    ],
)
def test_pending_transition_announces_the_first_result_of_a_run(
    rise: int, fall: int, script: str, expected: list[tuple[int, HealthState, int]]
) -> None:
    assert pending(HealthTracker("b", rise=rise, fall=fall, created_at=0.0), script) == expected


@given(st.integers(1, 4), st.integers(1, 4), st.text(alphabet="+-", max_size=30))
def test_a_pending_transition_comes_true_when_its_run_goes_on(
    rise: int, fall: int, script: str
) -> None:
    """Every flip is announced `remaining` results ahead (unless its threshold is 1)."""
    tracker = HealthTracker("b", rise=rise, fall=fall, created_at=0.0)
    announced = dict((index, (toward, left)) for index, toward, left in pending(tracker, script))
    tracker = HealthTracker("b", rise=rise, fall=fall, created_at=0.0)
    for index, state in feed(tracker, script):
        threshold = rise if state is UP else fall
        if threshold > 1:
            assert announced[index - threshold + 1] == (state, threshold - 1)


# (rise, fall, script, transitions as (index, state), final state)
SCENARIOS = [
    (2, 3, "", [], UNKNOWN),
    (2, 3, "+", [], UNKNOWN),
    (2, 3, "++", [(1, UP)], UP),
    (2, 3, "--", [], UNKNOWN),
    (2, 3, "---", [(2, DOWN)], DOWN),
    (2, 3, "++--+---", [(1, UP), (7, DOWN)], DOWN),
    (2, 3, "++---++", [(1, UP), (4, DOWN), (6, UP)], UP),
    (2, 3, "+-+-+-+-+-", [], UNKNOWN),
    (2, 3, "++-+-+--+--+", [(1, UP)], UP),
    (2, 3, "++++++", [(1, UP)], UP),
    (2, 3, "------+-", [(2, DOWN)], DOWN),
    (1, 1, "+-+", [(0, UP), (1, DOWN), (2, UP)], UP),
    (1, 3, "---+", [(2, DOWN), (3, UP)], UP),
    (3, 1, "++-+++", [(2, DOWN), (5, UP)], UP),
]


@pytest.mark.parametrize(("rise", "fall", "script", "moves", "final"), SCENARIOS)
def test_scenarios(
    rise: int, fall: int, script: str, moves: list[tuple[int, HealthState]], final: HealthState
) -> None:
    tracker = HealthTracker("b", rise=rise, fall=fall, created_at=0.0)
    assert feed(tracker, script) == moves
    assert tracker.state is final


def test_starts_unknown_and_stays_out_of_the_view() -> None:
    tracker = HealthTracker("b", rise=2, fall=3, created_at=5.0)
    assert tracker.state is UNKNOWN
    assert tracker.status() is None
    assert tracker.record().since == 5.0
    assert tracker.record().reason == "not checked yet"


def test_transition_event_carries_times_reason_and_status() -> None:
    tracker = HealthTracker("10.0.0.1:80", rise=2, fall=2, created_at=0.0)
    pending = PendingTransition("10.0.0.1:80", UP, 1, 10.0)
    assert tracker.observe(ProbeResult(True, "HTTP 200", 0.01), 10.0) == (pending,)
    (event,) = tracker.observe(ProbeResult(True, "HTTP 200", 0.02), 12.0)
    assert event == Transition("10.0.0.1:80", UNKNOWN, UP, 12.0, "HTTP 200")
    assert tracker.status() == HealthStatus(healthy=True, weight=None, since=12.0)
    tracker.observe(ProbeResult(False, "HTTP 503", 0.01), 14.0)
    (event,) = tracker.observe(ProbeResult(False, "HTTP 503", 0.01), 16.0)
    assert event == Transition("10.0.0.1:80", UP, DOWN, 16.0, "HTTP 503")
    assert tracker.status() == HealthStatus(healthy=False, weight=None, since=16.0)
    record = tracker.record()
    assert (record.failures, record.successes, record.latency, record.checked_at) == (
        2,
        0,
        0.01,
        16.0,
    )


def test_reported_weight_is_tracked_from_ok_results_only() -> None:
    tracker = HealthTracker("b", rise=1, fall=2, created_at=0.0)
    events = tracker.observe(result(True, weight=500), 1.0)
    assert events == (WeightChange("b", None, 500, 1.0), Transition("b", UNKNOWN, UP, 1.0, "ok"))
    assert tracker.status() == HealthStatus(healthy=True, weight=500, since=1.0)
    assert tracker.observe(result(True, weight=500), 2.0) == ()
    # A failed probe says nothing about the wanted load: the weight stays.
    assert tracker.observe(result(False, weight=7), 3.0) == (PendingTransition("b", DOWN, 1, 3.0),)
    assert tracker.weight == 500
    assert tracker.observe(result(True, weight=0), 4.0) == (WeightChange("b", 500, 0, 4.0),)
    # The backend stopped reporting: its configured weight applies again.
    assert tracker.observe(result(True), 5.0) == (WeightChange("b", 0, None, 5.0),)
    assert tracker.weight is None


@pytest.mark.parametrize("bad", [-1, 1001, 10**6])
def test_out_of_range_weight_is_ignored_with_a_reason(bad: int) -> None:
    tracker = HealthTracker("b", rise=1, fall=1, created_at=0.0)
    tracker.observe(result(True, weight=10), 1.0)
    events = tracker.observe(result(True, weight=bad), 2.0)
    assert events == ()
    assert tracker.weight == 10
    assert f"ignored reported weight {bad}" in tracker.reason


@pytest.mark.parametrize(
    ("raw", "weight", "issue"),
    [
        ("0", 0, None),
        ("1000", 1000, None),
        (" 42 ", 42, None),
        ("1001", None, "above 1000"),
        ("-3", None, "not an integer"),
        ("abc", None, "not an integer"),
        ("", None, "not an integer"),
        ("1.5", None, "not an integer"),
        ("\u0663", None, "not an integer"),  # an Arabic-Indic digit: isdigit() but not ASCII
    ],
)
def test_parse_reported_weight(raw: str, weight: int | None, issue: str | None) -> None:
    parsed, why = parse_reported_weight(raw)
    assert parsed == weight
    if issue is None:
        assert why is None
    else:
        assert why is not None and issue in why and "X-Load-Balancing-Endpoint-Weight" in why


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3)])
def test_thresholds_must_be_positive(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HealthTracker("b", rise=rise, fall=fall, created_at=0.0)
    tracker = HealthTracker("b", rise=1, fall=1, created_at=0.0)
    with pytest.raises(ValueError, match="at least 1"):
        tracker.retune(rise=rise, fall=fall)


def test_retune_keeps_the_verdict_and_restarts_the_counters() -> None:
    tracker = HealthTracker("b", rise=2, fall=3, created_at=0.0)
    feed(tracker, "++--")
    tracker.retune(rise=2, fall=2)
    assert tracker.state is UP
    # Two fails before the retune do not count towards the new threshold.
    assert feed(tracker, "-", start=10) == []
    assert feed(tracker, "-", start=11) == [(0, DOWN)]


def test_assume_up_moves_once() -> None:
    tracker = HealthTracker("b", rise=2, fall=3, created_at=0.0)
    assert tracker.assume_up(3.0, "type none") == Transition("b", UNKNOWN, UP, 3.0, "type none")
    assert tracker.assume_up(4.0, "type none") is None
    assert tracker.since == 3.0


@given(rise=st.integers(2, 6), fall=st.integers(2, 6), length=st.integers(0, 60))
def test_alternating_results_never_move_a_backend(rise: int, fall: int, length: int) -> None:
    for first in "+-":
        tracker = HealthTracker("b", rise=rise, fall=fall, created_at=0.0)
        script = "".join(first if i % 2 == 0 else "+-".replace(first, "") for i in range(length))
        assert feed(tracker, script) == []
        assert tracker.state is UNKNOWN


@given(start=st.sampled_from(["++", "---"]), length=st.integers(0, 60))
def test_flapping_after_a_verdict_keeps_it(start: str, length: int) -> None:
    tracker = HealthTracker("b", rise=2, fall=3, created_at=0.0)
    feed(tracker, start)
    settled = tracker.state
    assert feed(tracker, "-+" * length, start=10) == []
    assert tracker.state is settled


def reference_state(script: str, rise: int, fall: int) -> tuple[HealthState, int | None]:
    """Another way to the verdict: the latest completed run of rise oks or fall fails."""
    latest: tuple[int, HealthState] | None = None
    run_mark, run = "", 0
    for index, mark in enumerate(script):
        run = run + 1 if mark == run_mark else 1
        run_mark = mark
        if (mark == "+" and run == rise) or (mark == "-" and run == fall):
            latest = (index, UP if mark == "+" else DOWN)
    return (UNKNOWN, None) if latest is None else (latest[1], latest[0])


@given(
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    script=st.text(alphabet="+-", max_size=80),
)
def test_any_sequence_obeys_the_thresholds(rise: int, fall: int, script: str) -> None:
    tracker = HealthTracker("b", rise=rise, fall=fall, created_at=-1.0)
    moves = feed(tracker, script)

    assert len(moves) <= len(script) // min(rise, fall)
    previous = UNKNOWN
    for index, state in moves:
        assert state is not previous  # a transition always changes the state
        need, mark = (rise, "+") if state is UP else (fall, "-")
        assert index + 1 >= need
        assert script[index + 1 - need : index + 1] == mark * need
        previous = state

    state, last_index = reference_state(script, rise, fall)
    assert tracker.state is state
    if moves:
        # The reference's latest crossing may repeat a verdict; since marks a change.
        assert tracker.since == moves[-1][0]
    else:
        assert tracker.since == -1.0
        assert last_index is None
