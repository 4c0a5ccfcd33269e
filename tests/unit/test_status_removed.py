"""A removed backend, while it drains, is in the status document, the table and its deadline."""

from __future__ import annotations

import dataclasses

from passlb.api.views import StatusSnapshot, format_status, status_document
from passlb.config import parse_config
from passlb.control.desired import compute_desired, update_removed
from passlb.control.reconciler import assume_all_healthy
from passlb.dataplane.base import BackendCounters, ServiceCounters

from .test_status_snapshot import CONFIG


def test_a_removed_backend_is_listed_with_its_deadline_and_flows() -> None:
    before = parse_config(
        CONFIG.replace("ring_size = 1009", 'ring_size = 1009\ndrain_timeout = "60s"')
    )
    web = before.services[0]
    after = dataclasses.replace(
        before, services=(dataclasses.replace(web, backends=web.backends[:1]),)
    )
    removed = update_removed(before, after, {}, {}, now=100.0)
    desired = compute_desired(after, assume_all_healthy(before), {}, 110.0, removed=removed)
    snap = StatusSnapshot(
        at=0.0,
        started=0.0,
        config_path="passlb.toml",
        interfaces=(),
        config=after,
        effective=after,
        desired=desired,
        applied=desired,
        now=110.0,
        applies=1,
        apply_failures=0,
        last_apply=None,
        health={},
        rates={},
        reloads=1,
        reload_failures=0,
        last_reload={},
        last_event=0,
        removed=removed,
    )
    flows = ServiceCounters({"198.18.2.12": BackendCounters(active_flows=4)})
    doc = status_document(snap, {"web": flows}, [])
    kept, gone = doc["services"][0]["backends"]
    assert (kept["key"], kept["removed"], kept["role"]) == ("198.18.2.11", False, "active")
    assert (gone["key"], gone["removed"], gone["role"], gone["admin"]) == (
        "198.18.2.12",
        True,
        "draining",
        "drain",
    )
    assert (gone["drain_deadline_in"], gone["active_flows"], gone["weight"]) == (50.0, 4, 2)
    (row,) = [line for line in format_status(doc).splitlines() if "198.18.2.12" in line]
    assert row.split()[:4] == ["198.18.2.12", "unknown", "draining", "removed"]
    assert row.endswith("drain ends in 50s")
