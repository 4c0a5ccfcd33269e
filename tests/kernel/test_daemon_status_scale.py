"""Status over a big dsr flow table: the daemon counts the flows in the
background and answers status meanwhile (no deadline: a busy machine only
makes the count slower, never the test wrong)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from passlb.api.client import ApiClient
from passlb.dataplane.nft.dsr import DEFAULT_TABLE
from passlb.dataplane.nft.names import ServiceNames
from passlb.lab import LabSpec

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
    listed = lab.run(lab.lb.ns, ["nft", "-j", "list", "map", "netdev", DEFAULT_TABLE, "backends4"])
    # backends4 maps each backend id (its element key, with a comment) to its chain.
    (backend_id,) = [
        key["elem"]["val"]
        for item in json.loads(listed.stdout)["nftables"]
        if "map" in item
        for key, _chain in item["map"]["elem"]
    ]
    flows = ServiceNames.of("web").flows("tcp")
    script = tmp_path / "flows.nft"
    with open(script, "w") as out:
        for first in range(0, FLOWS, 10_000):
            elements = ", ".join(
                f"198.18.{1 + i // 60_000}.{1 + i // 240 % 250} . {1024 + i % 60_000} . 80 "
                f"timeout 600s : {backend_id}"
                for i in range(first, first + 10_000)
            )
            out.write(f"add element netdev {DEFAULT_TABLE} {flows} {{ {elements} }}\n")
    lab.run(lab.lb.ns, ["nft", "-f", str(script)], timeout=120)  # one transaction
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
