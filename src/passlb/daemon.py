"""`passlb run`: the one place that wires concrete classes together.

config file ──► Reconciler ──► drivers (dsr / nat / proxy)
                   ▲
HealthChecker ─────┘        admin API ──► drain / enable / disable / reload / status

Signals: SIGHUP reloads (validated first; a bad file changes nothing), SIGTERM
and SIGINT stop. By default the kernel tables stay and keep forwarding after
the daemon exits (a restart adopts them without a flush); `--cleanup` removes
them. A second SIGTERM/SIGINT forces exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from passlb.api.server import build_app, start_api
from passlb.config import load_config
from passlb.control.desired import HealthStatus
from passlb.control.reconciler import Reconciler, assume_all_healthy
from passlb.dataplane.base import Driver
from passlb.dataplane.proxy import new_event_loop
from passlb.errors import ConfigError, DataplaneError
from passlb.health.scheduler import HealthChecker, plan_checks
from passlb.model import AdminState, Config, LogFormat, Mode

log = logging.getLogger("passlb.daemon")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def detect_interfaces() -> tuple[str, ...]:
    """The interface of the default route: where VIP traffic usually arrives."""
    out = subprocess.run(
        ["ip", "-j", "route", "show", "default"], capture_output=True, text=True, check=False
    )
    routes = json.loads(out.stdout or "[]")
    devs = tuple(dict.fromkeys(r["dev"] for r in routes if "dev" in r))
    if not devs:
        raise DataplaneError(
            "interfaces: not set and no default route to detect them from; "
            'set interfaces = ["eth0"] in the config'
        )
    return devs


def build_drivers(config: Config, interfaces: tuple[str, ...]) -> dict[Mode, Driver]:
    """A driver for each mode the config uses (kernel drivers need root)."""
    modes = {s.mode for s in config.services}
    drivers: dict[Mode, Driver] = {}
    if Mode.DSR in modes:
        from passlb.dataplane.nft.dsr import DsrDriver

        drivers[Mode.DSR] = DsrDriver(interfaces=interfaces)
    if Mode.PROXY in modes:
        from passlb.dataplane.proxy.driver import ProxyDriver

        drivers[Mode.PROXY] = ProxyDriver()
    return drivers


def cleanup_dataplane() -> None:
    """Remove every kernel table passlb installed (`passlb cleanup`)."""
    from passlb.dataplane.nft.dsr import DsrDriver

    DsrDriver(interfaces=()).cleanup()


class Daemon:
    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.started = time.time()
        self.last_reload: dict[str, Any] = {"at": None, "ok": True, "issues": []}
        interfaces = config.interfaces
        if not interfaces and any(s.mode is not Mode.PROXY for s in config.services):
            interfaces = detect_interfaces()
            log.info("interfaces not configured; detected %s", ",".join(interfaces))
        self.interfaces = interfaces
        self.drivers = build_drivers(config, interfaces)
        self.reconciler = Reconciler(config, self.drivers)
        # Until a check says otherwise every backend counts as healthy: a daemon
        # restart must not empty the ring it adopts from the kernel.
        self.reconciler.replace_health(assume_all_healthy(config))
        self.checker = HealthChecker(self._on_health)

    @property
    def config(self) -> Config:
        return self.reconciler.config

    def _on_health(self, service: str, backend: str, status: HealthStatus) -> None:
        log.info(
            "health service=%s backend=%s healthy=%s weight=%s",
            service,
            backend,
            status.healthy,
            status.weight,
        )
        self.reconciler.set_health(service, backend, status)

    # -- what the admin API may do --------------------------------------------

    def set_admin(self, service: str, backend: str, state: AdminState) -> None:
        self.reconciler.set_admin(service, backend, state)
        log.info("admin service=%s backend=%s state=%s", service, backend, state)

    async def reload(self) -> tuple[bool, list[str]]:
        self.last_reload = {"at": time.time(), "ok": False, "issues": []}
        try:
            config = load_config(self.config_path)
            plan_checks(config)  # a check that cannot run rejects the file, before any change
        except ConfigError as err:
            issues = [str(i) for i in err.issues]
            self.last_reload["issues"] = issues
            log.error("reload rejected; running config stays: %s", "; ".join(issues))
            return False, issues
        except OSError as err:
            self.last_reload["issues"] = [f"{self.config_path}: {err.strerror}"]
            log.error("reload rejected: %s", err)
            return False, self.last_reload["issues"]
        new_modes = {s.mode for s in config.services} - set(self.drivers)
        if new_modes:
            self.drivers.update(build_drivers(config, self.interfaces))
        self.reconciler.set_config(config)
        await self.checker.update(config)
        self.last_reload["ok"] = True
        log.info("reload accepted services=%d", len(config.services))
        return True, []

    def status(self) -> dict[str, Any]:
        from passlb.api.views import status_document

        return status_document(self)

    # -- running --------------------------------------------------------------

    async def serve(self, *, cleanup: bool) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_stop() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                os._exit(1)
            log.info("stopping")
            stop.set()

        reloads: set[asyncio.Task[tuple[bool, list[str]]]] = set()

        def on_reload() -> None:
            task = loop.create_task(self.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, on_reload)

        self.reconciler.apply_once(full=True)
        api = await start_api(build_app(self, self.config.api.token), self.config.api.listen)
        log.info("admin API listening on %s", self.config.api.listen)
        await self.checker.update(self.config)
        reconcile = loop.create_task(self.reconciler.run(), name="reconciler")
        try:
            await stop.wait()
        finally:
            await asyncio.gather(*reloads, return_exceptions=True)
            reconcile.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconcile
            await self.checker.close()
            await api.cleanup()
            for driver in self.drivers.values():
                driver.close(cleanup=cleanup)
            log.info("stopped; kernel tables %s", "removed" if cleanup else "left forwarding")


def run_daemon(config_path: str, *, cleanup: bool = False) -> int:
    config = load_config(config_path)
    setup_logging(config.log_level, config.log_format)
    daemon = Daemon(Path(config_path), config)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(daemon.serve(cleanup=cleanup))
    return 0
