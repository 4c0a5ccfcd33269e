"""Fixtures for system tests: `passlb run` as a child process, stopped by pid at test end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .daemon_harness import Daemon, MakeDaemon, address_block


@pytest.fixture
def net() -> str:
    """This test's own "127.A.B" address block."""
    return address_block()


@pytest.fixture
def make_daemon(tmp_path: Path, net: str) -> Iterator[MakeDaemon]:
    """`make_daemon(services_toml)` writes the config and starts the daemon
    (API on <net>.1:9180); every daemon it started is stopped afterwards."""
    daemons: list[Daemon] = []

    def make(services: str) -> Daemon:
        daemon = Daemon(tmp_path / f"daemon{len(daemons)}", api=f"{net}.1:9180")
        daemon.workdir.mkdir()
        daemon.write_config(services)
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()
