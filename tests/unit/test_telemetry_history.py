"""The daemon's rate history: bounded rings at three resolutions, fed by the sampler."""

from __future__ import annotations

from passlb.api.telemetry import SERVICE_TOTAL, HealthHistory, History, Rates
from passlb.dataplane.base import BackendCounters, ServiceCounters

T0 = 1_700_000_000.0  # a whole minute, so every tier's steps start together


def rates(**per_backend: float) -> dict[tuple[str, str], Rates]:
    return {
        ("web", key): Rates(packets=v * 10, bytes=v * 1000, new_flows=v)
        for key, v in per_backend.items()
    }


def test_one_point_a_second_with_service_totals() -> None:
    history = History(tiers=((1, 5),))
    for n in range(4):
        history.observe_rates(T0 + n, rates(a=n, b=1))
    # The step in progress is not shown yet: three closed seconds.
    read = history.read([("web", SERVICE_TOTAL), ("web", "a")], 600)
    assert read["step"] == 1
    assert read["times"] == [T0, T0 + 1, T0 + 2]
    total, a = read["series"]
    assert (total["service"], total["backend"]) == ("web", None)
    assert total["new_flows"] == [1, 2, 3]
    assert total["bytes"] == [1000, 2000, 3000]
    assert a["backend"] == "a"
    assert a["packets"] == [0, 10, 20]
    assert a["active_flows"] == [None, None, None]  # nobody counted them


def test_ring_is_bounded_and_keeps_the_newest() -> None:
    history = History(tiers=((1, 5),))
    for n in range(20):
        history.observe_rates(T0 + n, rates(a=n))
    read = history.read([("web", "a")], 600)
    assert read["times"] == [T0 + n for n in range(14, 19)]
    assert read["series"][0]["new_flows"] == [14, 15, 16, 17, 18]
    assert len(history.tiers[0].series[("web", "a")]) == 5 * 4


def test_coarser_tiers_average_and_read_picks_the_tier_that_spans() -> None:
    history = History(tiers=((1, 10), (10, 6)))
    for n in range(35):
        history.observe_rates(T0 + n, rates(a=n))
    fine = history.read([("web", "a")], 10)
    assert fine["step"] == 1
    coarse = history.read([("web", "a")], 60)
    assert coarse["step"] == 10
    assert coarse["times"] == [T0, T0 + 10, T0 + 20]
    assert coarse["series"][0]["new_flows"] == [4.5, 14.5, 24.5]
    # Asked for more than any tier holds: the coarsest, whole.
    assert history.read([("web", "a")], 10_000)["step"] == 10


def test_active_flows_where_counted_and_a_gap_where_not() -> None:
    history = History(tiers=((1, 30),))
    counts = {"web": ServiceCounters(backends={"a": BackendCounters(active_flows=7)})}
    history.observe_rates(T0, rates(a=1))
    history.observe_active(T0 + 0.5, counts)
    for n in range(1, 16):
        history.observe_rates(T0 + n, rates(a=1))
    read = history.read([("web", "a"), ("web", SERVICE_TOTAL)], 600)
    # The count stands for the samples up to ACTIVE_FLOWS_CARRY (12 s) after it.
    expected = [None] + [7] * 12 + [None, None]
    assert read["series"][0]["active_flows"] == expected
    assert read["series"][1]["active_flows"] == expected


def test_a_backend_added_later_has_gaps_before_and_forget_drops_it() -> None:
    history = History(tiers=((1, 10),))
    history.observe_rates(T0, rates(a=1))
    history.observe_rates(T0 + 1, rates(a=1, b=2))
    history.observe_rates(T0 + 2, rates(a=1, b=2))
    read = history.read([("web", "b"), ("web", "gone")], 600)
    assert read["series"][0]["new_flows"] == [None, 2]
    assert read["series"][1]["new_flows"] == [None, None]
    history.forget([("web", "a"), ("web", SERVICE_TOTAL)])
    assert ("web", "b") not in history.tiers[0].series


def test_health_history_newest_first_and_bounded() -> None:
    health = HealthHistory(length=3)
    for n in range(5):
        health.add("web", "a", T0 + n, n % 2 == 0, f"reason {n}")
    assert health.of("web", "a") == [
        {"at": T0 + 4, "health": "up", "reason": "reason 4"},
        {"at": T0 + 3, "health": "down", "reason": "reason 3"},
        {"at": T0 + 2, "health": "up", "reason": "reason 2"},
    ]
    assert health.of("web", "b") == []
    health.forget([("web", "b")])
    assert health.of("web", "a") == []
