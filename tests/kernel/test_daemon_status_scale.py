"""A status read counts a big dsr flow table without stopping the daemon:
the walk runs in a worker thread while the event loop keeps answering."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from passlb.dataplane.nft.dsr import DEFAULT_TABLE
from passlb.dataplane.nft.names import ServiceNames
from passlb.lab import LabSpec

from .conftest import MakeLab
from .daemon_lab import API, lab_config, start_daemon, status

pytestmark = pytest.mark.kernel

FLOWS = 300_000  # 3.5-4.8 s to count in the daemon
# Asks the API for its cheapest answer every 10 ms until stdin closes; prints
# the slowest answer's seconds.
POLLER = f"""
import sys, threading, time
from passlb.api.client import ApiClient
client, slowest, done = ApiClient("{API}", timeout=30.0), 0.0, threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
while not done.is_set():
    started = time.monotonic()
    client.get("/api/v1/events")
    slowest = max(slowest, time.monotonic() - started)
    time.sleep(0.01)
print(slowest)
"""


def test_status_counts_a_big_flow_table_while_the_daemon_answers(
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
                f"timeout 300s : {backend_id}"
                for i in range(first, first + 10_000)
            )
            out.write(f"add element netdev {DEFAULT_TABLE} {flows} {{ {elements} }}\n")
    lab.run(lab.lb.ns, ["nft", "-f", str(script)])

    poller = lab.spawn(
        lab.lb.ns,
        [sys.executable, "-c", POLLER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    started = time.monotonic()
    doc = lab.call(lab.lb.ns, status)
    took = time.monotonic() - started
    slowest = float(poller.communicate("", timeout=30)[0])

    (backend,) = doc["services"][0]["backends"]
    assert backend["active_flows"] == FLOWS
    assert took > 0.5  # a walk long enough to have stopped the loop
    assert slowest < took / 2, f"the loop stalled {slowest:.2f} s in a {took:.2f} s status"
