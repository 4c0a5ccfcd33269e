"""The daemon without its event loop running: the counter sampler and reloads."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from passlb.api.views import format_status
from passlb.config import parse_config
from passlb.daemon import Daemon
from passlb.dataplane.base import ApplyResult, Flow, ServiceCounters
from passlb.model import Mode
from passlb.state import DesiredState

CONFIG = """
[[services]]
name = "web"
vip = "127.0.0.1"
ports = 18080
mode = "proxy"
[[services.backends]]
address = "127.0.0.2"
port = 18081
"""


class CountingDriver:
    name = "proxy"

    def __init__(self) -> None:
        self.reads: list[bool] = []  # the active_flows argument of each counters() call
        self.threads: list[int] = []  # and the thread it ran in

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        return ApplyResult(full=full, operations=0, duration=0.0)

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        self.reads.append(active_flows)
        self.threads.append(threading.get_ident())
        return {}

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        return []

    def close(self, *, cleanup: bool = False) -> None:
        pass


def test_the_sampler_skips_active_flows_and_status_reads_them() -> None:
    daemon = Daemon(Path("passlb.toml"), parse_config(CONFIG))
    driver = CountingDriver()
    daemon.drivers[Mode.PROXY] = driver

    async def sample_once() -> None:
        task = asyncio.create_task(daemon.sample_counters())
        while not driver.reads:
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(sample_once())
    assert driver.reads == [False]
    asyncio.run(daemon.status())  # what status and metrics call
    assert driver.reads == [False, True]


def test_status_counts_kernel_flows_off_the_event_loop() -> None:
    daemon = Daemon(Path("passlb.toml"), parse_config(CONFIG))
    proxy, kernel = CountingDriver(), CountingDriver()
    daemon.drivers[Mode.PROXY] = proxy
    daemon.drivers[Mode.DSR] = kernel  # a flow count may walk a million entries

    async def status_from_the_loop() -> int:
        await daemon.status()
        await daemon.metrics()
        return threading.get_ident()

    loop_thread = asyncio.run(status_from_the_loop())
    assert proxy.threads == [loop_thread, loop_thread]  # cheap, and not thread-safe
    assert kernel.reads == [True, True]
    assert loop_thread not in kernel.threads


def test_a_reload_says_which_start_only_settings_it_left(tmp_path: Path) -> None:
    path = tmp_path / "passlb.toml"
    path.write_text(CONFIG)
    daemon = Daemon(path, parse_config(CONFIG))
    daemon.drivers[Mode.PROXY] = CountingDriver()
    path.write_text('[proxy]\nworkers = 2\n[log]\nlevel = "debug"\n' + CONFIG)

    ok, issues = asyncio.run(daemon.reload())
    assert (ok, issues) == (True, [])
    assert daemon.last_reload["restart_needed"] == ["[log]", "[proxy]"]
    assert daemon.config.proxy.workers == 2  # the new file is the config from now on
    assert "read at start only" in daemon.telemetry.events.since()[-1]["message"]
    assert "[log], [proxy] as they were" in format_status(asyncio.run(daemon.status()))

    asyncio.run(daemon.reload())  # the same file again: nothing more to say
    assert daemon.last_reload["restart_needed"] == []
