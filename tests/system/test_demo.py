"""`passlb demo` as the README runs it: the proxy demo (the mode without root)."""

from __future__ import annotations

import subprocess
import sys


def test_proxy_demo_shows_client_addresses_and_a_failover() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "passlb.cli", "demo", "--mode", "proxy", "--flows", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PROXY v2" in done.stdout
    assert "demo done" in done.stdout and "FAILED" not in done.stdout
