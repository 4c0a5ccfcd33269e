"""What the status document says of drains, reported weights and ring shares is true."""

from __future__ import annotations

from typing import Any

from passlb.api.views import DSR_STATUS_NOTE, StatusSnapshot, format_status, status_document
from passlb.config import parse_config
from passlb.control.desired import compute_desired
from passlb.control.reconciler import with_admin_overrides
from passlb.health.policy import HealthRecord, HealthState
from passlb.model import AdminState, Config
from passlb.state import HealthStatus

CONFIG = """
[[services]]
name = "web"
vip = "198.18.0.10"
ports = [443, "8000-8100"]
mode = "dsr"
ring_size = 1009
drain_timeout = "30s"
[[services.backends]]
address = "198.18.2.11"
[[services.backends]]
address = "198.18.2.12"
[[services.backends]]
address = "198.18.2.13"
"""
KEYS = ("198.18.2.11", "198.18.2.12", "198.18.2.13")


def record(weight: int | None) -> HealthRecord:
    return HealthRecord(HealthState.UP, 0.0, 2, 0, weight, "HTTP 200", 0.002, 1.0)


def document(
    config: Config, reported: dict[str, int | None], now: float, drains: dict[str, float]
) -> dict[str, Any]:
    effective = with_admin_overrides(config, {("web", key): AdminState.DRAIN for key in drains}, {})
    health = {("web", k): HealthStatus(healthy=True, weight=w) for k, w in reported.items()}
    desired = compute_desired(
        effective, health, {("web", k): at for k, at in drains.items()}, now=now
    )
    # Only what these tests look at; the rest as a daemon that just started.
    quiet: dict[str, Any] = dict.fromkeys(("at", "started", "now"), now)
    quiet |= {"config_path": "", "interfaces": (), "last_apply": None, "rates": {}}
    quiet |= dict.fromkeys(("applies", "apply_failures", "reloads", "reload_failures"), 0)
    snap = StatusSnapshot(
        **quiet,
        config=config,
        effective=effective,
        desired=desired,
        applied=desired,
        health={("web", k): record(w) for k, w in reported.items()},
        last_reload={},
        last_event=0,
        health_history={("web", KEYS[0]): [{"at": 5.0, "health": "up", "reason": "HTTP 200"}]},
    )
    return status_document(snap, {}, [])


def backends(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (svc,) = doc["services"]
    return {b["key"]: b for b in svc["backends"]}


def test_reported_weights_have_their_own_field_and_shape_the_ring_shares() -> None:
    doc = document(parse_config(CONFIG), dict(zip(KEYS, (5, 1, 1), strict=True)), 10.0, {})
    svc = doc["services"][0]
    assert svc["ports"] == [443, "8000-8100"]
    assert svc["reported_weights"] == "used"
    shown = backends(doc)
    assert [shown[k]["weight"] for k in KEYS] == [1, 1, 1]
    assert [shown[k]["reported_weight"] for k in KEYS] == [5, 1, 1]
    assert [shown[k]["ring_weight"] for k in KEYS] == [5, 1, 1]
    slots = [shown[k]["ring_slots"] for k in KEYS]
    assert sum(slots) == 1009
    assert [round(shown[k]["ring_share"]) for k in KEYS] == [71, 14, 14]
    assert shown[KEYS[0]]["health_history"] == [{"at": 5.0, "health": "up", "reason": "HTTP 200"}]
    text = format_status(doc)
    assert "ports 443,8000-8100" in text
    assert "reported weights used" in text
    assert text.splitlines()[-1] == DSR_STATUS_NOTE
    row = next(line for line in text.splitlines() if line.strip().startswith(KEYS[0]))
    # backend health role admin weight reported ring share
    assert row.split()[1:8] == [
        "up",
        "active",
        "enabled",
        "1",
        "5",
        "5",
        f"{100 * slots[0] / 1009:.1f}%",
    ]


def test_reports_from_only_some_backends_are_ignored_and_status_says_so() -> None:
    doc = document(parse_config(CONFIG), {KEYS[0]: 5, KEYS[1]: None, KEYS[2]: None}, 10.0, {})
    svc = doc["services"][0]
    assert svc["reported_weights"] == "ignored"
    assert svc["reported_weights_note"].startswith("only 1 of 3 serving backends report a weight")
    assert [backends(doc)[k]["ring_weight"] for k in KEYS] == [1, 1, 1]
    assert "reported weights ignored: only 1 of 3" in format_status(doc)


def test_a_drain_past_its_deadline_shows_as_drained() -> None:
    config = parse_config(CONFIG)
    draining = backends(document(config, {}, 20.0, {KEYS[1]: 0.0}))[KEYS[1]]
    assert (draining["role"], draining["drain_deadline_in"]) == ("draining", 10.0)
    assert "drain ends in 10s" in format_status(document(config, {}, 20.0, {KEYS[1]: 0.0}))
    later = document(config, {}, 95.0, {KEYS[1]: 0.0})
    drained = backends(later)[KEYS[1]]
    assert (drained["role"], drained["drain_deadline_in"]) == ("drained", None)
    assert (drained["ring_slots"], drained["ring_share"]) == (0, 0.0)
    text = format_status(later)
    assert "drain ends" not in text
    row = next(line for line in text.splitlines() if line.strip().startswith(KEYS[1]))
    assert row.split()[2:4] == ["drained", "drain"]


def test_every_port_is_a_list_too() -> None:
    every = CONFIG.replace('ports = [443, "8000-8100"]', 'ports = "all"')
    config = parse_config(
        every.replace(
            "[[services.backends]]", '[services.health]\ntype = "none"\n[[services.backends]]', 1
        )
    )
    doc = document(config, {}, 10.0, {})
    assert doc["services"][0]["ports"] == ["1-65535"]
    assert "ports all" in format_status(doc)
