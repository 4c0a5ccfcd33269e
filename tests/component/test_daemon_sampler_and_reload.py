"""The daemon without its event loop running: the counter sampler and reloads."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from passlb.api.views import format_status
from passlb.config import parse_config
from passlb.daemon import Daemon
from passlb.dataplane.base import ApplyResult, BackendCounters, Flow, ServiceCounters
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
    """Counts its counter reads and where they ran; a blocking one reports 7 active
    flows to its backend when asked to count them."""

    name = "proxy"

    def __init__(self, *, blocking: bool = False) -> None:
        self.blocking = blocking
        self.reads: list[bool] = []  # the active_flows argument of each counters() call
        self.threads: list[int] = []  # and the thread it ran in

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        return ApplyResult(full=full, operations=0, duration=0.0)

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        self.reads.append(active_flows)
        self.threads.append(threading.get_ident())
        flows = 7 if active_flows else 0
        return {"web": ServiceCounters({"127.0.0.2:18081": BackendCounters(active_flows=flows)})}

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        return []

    def close(self, *, cleanup: bool = False) -> None:
        pass


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def _run_until(coroutine: Coroutine[Any, Any, None], condition: Callable[[], bool]) -> None:
    task = asyncio.create_task(coroutine)
    await _until(condition)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_the_sampler_and_status_never_walk_a_kernel_flow_table() -> None:
    daemon = Daemon(Path("passlb.toml"), parse_config(CONFIG))
    kernel = CountingDriver(blocking=True)  # a flow count may walk a million entries
    daemon.drivers[Mode.PROXY] = kernel

    async def sample_then_status() -> tuple[int, dict[str, Any]]:
        await _run_until(daemon.sample_counters(), lambda: bool(kernel.reads))
        return threading.get_ident(), await daemon.status()

    loop_thread, doc = asyncio.run(sample_then_status())
    assert kernel.reads == [False, False]
    assert loop_thread not in kernel.threads
    (backend,) = doc["services"][0]["backends"]
    assert backend["active_flows"] is None  # not counted yet, and not shown as 0
    assert doc["flow_count"] == {"age": None, "took": None, "counting": False}
    assert "flows: not counted yet" in format_status(doc)


def test_status_serves_the_background_count_with_its_age() -> None:
    daemon = Daemon(Path("passlb.toml"), parse_config(CONFIG))
    kernel = CountingDriver(blocking=True)
    daemon.drivers[Mode.PROXY] = kernel

    async def count_then_status() -> tuple[int, dict[str, Any], str]:
        await _run_until(daemon.count_flows(), lambda: daemon.telemetry.flow_count is not None)
        return threading.get_ident(), await daemon.status(), await daemon.metrics()

    loop_thread, doc, metrics = asyncio.run(count_then_status())
    assert kernel.reads == [True, False, False]  # the background count, then status, metrics
    assert loop_thread not in kernel.threads
    assert doc["services"][0]["backends"][0]["active_flows"] == 7
    assert doc["services"][0]["active_flows"] == 7
    assert doc["flow_count"]["age"] >= 0 and doc["flow_count"]["counting"] is False
    assert "flows counted " in format_status(doc)
    assert "passlb_flow_count_age_seconds " in metrics
    assert 'passlb_backend_active_flows{service="web",backend="127.0.0.2:18081"} 7' in metrics


def test_a_driver_on_the_loop_is_read_on_the_loop_with_its_flows() -> None:
    daemon = Daemon(Path("passlb.toml"), parse_config(CONFIG))
    proxy = CountingDriver()
    daemon.drivers[Mode.PROXY] = proxy

    async def status_from_the_loop() -> tuple[int, dict[str, Any]]:
        return threading.get_ident(), await daemon.status()

    loop_thread, doc = asyncio.run(status_from_the_loop())
    assert proxy.threads == [loop_thread]  # cheap, and not thread-safe
    assert doc["services"][0]["backends"][0]["active_flows"] == 7
    assert doc["flow_count"] is None


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
