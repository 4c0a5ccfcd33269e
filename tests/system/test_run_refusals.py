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


# `passlb` with libnftables.so.1 unfindable, as on a machine without Debian's
# libnftables1: every dlopen of it fails the way the dynamic loader does.
WITHOUT_LIBNFTABLES = """
import ctypes, sys
real_init = ctypes.CDLL.__init__
def no_libnftables(self, name, *args, **kwargs):
    if name and "libnftables" in str(name):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    real_init(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = no_libnftables
from passlb.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_libnftables_run_says_what_to_install_and_check_warns(tmp_path: Path) -> None:
    net = address_block()
    config = tmp_path / "passlb.toml"
    config.write_text(
        f'interfaces = ["lo"]\n[api]\nlisten = "{net}.1:9180"\n\n'
        f'[[services]]\nname = "web"\nvip = "198.18.0.10"\nports = 443\nmode = "dsr"\n'
        f'[[services.backends]]\naddress = "198.18.2.11"\n'
    )

    def passlb(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", WITHOUT_LIBNFTABLES, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    ran = passlb("run", str(config))
    checked = passlb("check", str(config))

    assert ran.returncode == 1, ran.stderr
    assert "passlb: the dsr and nat modes need libnftables, which is not installed" in ran.stderr
    assert "apt-get install nftables libnftables1" in ran.stderr and "./run" in ran.stderr
    assert "netns" not in ran.stderr and "Traceback" not in ran.stderr
    assert "nft_ctx_free" not in ran.stderr  # the binding's half-built __del__
    assert checked.returncode == 0
    assert f"{config}: warning: the dsr and nat modes need libnftables" in checked.stderr
    assert "apt-get install nftables libnftables1" in checked.stderr
