"""A full resync that repairs drift says what it repaired (issue 13: a second
daemon overwrote the rings, and the first one's resync repaired them while
logging `changes=no change`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from passlb.api.client import ApiClient
from passlb.dataplane.nft.dsr import DEFAULT_TABLE
from passlb.lab import Lab, LabSpec

from .conftest import MakeLab
from .daemon_lab import API, lab_config, start_daemon, status, wait_for

pytestmark = pytest.mark.kernel

RING = 1009


def metrics() -> str:
    return ApiClient(API, timeout=10.0).get_text("/metrics")


def resync_and_wait(lab: Lab) -> dict[str, Any]:
    """`passlb resync`, then the status once a full apply after it went through."""
    before = lab.call(lab.lb.ns, status)["applies"]
    lab.run(lab.lb.ns, [sys.executable, "-m", "passlb.cli", "resync"])
    wait_for(lab, lambda doc: doc["applies"] > before and doc["last_apply"]["full"], 30)
    return lab.call(lab.lb.ns, status)


def ring_slots(lab: Lab) -> int:
    listed = lab.run(lab.lb.ns, ["nft", "-j", "list", "map", "netdev", DEFAULT_TABLE, "ring_web"])
    (ring,) = [item["map"] for item in json.loads(listed.stdout)["nftables"] if "map" in item]
    return len(ring.get("elem", []))


def test_a_resync_reports_what_it_put_back_and_nothing_when_nothing_changed(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(LabSpec(backends=2, ipv6=False))
    config = tmp_path / "passlb.toml"
    config.write_text(lab_config(lab, "dsr", [("web", "tcp", 80)], 'type = "none"'))
    log = tmp_path / "daemon.log"
    start_daemon(lab, config, log)

    untouched = resync_and_wait(lab)
    assert untouched["resync_repairs"] == []  # no false alarm on a table nobody touched
    assert "resync repaired" not in log.read_text()

    # Behind the daemon's back: the ring emptied, as a second daemon's or a hand's write might.
    lab.run(lab.lb.ns, ["nft", "flush", "map", "netdev", DEFAULT_TABLE, "ring_web"])
    assert ring_slots(lab) == 0
    repaired = resync_and_wait(lab)

    assert repaired["resync_repairs"] == [{"service": "web", "kind": "ring_slots", "total": RING}]
    assert ring_slots(lab) == RING
    assert "resync repaired drift" in log.read_text() and f"ring_slots {RING}" in log.read_text()
    exposition = lab.call(lab.lb.ns, metrics)
    assert f'passlb_resync_repairs_total{{service="web",kind="ring_slots"}} {RING}' in exposition
