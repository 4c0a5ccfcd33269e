"""`WorkerPool`: the proxy data plane in N relay worker processes (`[proxy] workers`).

As NGINX and HAProxy scale: every worker is a child process running an
ordinary ProxyDriver on its own event loop (worker.py), and every worker
serves every listener. The daemon binds each listener once per worker with
SO_REUSEPORT and hands each worker its own socket (SCM_RIGHTS over the
control channel, channel.py); the kernel then spreads new connections, and
UDP clients by their address and port, over the workers' sockets.

    Reconciler ──sync──► WorkerPool ──socketpair──► worker 0: ProxyDriver ◄── socket 0 ┐
    API ◄── counters ───┘        └──socketpair──► worker 1: ProxyDriver ◄── socket 1 ┤ VIP:port
                                                                   (SO_REUSEPORT) ┘

- sync() is synchronous, like ProxyDriver.sync: the daemon binds every
  socket any worker lacks first (a new listener is probed without
  SO_REUSEPORT before, so a port another program holds is refused even when
  that program also set SO_REUSEPORT); any failure closes what this sync
  bound and raises DataplaneError, and no worker has been told anything.
  Then every worker gets its share of the desired state (shares.py) with
  its sockets, and the daemon waits for every reply.
- A worker that dies (crash, kill -9) is reaped, logged as an error and
  replaced: a new process, new sockets for every listener, the last desired
  state. Its connections are lost; the other workers' are untouched. Its
  last counters read stay in a base, so counters never go backwards.
- close() asks every worker to reset its connections and exit, and reaps it
  (SIGKILL by pid, ours, if it does not exit in time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Final

from passlb.dataplane.base import ApplyResult, BackendCounters, Flow, ServiceCounters
from passlb.dataplane.proxy import channel
from passlb.dataplane.proxy.driver import (
    ListenerKey,
    bind_listener,
    listen_error,
    running_loop,
    wanted_listeners,
)
from passlb.dataplane.proxy.shares import desired_for_worker
from passlb.errors import DataplaneError
from passlb.model import LogFormat, Service
from passlb.state import DesiredState

log = logging.getLogger("passlb.proxy.workers")

REPLY_TIMEOUT: Final = 10.0  # seconds; covers a worker's start (imports, uvloop) on a busy host
EXIT_TIMEOUT: Final = 5.0  # seconds a closed worker has to exit before SIGKILL
# A worker that dies sooner than this after its start is replaced only after
# the same delay, so a worker that cannot start does not respawn in a tight loop.
RESTART_BACKOFF: Final = 1.0


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(setting: int | None) -> int:
    """`[proxy] workers` as a count: None ("auto") is one per CPU."""
    return cpu_count() if setting is None else setting


@dataclass(eq=False)
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    link: socket.socket  # the control channel: blocking, with REPLY_TIMEOUT
    started: float  # monotonic
    owed: int = 0  # replies still to read, in request order
    listening: set[ListenerKey] = field(default_factory=set)  # as its last sync reply said
    last_read: channel.ReadReply = field(default_factory=channel.ReadReply)

    @property
    def name(self) -> str:
        return f"proxy worker {self.index} (pid {self.process.pid})"


class WorkerPool:
    """Driver protocol implementation for proxy services, in `workers` processes."""

    name = "proxy"
    blocking = False  # on the event loop; one socketpair round trip per worker (Driver)

    def __init__(
        self,
        workers: int,
        *,
        log_level: str = "info",
        log_format: LogFormat = LogFormat.TEXT,
        reply_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.size = workers
        self._log_args = (log_level, log_format.value)
        self._reply_timeout = reply_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: dict[int, _Worker] = {}  # by index; a missing one is being replaced
        self._restarts: dict[int, asyncio.TimerHandle] = {}
        self._desired: DesiredState | None = None  # the last state the workers were sent
        self._listening: dict[ListenerKey, Service] = {}  # what that state listens on
        # Counters of dead workers (as last read), so the sums never go backwards.
        self._base: dict[str, dict[str, BackendCounters]] = {}
        self._base_drops: dict[str, Counter[str]] = {}
        self._synced = False
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = running_loop()
        return self._loop

    def worker_pids(self) -> list[int]:
        """The running workers' process ids, in worker order."""
        return [self._workers[i].process.pid for i in sorted(self._workers)]

    # ------------------------------------------------------------ sync

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        if self._closed:
            raise DataplaneError("the proxy driver is closed")
        started = time.perf_counter()
        services = {key: sd.service for key, sd in wanted_listeners(desired).items()}
        if not self._synced and not self._workers:
            self._start_workers()
        for worker in list(self._workers.values()):
            self._settle(worker)
        workers = list(self._workers.values())
        _probe({k: s for k, s in services.items() if k not in self._listening})
        sockets = _bind_for({w.index: w.listening for w in workers}, services)
        # The workers are told only now: nothing above changed what they run.
        self._desired = desired
        self._listening = services
        for name in set(self._base) - {sd.service.name for sd in desired.services}:
            self._base.pop(name)
            self._base_drops.pop(name, None)
        told = [w for w in workers if self._send_sync(w, full, sockets[w.index])]
        errors, operations = [], 0
        for worker in told:
            reply = self._reply(worker)
            if not isinstance(reply, channel.SyncReply):
                continue  # lost: its replacement gets this state
            if reply.error is not None:
                errors.append(f"{worker.name}: {reply.error}")
            elif reply.result is not None:
                operations = max(operations, reply.result.operations)
        if errors:
            raise DataplaneError("; ".join(errors))
        result = ApplyResult(
            full=full or not self._synced,
            operations=operations,
            duration=time.perf_counter() - started,
        )
        self._synced = True
        return result

    def _start_workers(self) -> None:
        try:
            for index in range(self.size):
                self._workers[index] = self._spawn(index)
        except OSError as e:
            self._reap_all()
            raise DataplaneError(f"cannot start proxy worker processes: {e}") from e

    def _spawn(self, index: int) -> _Worker:
        loop = self.loop  # outside a loop this raises, before any process starts
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "passlb.dataplane.proxy.worker",
                    str(theirs.fileno()),
                    *self._log_args,
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(self._reply_timeout)
        worker = _Worker(index, process, ours, time.monotonic())
        # Between requests the channel is quiet; it turns readable when the
        # worker exits (EOF) or a replacement's sync reply comes.
        loop.add_reader(ours.fileno(), self._on_readable, worker)
        log.info("%s started", worker.name)
        return worker

    def _send_sync(
        self, worker: _Worker, full: bool, sockets: dict[ListenerKey, socket.socket]
    ) -> bool:
        """Send `worker` its share of the last desired state; False when it is lost."""
        assert self._desired is not None
        keys = tuple(sorted(sockets))
        request = channel.SyncRequest(
            desired_for_worker(self._desired, self.size, worker.index), full, keys
        )
        try:
            return self._send(worker, request, [sockets[k].fileno() for k in keys])
        finally:
            for sock in sockets.values():  # the worker holds its copy now (or is gone)
                sock.close()

    # ------------------------------------------------------------ talking to workers

    def _send(
        self, worker: _Worker, request: channel.Request, fds: list[int] | None = None
    ) -> bool:
        try:
            channel.send(worker.link, request, fds)
        except OSError as e:
            self._lost(worker, f"cannot be reached ({e})")
            return False
        worker.owed += 1
        return True

    def _reply(self, worker: _Worker) -> channel.Reply | None:
        """The reply to the last request sent to `worker`; None when it is lost."""
        reply = None
        try:
            while worker.owed:
                if reply is not None:
                    self._log_failed_sync(worker, reply)  # an earlier request's answer
                reply = self._read_one(worker)
        except TimeoutError:
            self._lost(worker, f"did not answer in {self._reply_timeout:g} s")
            return None
        except OSError as e:
            self._lost(worker, f"exited ({e})")
            return None
        return reply

    def _settle(self, worker: _Worker) -> None:
        """Read what `worker` still owes (a replacement's first sync reply)."""
        if worker.owed and (reply := self._reply(worker)) is not None:
            self._log_failed_sync(worker, reply)

    def _log_failed_sync(self, worker: _Worker, reply: channel.Reply) -> None:
        if isinstance(reply, channel.SyncReply) and reply.error is not None:
            log.error("%s: sync failed: %s", worker.name, reply.error)

    def _read_one(self, worker: _Worker) -> channel.Reply:
        message, sockets = channel.receive(worker.link)
        for sock in sockets:  # workers send none; never keep a stray descriptor
            sock.close()
        worker.owed -= 1
        if isinstance(message, channel.SyncReply):
            worker.listening = set(message.listening)
        elif isinstance(message, channel.ReadReply):
            worker.last_read = message
        assert not isinstance(message, channel.Request)
        return message

    def _ask_all(self, request: channel.Request) -> list[channel.Reply]:
        asked = [w for w in list(self._workers.values()) if self._send(w, request)]
        replies = [self._reply(w) for w in asked]
        return [r for r in replies if r is not None]

    def _on_readable(self, worker: _Worker) -> None:
        if self._workers.get(worker.index) is not worker:
            return
        worker.link.setblocking(False)
        try:
            peeked = worker.link.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return  # its reply was read by a request in the meantime
        except OSError as e:
            peeked = b""
            log.debug("%s: channel error %r", worker.name, e)
        finally:
            worker.link.settimeout(self._reply_timeout)
        if not peeked:
            self._lost(worker, "exited")
        elif not worker.owed:
            self._lost(worker, "sent a message nobody asked for")
        else:
            self._settle(worker)

    # ------------------------------------------------------------ losing and replacing

    def _lost(self, worker: _Worker, why: str) -> None:
        """Reap a dead (or useless) worker and schedule its replacement."""
        if self._workers.get(worker.index) is not worker:
            return
        del self._workers[worker.index]
        self._reap(worker)
        self._fold_into_base(worker.last_read)
        log.error(
            "%s %s (exit status %s); its connections are lost",
            worker.name,
            why,
            worker.process.returncode,
        )
        if self._closed:
            return
        lived = time.monotonic() - worker.started
        delay = RESTART_BACKOFF if lived < RESTART_BACKOFF * 5 else 0.0
        self._restarts[worker.index] = self.loop.call_later(delay, self._replace, worker.index)

    def _replace(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._closed or index in self._workers:
            return
        try:
            sockets = _bind_for({index: set()}, self._listening)[index]
        except DataplaneError as e:
            log.error("proxy worker %d cannot be replaced yet: %s", index, e)
            self._restarts[index] = self.loop.call_later(RESTART_BACKOFF, self._replace, index)
            return
        try:
            worker = self._spawn(index)
        except OSError as e:
            for sock in sockets.values():
                sock.close()
            log.error("proxy worker %d cannot be replaced yet: %s", index, e)
            self._restarts[index] = self.loop.call_later(RESTART_BACKOFF, self._replace, index)
            return
        self._workers[index] = worker
        if self._desired is not None:
            # Not waited for: the reply is read when it comes (or by the next request).
            self._send_sync(worker, True, sockets)

    def _reap(self, worker: _Worker) -> None:
        self.loop.remove_reader(worker.link.fileno())
        worker.link.close()
        if worker.process.poll() is None:
            worker.process.kill()  # our own child, by its pid
        try:
            worker.process.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("%s did not exit after SIGKILL", worker.name)

    def _fold_into_base(self, read: channel.ReadReply) -> None:
        for name, counters in read.counters.items():
            base = self._base.setdefault(name, {})
            for key, c in counters.backends.items():
                # Its active flows died with it.
                base[key] = _add(base.get(key, BackendCounters()), replace(c, active_flows=0))
            self._base_drops.setdefault(name, Counter()).update(counters.drops)

    # ------------------------------------------------------------ reading

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        # Active flows are counted as they come and go: cheap, so always given.
        sums: dict[str, dict[str, BackendCounters]] = {
            name: dict(backends) for name, backends in self._base.items()
        }
        drops = {name: Counter(reasons) for name, reasons in self._base_drops.items()}
        for reply in self._ask_all(channel.ReadRequest()):
            assert isinstance(reply, channel.ReadReply)
            for name, counters in reply.counters.items():
                total = sums.setdefault(name, {})
                for key, c in counters.backends.items():
                    total[key] = _add(total.get(key, BackendCounters()), c)
                drops.setdefault(name, Counter()).update(counters.drops)
        return {
            name: ServiceCounters(backends=backends, drops=dict(drops.get(name, {})))
            for name, backends in sums.items()
        }

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        found: list[Flow] = []
        for reply in self._ask_all(channel.FlowsRequest(service, backend)):
            assert isinstance(reply, channel.FlowsReply)
            found.extend(reply.flows)
        return found

    def listening(self) -> list[ListenerKey]:
        return sorted(self._listening)

    # ------------------------------------------------------------ teardown

    def close(self, *, cleanup: bool = False) -> None:
        """Every worker resets its connections and exits; every process is reaped.

        `cleanup` changes nothing here: a userspace proxy leaves no state behind.
        """
        self._closed = True
        for timer in self._restarts.values():
            timer.cancel()
        self._restarts.clear()
        self._stop_workers()

    async def aclose(self) -> None:
        """close(), for callers that hold the driver in an async context."""
        self.close()

    def _stop_workers(self) -> None:
        asked = [w for w in list(self._workers.values()) if self._send(w, channel.CloseRequest())]
        for worker in asked:
            if self._workers.get(worker.index) is worker:
                self._reply(worker)
        self._reap_all()

    def _reap_all(self) -> None:
        for worker in list(self._workers.values()):
            del self._workers[worker.index]
            self._reap(worker)


def _add(a: BackendCounters, b: BackendCounters) -> BackendCounters:
    return BackendCounters(
        packets=a.packets + b.packets,
        bytes=a.bytes + b.bytes,
        new_flows=a.new_flows + b.new_flows,
        active_flows=a.active_flows + b.active_flows,
    )


def _probe(fresh: dict[ListenerKey, Service]) -> None:
    """Refuse listeners on addresses already taken, before joining any SO_REUSEPORT group.

    SO_REUSEPORT alone would let us share a port with another program of our
    user that set it too; a bind without it fails against any listener there.
    """
    for key, service in sorted(fresh.items()):
        try:
            bind_listener(key, service, listen=False).close()
        except OSError as e:
            raise listen_error(key, service, e) from e


def _bind_for(
    has: dict[int, set[ListenerKey]], services: dict[ListenerKey, Service]
) -> dict[int, dict[ListenerKey, socket.socket]]:
    """For each worker index, an SO_REUSEPORT socket for every key it lacks; all or none."""
    bound: dict[int, dict[ListenerKey, socket.socket]] = {}
    try:
        for index, listening in has.items():
            mine = bound.setdefault(index, {})
            for key in sorted(set(services) - listening):
                mine[key] = bind_listener(key, services[key], reuse_port=True)
    except OSError as e:
        for sockets in bound.values():
            for sock in sockets.values():
                sock.close()
        raise listen_error(key, services[key], e) from e
    return bound
