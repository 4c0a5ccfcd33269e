"""`passlb demo` as root, as the README runs it: DSR in a lab, then a failover."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel


def test_dsr_demo_passes_its_own_checks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "passlb.cli", "demo", "--mode", "dsr", "--flows", "90"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "every backend saw the client's own address as its peer" in out
    assert "out of the ring" in out and "new TCP flows after b2 failed" in out
    assert "demo done; removing the lab" in out and "FAILED" not in out


def test_cluster_demo_kills_a_node_and_counts_broken_connections() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "passlb.cli", "demo", "--cluster", "--flows", "60"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("killed lb3") for line in lines)
    assert any("the router dropped 198.18.2.4 after" in line for line in lines)
    assert "connections opened: 60" in lines
    assert lines[-1] == "broken connections: 0"
