"""`passlb run`: the one place that wires concrete classes together.

config file ──► Reconciler ──► drivers (dsr / nat / proxy)
                   ▲
HealthChecker ─────┘        admin API ──► drain / enable / disable / weight / reload
                             status, events, flows, /metrics, status page (api/)

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
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from passlb.api.metrics import render_metrics
from passlb.api.server import build_app, start_api
from passlb.api.telemetry import SERVICE_TOTAL, FlowCount, Telemetry
from passlb.api.views import StatusSnapshot, read_counters, status_document
from passlb.bgp.agent import BgpAgent
from passlb.bgp.bird import EventSink
from passlb.config import load_config
from passlb.control.reconciler import ApplyRecord, Reconciler, assume_all_healthy
from passlb.dataplane.base import Driver, Flow, describe_repairs
from passlb.dataplane.owner import DataplaneBusy, hold_dataplane
from passlb.dataplane.proxy import new_event_loop
from passlb.errors import ConfigError, DataplaneError, PasslbError
from passlb.health.scheduler import HealthChecker, plan_checks
from passlb.logs import log_event, setup_logging
from passlb.model import AdminState, Config, Mode
from passlb.state import HealthStatus

log = logging.getLogger("passlb.daemon")

COUNTER_SAMPLE_INTERVAL = 1.0  # seconds between counter reads for the rates
KERNEL_MODES = frozenset({Mode.DSR, Mode.NAT})  # the modes whose tables one daemon owns
# Seconds between background counts of the kernel's flow tables, at least; a
# count that takes longer waits 20 times its own duration, so counting stays
# under 5 % of a core (0.5 s of CPU per 100,000 dsr entries).
FLOW_COUNT_INTERVAL = 5.0
FLOW_COUNT_SHARE = 0.05


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
    if Mode.NAT in modes:
        from passlb.dataplane.nft.nat import NatDriver

        drivers[Mode.NAT] = NatDriver()
    if Mode.PROXY in modes:
        from passlb.dataplane.proxy.driver import ProxyDriver
        from passlb.dataplane.proxy.workers import WorkerPool, resolve_workers

        workers = resolve_workers(config.proxy.workers)
        drivers[Mode.PROXY] = (
            WorkerPool(workers, log_level=config.log_level, log_format=config.log_format)
            if workers > 1
            else ProxyDriver()  # the relay on the daemon's own loop
        )
    return drivers


def cleanup_dataplane() -> list[str]:
    """Remove every kernel table passlb installed (`passlb cleanup`); the removed ones."""
    from passlb.dataplane.nft import dsr, nat
    from passlb.dataplane.nft.objects import Table
    from passlb.dataplane.nft.ruleset import delete_table
    from passlb.dataplane.nft.runner import NftRunner

    runner = NftRunner()
    tables = (Table("netdev", dsr.DEFAULT_TABLE), Table("inet", nat.DEFAULT_TABLE))
    return [f"{t.family} {t.name}" for t in tables if delete_table(runner, t)]


def start_only_changes(running: Config, loaded: Config) -> list[str]:
    """The settings read at start only that `loaded` changes (a reload leaves them)."""
    settings = {
        "interfaces": (running.interfaces, loaded.interfaces),
        "[api]": (running.api, loaded.api),
        "[log]": (
            (running.log_level, running.log_format),
            (loaded.log_level, loaded.log_format),
        ),
        "[proxy]": (running.proxy, loaded.proxy),
        # The speaker starts and stops with the daemon, in its run_dir; the
        # rest of [bgp] reloads.
        "[bgp] (added or removed)": (running.bgp is None, loaded.bgp is None),
        "bgp.run_dir": (
            running.bgp.run_dir if running.bgp and loaded.bgp else None,
            loaded.bgp.run_dir if running.bgp and loaded.bgp else None,
        ),
    }
    return [name for name, (old, new) in settings.items() if old != new]


def build_bgp_agent(config: Config, on_event: EventSink) -> BgpAgent | None:
    """The BGP agent and its speaker when the config has [bgp] (SpeakerError:
    the speaker is not installed)."""
    if config.bgp is None:
        return None
    from passlb.bgp.bird import BirdSpeaker

    return BgpAgent(config.bgp, BirdSpeaker(config.bgp, on_event), on_event)


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
        self._owned: IO[str] | None = None  # the data-plane lock, once a kernel mode is used
        self._own_kernel_dataplane(config)
        self.drivers = build_drivers(config, interfaces)
        self.telemetry = Telemetry()
        # What the health checker last said of each backend, to tell a verdict
        # change from a reported-weight change.
        self._announced: dict[tuple[str, str], HealthStatus] = {}
        self._last_apply_failed = False
        self.reconciler = Reconciler(config, self.drivers, on_apply=self._on_apply)
        # Until a check says otherwise every backend counts as healthy: a daemon
        # restart must not empty the ring it adopts from the kernel.
        self.reconciler.replace_health(assume_all_healthy(config))
        # A backend's first failed check (of the `fall` it takes) has its
        # rings built ahead, so the transition applies without building any.
        self.checker = HealthChecker(self._on_health, on_pending=self.reconciler.prepare)
        self.bgp = build_bgp_agent(config, self._event)

    @property
    def config(self) -> Config:
        return self.reconciler.config

    def _own_kernel_dataplane(self, config: Config) -> None:
        """Take this namespace's data-plane lock before a kernel driver exists
        (DataplaneBusy names the daemon holding it); proxy-only configs need none."""
        if self._owned is None and any(s.mode in KERNEL_MODES for s in config.services):
            self._owned = hold_dataplane(config.api.listen, str(self.config_path))

    def _on_health(self, service: str, backend: str, status: HealthStatus) -> None:
        """A backend's verdict or its reported weight changed (the checker calls
        for both): each gets its own event, so a weight change is not an "up"."""
        record = self.checker.record(service, backend)
        reason = record.reason if record else ""
        before = self._announced.get((service, backend))
        self._announced[(service, backend)] = status
        if before is None or before.healthy != status.healthy:
            state = "up" if status.healthy else "down"
            self.telemetry.health_history.add(service, backend, time.time(), status.healthy, reason)
            self._event(
                "health",
                f"{service}/{backend} {state}: {reason}",
                service=service,
                backend=backend,
                healthy=status.healthy,
                reason=reason,
                reported_weight=status.weight,
            )
        if before is not None and before.weight != status.weight:
            self._event(
                "reported_weight",
                f"{service}/{backend} reports weight {_weight_text(status.weight)}"
                f" (was {_weight_text(before.weight)})",
                service=service,
                backend=backend,
                reported_weight=status.weight,
                previous=before.weight,
            )
        self.reconciler.set_health(service, backend, status)

    def _on_apply(self, record: ApplyRecord) -> None:
        if self.bgp is not None and record.error is None:
            self.bgp.state_changed(self.reconciler.applied)
        self.telemetry.apply_duration.observe(record.duration)
        self.telemetry.ring_build.observe(record.compute_duration)
        if record.error is not None:
            self._event("apply", f"apply failed: {record.error}", ok=False, error=record.error)
        elif self._last_apply_failed:
            self._event("apply", "apply ok again after a failure", ok=True)
        self._last_apply_failed = record.error is not None
        if record.repairs:
            self.telemetry.resync_repairs.update(record.repairs)
            self._event(
                "resync",
                "full resync repaired drift (the data plane had changed behind passlb): "
                + describe_repairs(record.repairs),
                log_as="resync repaired",
                ok=True,
                repairs=describe_repairs(record.repairs),
            )

    def _event(self, kind: str, message: str, *, log_as: str = "", **fields: Any) -> None:
        """One event for the API and the status page, and the same as a log line
        (``log_as`` names it in the log when the kind alone says too little)."""
        self.telemetry.events.add(time.time(), kind, message, **fields)
        level = logging.ERROR if fields.get("ok") is False else logging.INFO
        log_event(log, level, log_as or kind, **fields)

    # -- what the admin API may do --------------------------------------------

    def set_admin(self, service: str, backend: str, state: AdminState) -> None:
        self.update_backend(service, backend, state=state, weight=None)

    def update_backend(
        self, service: str, backend: str, *, state: AdminState | None, weight: int | None
    ) -> None:
        """Admin state and/or weight; KeyError/ValueError before anything changes."""
        if weight is not None:
            self.reconciler.set_weight(service, backend, weight)  # validates both first
            self._event(
                "weight",
                f"{service}/{backend} weight {weight}",
                service=service,
                backend=backend,
                weight=weight,
            )
        if state is not None:
            self.reconciler.set_admin(service, backend, state)
            self._event(
                "admin",
                f"{service}/{backend} {state}",
                service=service,
                backend=backend,
                state=state.value,
            )

    def set_node_drained(self, drained: bool) -> str:
        """passlb node drain / undrain; LookupError when nothing is announced."""
        if self.bgp is None:
            raise LookupError("bgp: this node announces nothing (its config has no [bgp])")
        return self.bgp.set_drained(drained)

    def events(self, since: int) -> list[dict[str, Any]]:
        return self.telemetry.events.since(since)

    def history(self, service: str | None, backend: str | None, seconds: int) -> dict[str, Any]:
        """Rate and active-flow history: every service's total, or one service's
        total and one backend's; KeyError for an unknown service or backend."""
        if service is None:
            keys = [(svc.name, SERVICE_TOTAL) for svc in self.config.services]
        else:
            self.reconciler.check_names(service, backend)
            keys = [(service, SERVICE_TOTAL)]
            if backend is not None:
                keys.append((service, backend))
        return self.telemetry.history.read(keys, seconds)

    def service_modes(self) -> dict[str, str]:
        return {svc.name: svc.mode.value for svc in self.config.services}

    async def flows(self, service: str | None, backend: str | None) -> list[Flow]:
        """Flows from every driver's table, a blocking driver's listing in a worker
        thread; KeyError for an unknown service or backend."""
        if service is not None:
            self.reconciler.check_names(service, backend)
        found: list[Flow] = []
        for driver in list(self.drivers.values()):
            if driver.blocking:
                found.extend(await asyncio.to_thread(driver.flows, service, backend))
            else:
                found.extend(driver.flows(service, backend))
        return found

    async def metrics(self) -> str:
        return render_metrics(
            await self.status(), self.telemetry.apply_duration, self.telemetry.ring_build
        )

    def resync(self) -> None:
        """A full resync now: every driver re-reads its data plane and repairs drift."""
        self.reconciler.request_full_resync()
        self._event("resync", "full resync requested", ok=True)

    async def reload(self) -> tuple[bool, list[str]]:
        self.last_reload = {"at": time.time(), "ok": False, "issues": []}
        self.telemetry.reloads += 1
        try:
            config = read_config(self.config_path)
            self._own_kernel_dataplane(config)  # a reload that adds dsr or nat
        except ConfigError as err:
            issues = [str(i) for i in err.issues]
        except OSError as err:
            issues = [f"{self.config_path}: {err.strerror}"]
        except DataplaneBusy as err:
            issues = [str(err)]
        else:
            issues = []
        if not issues and self.bgp is not None and config.bgp is not None:
            try:
                await self.bgp.speaker.check(config.bgp)
            except PasslbError as err:
                issues = [str(err)]
        if issues:
            self.last_reload["issues"] = issues
            self.telemetry.reload_failures += 1
            self._event(
                "reload",
                "reload rejected; the running config stays: " + "; ".join(issues),
                log_as="reload rejected",
                ok=False,
                issues="; ".join(issues),
            )
            return False, issues
        new_modes = {s.mode for s in config.services} - set(self.drivers)
        if new_modes:
            self.drivers.update(build_drivers(config, self.interfaces))
        unapplied = start_only_changes(self.config, config)
        self.reconciler.set_config(config)
        self._forget_removed(config)
        if self.bgp is not None and config.bgp is not None:
            self.bgp.set_settings(config.bgp)
        await self.checker.update(config)
        self.last_reload["ok"] = True
        self.last_reload["restart_needed"] = unapplied
        message = f"reload accepted: {len(config.services)} service(s)"
        if unapplied:
            message += f"; {', '.join(unapplied)} changed, read at start only: restart to apply"
        self._event(
            "reload",
            message,
            log_as="reload accepted",
            ok=True,
            services=len(config.services),
        )
        return True, []

    def snapshot(self) -> StatusSnapshot:
        rec = self.reconciler
        return StatusSnapshot(
            at=time.time(),
            started=self.started,
            config_path=str(self.config_path),
            interfaces=self.interfaces,
            config=rec.config,
            effective=rec.effective_config(),
            desired=rec.desired,
            applied=rec.applied,
            now=rec.clock(),
            applies=rec.stats.applies,
            apply_failures=rec.stats.apply_failures,
            last_apply=rec.stats.last_apply,
            health=self.checker.records(),
            rates=self.telemetry.rates.all(),
            reloads=self.telemetry.reloads,
            reload_failures=self.telemetry.reload_failures,
            last_reload=dict(self.last_reload),
            last_event=self.telemetry.events.last_seq,
            health_history=self.telemetry.health_history.all(),
            counted_services=frozenset(
                s.name
                for s in rec.config.services
                if (d := self.drivers.get(s.mode)) is not None and d.blocking
            ),
            flow_count=self.telemetry.flow_count,
            resync_repairs=dict(self.telemetry.resync_repairs),
            counting_flows=self.telemetry.counting_flows,
            removed=dict(rec.removed),
            bgp=None if self.bgp is None else self.bgp.document(time.time()),
        )

    def _forget_removed(self, config: Config) -> None:
        """History of services and backends the new config no longer has goes."""
        keys = [(s.name, b.key) for s in config.services for b in s.backends]
        self.telemetry.health_history.forget(keys)
        self.telemetry.history.forget(keys + [(s.name, SERVICE_TOTAL) for s in config.services])

    async def status(self) -> dict[str, Any]:
        """The status document: counters read now (a blocking driver's in a worker
        thread), a blocking driver's active flows from the last background count."""
        counters, errors = await read_counters(self.drivers, active_flows=False)
        snapshot = self.snapshot()
        counted_now = {n: c for n, c in counters.items() if n not in snapshot.counted_services}
        self.telemetry.history.observe_active(time.time(), counted_now)
        return status_document(snapshot, counters, errors)

    # -- running --------------------------------------------------------------

    async def sample_counters(self) -> None:
        """Read the data plane's counters every second so status can show rates.

        Rates need packets, bytes and new flows, a few counter objects; not
        the active flows, which walk every flow-table or conntrack entry:
        0.5 s of CPU per 100,000 dsr flow entries, 0.33 s per 32,000
        conntrack entries, and a connection-rate load leaves that many, so
        the reads took CPU from the packets. Status and metrics count them
        when asked.
        Should a read still grow slow, the sampler backs off so that reading
        stays under 5 % of a core.
        """
        last_errors: list[str] = []
        while True:
            started = time.monotonic()
            counters, errors = await read_counters(self.drivers, active_flows=False)
            cost = time.monotonic() - started
            if errors != last_errors:  # once per new problem, not every second
                for error in errors:
                    log_event(log, logging.WARNING, "counters", ok=False, error=error)
                last_errors = errors
            self.telemetry.rates.observe(time.monotonic(), counters)
            self.telemetry.history.observe_rates(time.time(), self.telemetry.rates.all())
            if self.bgp is not None:
                self.bgp.observe_counters(time.time(), counters)
            await asyncio.sleep(max(COUNTER_SAMPLE_INTERVAL, 20 * cost))

    async def count_flows(self) -> None:
        """Count the blocking drivers' active flows in a worker thread, again and
        again, for status and /metrics, which serve the last count with its age
        (a million dsr flow entries take seconds to walk; nothing waits for it)."""
        while True:
            kernel = {m: d for m, d in list(self.drivers.items()) if d.blocking}
            took = 0.0
            if kernel:
                self.telemetry.counting_flows = True
                started = time.monotonic()
                try:
                    counters, errors = await read_counters(kernel, active_flows=True)
                finally:
                    self.telemetry.counting_flows = False
                took = time.monotonic() - started
                for error in errors:
                    log_event(log, logging.WARNING, "flow count", ok=False, error=error)
                self.telemetry.history.observe_active(time.time(), counters)
                self.telemetry.flow_count = FlowCount(
                    at=time.time(),
                    took=took,
                    active={
                        (name, key): c.active_flows
                        for name, svc in counters.items()
                        for key, c in svc.backends.items()
                    },
                )
            await asyncio.sleep(max(FLOW_COUNT_INTERVAL, took / FLOW_COUNT_SHARE))

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

        # The API first: an address in use stops the start before the kernel is written.
        settings = self.config.api
        listen = settings.listen
        app = build_app(self, settings.token, read_without_token=settings.read_without_token)
        try:
            api = await start_api(app, listen)
        except OSError as err:
            raise PasslbError(f"api.listen: cannot listen on {listen}: {err.strerror}") from None
        log.info("admin API listening on %s", listen)
        # Off the loop: the first apply builds every ring (seconds at 100 services).
        await self.reconciler.apply_off_loop(full=True)
        await self.checker.update(self.config)
        reconcile = loop.create_task(self.reconciler.run(), name="reconciler")
        sampler = loop.create_task(self.sample_counters(), name="counter sampler")
        counter = loop.create_task(self.count_flows(), name="flow counter")
        tasks = [reconcile, sampler, counter]
        if self.bgp is not None:
            # Announced only now: the data plane holds the first apply.
            await self.bgp.speaker.start(self.bgp.announced())
            tasks.append(loop.create_task(self.bgp.speaker.supervise(), name="bgp speaker"))
            tasks.append(loop.create_task(self.bgp.run(), name="bgp agent"))
        try:
            await stop.wait()
        finally:
            await asyncio.gather(*reloads, return_exceptions=True)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.bgp is not None:
                # Withdraw before anything else stops: the routers move the
                # flows to the other nodes while this one still forwards.
                await self.bgp.speaker.stop()
            await self.checker.close()
            await api.cleanup()
            for driver in self.drivers.values():
                driver.close(cleanup=cleanup)
            log.info("stopped; kernel tables %s", "removed" if cleanup else "left forwarding")
            if self._owned is not None:
                self._owned.close()


def _weight_text(weight: int | None) -> str:
    return "none" if weight is None else str(weight)


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: the proxy holds two
    sockets per connection, and a soft limit of 1024 would cap it at ~500."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open files limit raised from %d to %d", soft, hard)


def read_config(path: str | Path) -> Config:
    """The config as `passlb run` and a reload take it: load_config, the same
    validation as `passlb check` (which covers every rule the health checker
    applies), and the checks planned, all before anything is changed."""
    config = load_config(path)
    plan_checks(config)
    return config


def run_daemon(config_path: str, *, cleanup: bool = False) -> int:
    config = read_config(config_path)
    setup_logging(config.log_level, config.log_format)
    raise_fd_limit()
    daemon = Daemon(Path(config_path), config)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(daemon.serve(cleanup=cleanup))
    return 0
