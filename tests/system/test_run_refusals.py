"""`passlb run` refuses before it opens a service: an admin API address in use."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from .daemon_harness import address_block


def test_an_api_address_in_use_stops_the_start_before_any_service_opens(tmp_path: Path) -> None:
    net = address_block()
    with socket.create_server((f"{net}.1", 0)) as squatter:
        api_port = squatter.getsockname()[1]
        config = tmp_path / "passlb.toml"
        config.write_text(
            f'[api]\nlisten = "{net}.1:{api_port}"\n\n'
            f'[[services]]\nname = "web"\nvip = "{net}.10"\nports = 18080\nmode = "proxy"\n'
            f'[services.health]\ntype = "none"\n'
            f'[[services.backends]]\naddress = "{net}.11"\n'
        )
        ran = subprocess.run(
            [sys.executable, "-m", "passlb.cli", "run", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ran.returncode == 1, ran.stderr
    assert f"passlb: api.listen: cannot listen on {net}.1:{api_port}" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert "apply ok" not in ran.stderr  # the service's listener was never opened
