"""The status document is rendered from a StatusSnapshot, a plain value: no daemon."""

from __future__ import annotations

import ast
from pathlib import Path

import passlb.api
from passlb.api.telemetry import Rates
from passlb.api.views import StatusSnapshot, status_document
from passlb.config import parse_config
from passlb.control.desired import compute_desired
from passlb.control.reconciler import ApplyRecord, assume_all_healthy, with_admin_overrides
from passlb.dataplane.base import BackendCounters, ServiceCounters
from passlb.health.policy import HealthRecord, HealthState
from passlb.model import AdminState
from passlb.state import BackendRole

CONFIG = """
[[services]]
name = "web"
vip = "198.18.0.10"
ports = 443
mode = "dsr"
ring_size = 1009
[[services.backends]]
address = "198.18.2.11"
[[services.backends]]
address = "198.18.2.12"
weight = 2
"""


def test_the_document_says_what_the_snapshot_holds() -> None:
    config = parse_config(CONFIG)
    effective = with_admin_overrides(
        config, {("web", "198.18.2.11"): AdminState.DRAIN}, {("web", "198.18.2.12"): 7}
    )
    drains = {("web", "198.18.2.11"): 90.0}
    desired = compute_desired(effective, assume_all_healthy(config), drains, now=100.0)
    down = HealthRecord(HealthState.DOWN, 0.0, 0, 3, None, "connection refused", 0.001, 99.0)
    snap = StatusSnapshot(
        at=1_000_050.0,
        started=1_000_000.0,
        config_path="/etc/passlb.toml",
        interfaces=("eth0",),
        config=config,
        effective=effective,
        desired=desired,
        applied=None,
        now=100.0,
        applies=3,
        apply_failures=1,
        last_apply=ApplyRecord(at=1_000_040.0, duration=0.002, full=False, changes="web ~1"),
        health={("web", "198.18.2.12"): down},
        rates={("web", "198.18.2.12"): Rates(packets=5.0)},
        reloads=2,
        reload_failures=0,
        last_reload={"at": None, "ok": True, "issues": []},
        last_event=9,
    )
    counters = {"web": ServiceCounters({"198.18.2.12": BackendCounters(packets=40, bytes=9)})}
    doc = status_document(snap, counters, ["nat: unreadable"])

    assert doc["uptime"] == 50.0
    assert doc["config"] == "/etc/passlb.toml" and doc["interfaces"] == ["eth0"]
    assert (doc["applies"], doc["apply_failures"], doc["last_event"]) == (3, 1, 9)
    assert doc["last_apply"]["changes"] == "web ~1"
    assert doc["state"]["in_sync"] is False and doc["state"]["pending"]
    assert doc["errors"] == ["nat: unreadable"]
    first, second = doc["services"][0]["backends"]
    assert (first["admin"], first["role"]) == ("drain", BackendRole.DRAINING.value)
    assert first["drain_deadline_in"] is not None and first["health"] == "unknown"
    assert (second["weight"], second["config_weight"]) == (7, 2)
    assert (second["health"], second["health_reason"]) == ("down", "connection refused")
    assert (second["packets"], second["bytes"], second["rates"]["packets"]) == (40, 9, 5.0)


def test_no_module_of_the_api_imports_the_daemon() -> None:
    """Not even for type checking: the daemon imports the api, never the reverse."""
    api = Path(passlb.api.__file__).parent
    for module in api.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("passlb.daemon") for n in names), module.name
