"""`kill -9` of the real daemon under traffic: the kernel keeps forwarding, and a
restarted daemon adopts its tables without a flush (issues 4 and 5)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from passlb.lab import Lab, LabSpec

from .daemon_lab import lab_config, start_daemon

pytestmark = pytest.mark.kernel

STREAM_SECONDS = 5.0

STREAMS = """
import json, sys, threading
from passlb.lab.client import tcp_stream, udp_stream
vip, seconds = sys.argv[1], float(sys.argv[2])
out = {}
t = threading.Thread(target=lambda: out.update(tcp=tcp_stream(vip, 80, seconds)))
t.start()
out["udp"] = udp_stream(vip, 53, seconds, interval=0.02)
t.join()
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["dsr", "nat"])
def test_kill_9_keeps_forwarding_and_restart_adopts(
    make_lab: Callable[..., Lab], tmp_path: Path, mode: str
) -> None:
    lab = make_lab(
        LabSpec(backends=3, backend_gateway="router" if mode == "dsr" else "lb", ipv6=False)
    )
    for b in lab.backends:
        lab.start_servers(b, tcp=[80], udp=[53])
        if mode == "dsr":
            lab.run(b.ns, [sys.executable, "-m", "passlb.cli", "backend-setup", "--vip", lab.vip4])
    config_file = tmp_path / "passlb.toml"
    config_file.write_text(
        lab_config(lab, mode, [("web", "tcp", 80), ("dns", "udp", 53)], 'type = "none"')
    )
    log = tmp_path / "daemon.log"
    daemon = start_daemon(lab, config_file, log)

    streams = lab.spawn(
        lab.clients[0].ns,
        [sys.executable, "-c", STREAMS, lab.vip4, str(STREAM_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    daemon.kill()  # SIGKILL: no cleanup, no goodbye
    daemon.wait()
    time.sleep(1.0)  # traffic flows with no control plane at all
    # Every change the restarted daemon makes to the ruleset, as the kernel reports it.
    monitor = lab.spawn(
        lab.lb.ns,
        ["nft", "monitor", "ruleset"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # "unknown set" notes about anonymous sets
        text=True,
    )
    time.sleep(0.2)
    start_daemon(lab, config_file, log)
    out, _ = streams.communicate(timeout=STREAM_SECONDS + 10)
    result = json.loads(out)
    monitor.terminate()
    changes, _ = monitor.communicate(timeout=5)

    tcp, udp = result["tcp"], result["udp"]
    assert tcp["errors"] == [], tcp
    assert tcp["rounds"] > 10 and tcp["received"] == tcp["sent"]
    assert udp["errors"] == [] and udp["lost"] == [], udp
    assert udp["sent"] > 100
    assert len(udp["by_backend"]) == 1, "the UDP flow moved to another backend"
    # Adopted, not rebuilt: rules may be rewritten (atomically, in one transaction)
    # but no table, chain or named map (flow tables, rings) was deleted or flushed.
    removals = [
        line
        for line in changes.splitlines()
        if line.startswith(("delete", "flush"))
        and not line.startswith(("delete rule", "delete set netdev passlb __set"))
        and not line.startswith("delete set inet passlb_nat __set")
    ]
    assert removals == [], changes
