"""`passlb run` checks everything before its first kernel write, and one daemon
owns a namespace's data plane (issue 13: a config `check` passed made `run`
write the kernel and then exit 3; a second daemon overwrote the first's rings)."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from passlb.dataplane.nft.dsr import DEFAULT_TABLE
from passlb.lab import LabSpec

from .conftest import MakeLab
from .daemon_lab import API, lab_config, start_daemon, status

pytestmark = pytest.mark.kernel

PASSLB = [sys.executable, "-m", "passlb.cli"]


def test_a_check_that_cannot_run_stops_run_before_the_kernel_is_written(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(LabSpec(backends=1, ipv6=False))
    # The file: dsr on all ports, a tcp check without health.port.
    text = lab_config(lab, "dsr", [("any", "tcp", 80)], 'type = "tcp"')
    config = tmp_path / "passlb.toml"
    config.write_text(text.replace("ports = [80]", 'ports = "all"'))

    checked = lab.run(lab.lb.ns, [*PASSLB, "check", str(config)], check=False)
    ran = lab.run(lab.lb.ns, [*PASSLB, "run", str(config)], check=False, timeout=60)

    problem = "services[any].health.port: a tcp check needs a port"
    assert checked.returncode == 3 and problem in checked.stderr
    assert ran.returncode == 3 and problem in ran.stderr, ran.stderr
    assert "apply" not in ran.stderr  # nothing was applied, nothing was logged as applied
    tables = lab.run(lab.lb.ns, ["nft", "list", "tables"]).stdout
    assert "passlb" not in tables


def test_a_second_daemon_is_refused_and_a_killed_one_does_not_block_its_restart(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(LabSpec(backends=1, ipv6=False))
    config = tmp_path / "passlb.toml"
    config.write_text(lab_config(lab, "dsr", [("web", "tcp", 80)], 'type = "none"'))
    first = start_daemon(lab, config, tmp_path / "first.log")
    before = lab.call(lab.lb.ns, status)
    list_ring = ["nft", "-j", "list", "map", "netdev", DEFAULT_TABLE, "ring_web"]
    ring_before = lab.run(lab.lb.ns, list_ring)

    second = lab.run(lab.lb.ns, [*PASSLB, "run", str(config)], check=False, timeout=60)

    assert second.returncode == 1, second.stderr
    # `ip netns exec` runs the daemon as its child: the lock names the daemon's own pid.
    (holder,) = re.findall(r"pid (\d+), admin API ([^,]+),", second.stderr)
    assert holder[1] == API
    assert os.path.exists(f"/proc/{holder[0]}") and first.poll() is None
    assert "another passlb daemon runs the data plane of this network namespace" in second.stderr
    after = lab.call(lab.lb.ns, status)
    assert after["applies"] == before["applies"] and after["state"]["in_sync"]
    ring_after = lab.run(lab.lb.ns, list_ring)
    assert ring_after.stdout == ring_before.stdout

    os.kill(int(holder[0]), signal.SIGKILL)
    first.wait(timeout=30)
    third = start_daemon(lab, config, tmp_path / "third.log")  # adopts the table, no flush
    assert third.poll() is None
