"""A relay worker process: an ordinary ProxyDriver on its own event loop.

Started by the daemon's WorkerPool (workers.py) as
``python -m passlb.dataplane.proxy.worker CHANNEL_FD LOG_LEVEL LOG_FORMAT``.
It binds nothing: every listener socket comes from the daemon over the
channel (SO_REUSEPORT, one per worker), so the kernel spreads new
connections over the workers. The worker lives as long as its channel: a
CloseRequest or the daemon's end closing (the daemon died) resets every
connection and ends the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping

from passlb.dataplane.proxy import channel, new_event_loop
from passlb.dataplane.proxy.driver import ListenerKey, ProxyDriver
from passlb.errors import DataplaneError
from passlb.logs import setup_logging
from passlb.model import LogFormat, Service

log = logging.getLogger("passlb.proxy.worker")

MESSAGE_TIMEOUT = 10.0  # seconds for the rest of a message once it began


class _Worker:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.received: dict[ListenerKey, socket.socket] = {}  # this sync's sockets
        self.driver = ProxyDriver(bind=self._take_received)
        self.done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), self._on_message)
        # After add_reader, which makes the descriptor non-blocking under uvloop:
        # a message is read whole once its first byte is here, waiting for the rest.
        sock.settimeout(MESSAGE_TIMEOUT)

    def _take_received(
        self, wanted: Mapping[ListenerKey, Service]
    ) -> dict[ListenerKey, socket.socket]:
        missing = sorted(set(wanted) - set(self.received))
        if missing:
            raise DataplaneError(f"no listener socket came for {missing[0]}")
        return {key: self.received.pop(key) for key in wanted}

    def _on_message(self) -> None:
        try:
            request, sockets = channel.receive(self.sock)
        except OSError as e:  # EOF, a message cut short: the daemon is gone
            log.info("the daemon's channel is closed (%s); stopping", e)
            self._stop()
            return
        try:
            reply = self._handle(request, sockets)
        except Exception:
            # A bug: exit now, so the daemon replaces this worker at once
            # rather than waiting out a reply that never comes.
            log.exception(
                "proxy worker %d cannot handle a %s; exiting", os.getpid(), type(request).__name__
            )
            self._stop()
            return
        try:
            channel.send(self.sock, reply)
        except OSError as e:
            log.info("the daemon's channel is closed (%s); stopping", e)
            self._stop()
            return
        if isinstance(reply, channel.Closed):
            self._stop()

    def _handle(self, request: object, sockets: list[socket.socket]) -> channel.Reply:
        if isinstance(request, channel.SyncRequest):
            self.received = dict(zip(request.keys, sockets, strict=True))
            try:
                result = self.driver.sync(request.desired, full=request.full)
            except DataplaneError as e:
                return channel.SyncReply(tuple(self.driver.listening()), error=str(e))
            finally:
                for unused in self.received.values():
                    unused.close()
                self.received = {}
            return channel.SyncReply(tuple(self.driver.listening()), result=result)
        for unexpected in sockets:
            unexpected.close()
        if isinstance(request, channel.ReadRequest):
            return channel.ReadReply(self.driver.counters())
        if isinstance(request, channel.FlowsRequest):
            return channel.FlowsReply(self.driver.flows(request.service, request.backend))
        if isinstance(request, channel.CloseRequest):
            return channel.Closed()
        raise TypeError(f"unknown request {request!r}")

    def _stop(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.driver.close()
        if not self.done.done():
            self.done.set_result(None)


async def _serve(channel_fd: int) -> None:
    sock = socket.socket(fileno=channel_fd)
    worker = _Worker(sock, asyncio.get_running_loop())
    try:
        await worker.done
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    channel_fd, level, log_format = int(argv[0]), argv[1], LogFormat(argv[2])
    setup_logging(level, log_format)
    # The daemon decides when a worker stops: a terminal's Ctrl-C or a service
    # manager's SIGTERM to the whole group reaches the daemon, which closes us.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(channel_fd))
    log.debug("proxy worker %d exits", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
