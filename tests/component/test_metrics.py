"""/metrics rendering (pure) and the telemetry it reads: format, values, docs in sync."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from passlb.api.metrics import ALL_METRICS, escape_label, render_metrics
from passlb.api.telemetry import EventLog, Histogram, RateTracker
from passlb.api.testing import parse_exposition as parse
from passlb.dataplane.base import BackendCounters, ServiceCounters

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations-api.md"


def _doc(**backend_overrides: Any) -> dict[str, Any]:
    backend = {
        "key": "198.18.2.11:8080",
        "health": "up",
        "admin": "drain",
        "weight": 5,
        "ring_weight": 0,
        "reported_weight": 7,
        "ring_slots": 0,
        "role": "drained",
        "packets": 10,
        "bytes": 1500,
        "new_flows": 3,
        "active_flows": 2,
        "check_latency": 0.0025,
        **backend_overrides,
    }
    return {
        "version": "0.1.0",
        "uptime": 12.5,
        "services": [
            {
                "name": "web",
                "dropped": 4,
                "drops": {"no_backend": 4, "not_allowed": 9},
                "dropping": False,
                "reported_weights": "ignored",
                "backends": [backend],
            }
        ],
        "applies": 7,
        "apply_failures": 1,
        "reloads": 2,
        "reload_failures": 1,
        "state": {"in_sync": True, "pending": ""},
    }


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    found = [v for lbl, v in samples[name] if all(lbl.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_render_values_from_the_document() -> None:
    apply_hist = Histogram()
    for value in (0.002, 0.02, 3.0):
        apply_hist.observe(value)
    samples = parse(render_metrics(_doc(), apply_hist, Histogram()))
    labels = {"service": "web", "backend": "198.18.2.11:8080"}
    assert _value(samples, "passlb_backend_packets_total", **labels) == 10
    assert _value(samples, "passlb_backend_bytes_total", **labels) == 1500
    assert _value(samples, "passlb_backend_new_flows_total", **labels) == 3
    assert _value(samples, "passlb_backend_active_flows", **labels) == 2
    assert _value(samples, "passlb_backend_up", **labels) == 1
    assert _value(samples, "passlb_backend_health_check_duration_seconds", **labels) == 0.0025
    assert _value(samples, "passlb_backend_weight", **labels) == 5
    assert _value(samples, "passlb_backend_ring_weight", **labels) == 0
    assert _value(samples, "passlb_backend_reported_weight", **labels) == 7
    assert _value(samples, "passlb_backend_ring_slots", **labels) == 0
    assert _value(samples, "passlb_backend_role", role="drained", **labels) == 1
    assert _value(samples, "passlb_backend_role", role="draining", **labels) == 0
    assert _value(samples, "passlb_backend_admin_state", state="drain", **labels) == 1
    assert _value(samples, "passlb_backend_admin_state", state="enabled", **labels) == 0
    assert _value(samples, "passlb_service_dropped_packets_total", service="web") == 4
    assert _value(samples, "passlb_service_serving", service="web") == 1
    assert _value(samples, "passlb_service_reported_weights", service="web", state="ignored") == 1
    assert _value(samples, "passlb_service_reported_weights", service="web", state="used") == 0
    drops = "passlb_service_drops_total"
    assert _value(samples, drops, service="web", reason="not_allowed") == 9
    assert _value(samples, drops, service="web", reason="no_backend") == 4
    assert _value(samples, "passlb_applies_total") == 7
    assert _value(samples, "passlb_apply_failures_total") == 1
    assert _value(samples, "passlb_reloads_total") == 2
    assert _value(samples, "passlb_reload_failures_total") == 1
    assert _value(samples, "passlb_in_sync") == 1
    assert _value(samples, "passlb_build_info", version="0.1.0") == 1
    assert _value(samples, "passlb_apply_duration_seconds_count") == 3
    assert math.isclose(_value(samples, "passlb_apply_duration_seconds_sum"), 3.022)
    assert _value(samples, "passlb_apply_duration_seconds_bucket", le="0.001") == 0
    assert _value(samples, "passlb_apply_duration_seconds_bucket", le="0.005") == 1
    assert _value(samples, "passlb_apply_duration_seconds_bucket", le="0.025") == 2
    assert _value(samples, "passlb_apply_duration_seconds_bucket", le="2.5") == 2
    assert _value(samples, "passlb_apply_duration_seconds_bucket", le="+Inf") == 3
    assert _value(samples, "passlb_ring_build_seconds_count") == 0


def test_down_backend_and_unknown_latency() -> None:
    samples = parse(
        render_metrics(
            _doc(health="unknown", check_latency=None, reported_weight=None),
            Histogram(),
            Histogram(),
        )
    )
    assert _value(samples, "passlb_backend_up", service="web") == 0
    assert "passlb_backend_health_check_duration_seconds" not in samples
    assert "passlb_backend_reported_weight" not in samples


def test_label_values_are_escaped() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    doc = _doc(key='odd"key')
    samples = parse(render_metrics(doc, Histogram(), Histogram()))
    assert _value(samples, "passlb_backend_up", backend='odd\\"key') == 1


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    hist = Histogram(buckets=(1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 9.0):
        hist.observe(value)
    assert hist.cumulative() == [(1.0, 2), (2.0, 4), (math.inf, 5)]
    assert hist.count == 5
    assert hist.sum == 14.0


def test_rates_from_successive_counter_reads() -> None:
    tracker = RateTracker()

    def read(packets: int, new_flows: int) -> dict[str, ServiceCounters]:
        counters = BackendCounters(packets=packets, bytes=packets * 100, new_flows=new_flows)
        return {"web": ServiceCounters(backends={"b1": counters})}

    tracker.observe(10.0, read(0, 0))
    assert tracker.rates("web", "b1").packets == 0  # one read: no rate yet
    tracker.observe(12.0, read(50, 10))
    rates = tracker.rates("web", "b1")
    assert (rates.packets, rates.bytes, rates.new_flows) == (25.0, 2500.0, 5.0)
    tracker.observe(13.0, read(5, 1))  # counters restarted: no negative rate
    assert tracker.rates("web", "b1").packets == 0
    assert tracker.rates("web", "absent").new_flows == 0


def test_event_log_is_bounded_and_readable_since_a_seq() -> None:
    log = EventLog(capacity=3)
    for n in range(5):
        log.add(float(n), "health", f"event {n}", backend="b1")
    assert [e["seq"] for e in log.since()] == [3, 4, 5]
    assert [e["message"] for e in log.since(4)] == ["event 4"]
    assert log.since(5) == []
    assert log.last_seq == 5
    assert log.since()[0]["backend"] == "b1"


def test_docs_list_every_metric() -> None:
    text = DOCS.read_text()
    documented = set(re.findall(r"`(passlb_[a-z_]+)`", text))
    exported = {m.name for m in ALL_METRICS}
    assert exported <= documented, sorted(exported - documented)
    assert documented <= exported | {
        f"{m.name}_{suffix}" for m in ALL_METRICS for suffix in ("bucket", "sum", "count")
    }, sorted(documented - exported)


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda m: m.name)
def test_names_follow_prometheus_conventions(metric: Any) -> None:
    assert metric.name.startswith("passlb_")
    assert metric.name.endswith("_total") == (metric.type == "counter")
