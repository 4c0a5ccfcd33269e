"""Status over a big dsr flow table: the daemon counts the flows in the
background and answers status meanwhile (no deadline: a busy machine only
makes the count slower, never the test wrong)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from passlb.api.client import ApiClient
from passlb.lab import LabSpec
from passlb.lab.flowtable import fill_flows, only_backend_id

from .conftest import MakeLab
from .daemon_lab import API, lab_config, start_daemon

pytestmark = pytest.mark.kernel

FLOWS = 300_000  # seconds to walk in the daemon


def patient_status() -> dict[str, Any]:
    return ApiClient(API, timeout=60.0).get("/api/v1/status")  # a guard against a hang only


def test_status_answers_while_the_flow_table_is_counted_and_then_shows_the_count(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(LabSpec(backends=1, ipv6=False))
    for_web = lab_config(lab, "dsr", [("web", "tcp", 80)], 'type = "none"')
    config_file = tmp_path / "passlb.toml"
    config_file.write_text(for_web.replace("ring_size = 1009\n", ""))
    start_daemon(lab, config_file, tmp_path / "daemon.log")
    fill_flows(lab, "web", FLOWS, only_backend_id(lab), tmp_path)
    filled = time.time()

    answered_while_counting = False
    while True:
        doc = lab.call(lab.lb.ns, patient_status)
        counted = doc["flow_count"]
        if counted["counting"]:
            # The walk runs and the event loop answered: it is not blocked by it.
            answered_while_counting = True
        if counted["age"] is not None and time.time() - counted["age"] - counted["took"] > filled:
            break  # a count that started after the flows were in
    (backend,) = doc["services"][0]["backends"]
    assert answered_while_counting
    assert backend["active_flows"] == FLOWS
    assert doc["services"][0]["active_flows"] == FLOWS
    assert doc["flow_count"]["took"] > 0
    assert (
        "flows counted" in lab.run(lab.lb.ns, [sys.executable, "-m", "passlb.cli", "status"]).stdout
    )
