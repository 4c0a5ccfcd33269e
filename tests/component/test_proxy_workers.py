"""The proxy in relay worker processes (WorkerPool): real processes, real loopback sockets.

Which worker holds a connection is read from the kernel: each held
connection is two more sockets in one worker's /proc/PID/fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, ParamSpec

import pytest

from passlb.dataplane.base import BackendCounters
from passlb.dataplane.proxy import channel
from passlb.dataplane.proxy.driver import ListenerKey
from passlb.dataplane.proxy.testing import desired, desired_for, proxy_service, with_options
from passlb.dataplane.proxy.workers import WorkerPool
from passlb.errors import DataplaneError
from passlb.model import Backend, Protocol
from passlb.state import DesiredState

P = ParamSpec("P")
LOCALHOST = "127.0.0.1"
PAYLOAD = b"ping"
GREETING = b"A\n"  # every backend's name is one letter


def async_test(
    timeout: float = 20.0,
) -> Callable[[Callable[P, Coroutine[Any, Any, None]]], Callable[P, None]]:
    def wrap(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout))

        return run

    return wrap


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on loopback."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((LOCALHOST, 0))
            port: int = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, other) as s, contextlib.suppress(OSError):
            s.bind((LOCALHOST, port))
            return port


def sockets_of(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"{fd_dir}/{fd}").startswith("socket:")
    return count


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- peers


@dataclass
class EchoBackend:
    """Greets with its one-letter name, echoes, says "bye" after the client's EOF."""

    name: str
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> EchoBackend:
        self.server = await asyncio.start_server(self._serve, LOCALHOST, 0, backlog=1024)
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return LOCALHOST, self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            writer.write(self.name.encode() + b"\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"bye")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(b"U:" + data, addr)  # type: ignore[attr-defined]


@dataclass
class Held:
    """A connection kept open: ask() proves it still reaches its backend."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int) -> Held:
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        assert len(await asyncio.wait_for(reader.readline(), 5)) == 2
        return cls(reader, writer)

    async def ask(self) -> bool:
        try:
            self.writer.write(PAYLOAD)
            await self.writer.drain()
            return await asyncio.wait_for(self.reader.readexactly(len(PAYLOAD)), 5) == PAYLOAD
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return False

    def close(self) -> None:
        self.writer.close()


async def round_trip(port: int) -> bytes:
    """Greeting, one echo, half-close, "bye": 2 + 4 + 4 + 3 bytes through the proxy."""
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    try:
        greeting = await asyncio.wait_for(reader.readline(), 5)
        writer.write(PAYLOAD)
        echo = await asyncio.wait_for(reader.readexactly(len(PAYLOAD)), 5)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 5)
        return greeting + echo + rest
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def pool_of(state: DesiredState, workers: int = 2) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(workers)
    try:
        pool.sync(state)
        yield pool
    finally:
        pool.close()


@contextlib.asynccontextmanager
async def echo_backends(*names: str) -> AsyncIterator[list[EchoBackend]]:
    started = [await EchoBackend(name).start() for name in names]
    try:
        yield started
    finally:
        for backend in started:
            await backend.stop()


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def counters_of(pool: WorkerPool, service: str) -> dict[str, BackendCounters]:
    return pool.counters()[service].backends


# ---------------------------------------------------------------- tests


@async_test()
async def test_tcp_and_udp_are_served_by_both_workers_and_counted_once() -> None:
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    udp_transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        UdpEcho, local_addr=(LOCALHOST, 0)
    )
    udp_backend = udp_transport.get_extra_info("sockname")
    async with echo_backends("A") as (a,):
        web = proxy_service("web", tcp_port, [a.address])
        dns = proxy_service("dns", udp_port, [udp_backend], protocol=Protocol.UDP)
        async with pool_of(desired(web, dns)) as pool:
            pids = pool.worker_pids()
            assert len(pids) == 2 and os.getpid() not in pids
            idle = [sockets_of(pid) for pid in pids]

            held = [await Held.open(tcp_port) for _ in range(40)]
            per_worker = [
                (sockets_of(pid) - before) // 2 for pid, before in zip(pids, idle, strict=True)
            ]
            assert sum(per_worker) == 40 and min(per_worker) > 0, per_worker
            assert len(pool.flows("web")) == 40
            assert counters_of(pool, "web")[f"{LOCALHOST}:{a.address[1]}"].active_flows == 40
            for conn in held:
                conn.close()
            await until(lambda: not pool.flows("web"), "held connections to close")

            replies = await asyncio.gather(*(round_trip(tcp_port) for _ in range(20)))
            assert set(replies) == {GREETING + PAYLOAD + b"bye"}
            await until(lambda: not pool.flows("web"), "round trips to close")
            web_counters = counters_of(pool, "web")[f"{LOCALHOST}:{a.address[1]}"]
            assert web_counters.new_flows == 60
            # Held: greeting, then "bye" after their close; round trips: 2 + 4 + 4 + 3.
            assert web_counters.bytes == 40 * (2 + 3) + 20 * (2 + 4 + 4 + 3)
            assert web_counters.active_flows == 0

            # UDP: each client socket (address and port) is one session on one worker.
            before = [sockets_of(pid) for pid in pids]
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(24)]
            try:
                loop = asyncio.get_running_loop()
                for i, client in enumerate(clients):  # the backend answers on this loop
                    client.setblocking(False)
                    await loop.sock_sendto(client, b"q%d" % i, (LOCALHOST, udp_port))
                    reply = await asyncio.wait_for(loop.sock_recv(client, 100), 5)
                    assert reply == b"U:q%d" % i
                sessions = [sockets_of(pid) - b for pid, b in zip(pids, before, strict=True)]
                assert sum(sessions) == 24 and min(sessions) > 0, sessions
                flows = pool.flows("dns")
                assert len(flows) == 24 and {f.protocol for f in flows} == {"udp"}
                assert {f.src_port for f in flows} == {c.getsockname()[1] for c in clients}
            finally:
                for client in clients:
                    client.close()
            dns_counters = pool.counters()["dns"].total
            assert dns_counters.new_flows == 24
            assert dns_counters.bytes == sum(len(b"q%d" % i) * 2 + 2 for i in range(24))
    udp_transport.close()


@async_test()
async def test_a_bind_conflict_raises_and_changes_no_worker() -> None:
    port, taken, shared = free_port(), free_port(), free_port()
    async with echo_backends("A") as (a,):
        web = proxy_service("web", port, [a.address])
        async with pool_of(desired(web)) as pool:
            pids = pool.worker_pids()
            worker_sockets = [sockets_of(pid) for pid in pids]
            fds = open_fds()
            squatters = []
            plain = socket.create_server((LOCALHOST, taken))
            squatters.append(plain)
            # SO_REUSEPORT alone would let the pool join this one: the probe refuses it.
            sharing = socket.socket()
            sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sharing.bind((LOCALHOST, shared))
            sharing.listen()
            squatters.append(sharing)
            try:
                for busy in (taken, shared):
                    other = proxy_service("other", busy, [a.address])
                    with pytest.raises(DataplaneError) as caught:
                        pool.sync(desired(web, other))
                    assert f"service other: cannot listen on tcp {LOCALHOST}:{busy}" in str(
                        caught.value
                    )
                    assert "in use" in str(caught.value)
            finally:
                for sock in squatters:
                    sock.close()
            assert pool.listening() == [k for k in pool.listening() if k.port == port]
            assert [sockets_of(pid) for pid in pids] == worker_sockets
            assert pool.worker_pids() == pids
            assert open_fds() == fds  # nothing this pool bound is left in the daemon
            assert await round_trip(port) == GREETING + PAYLOAD + b"bye"


@async_test()
async def test_ring_changes_under_load_close_no_established_connection() -> None:
    port = free_port()
    async with echo_backends("A", "B", "C") as (a, b, c):
        two = proxy_service("web", port, [a.address, b.address])
        async with pool_of(desired(two)) as pool:
            held = [await Held.open(port) for _ in range(30)]
            stop = asyncio.Event()
            failures: list[BaseException] = []
            done = 0

            async def load() -> None:
                nonlocal done
                while not stop.is_set():
                    try:
                        await round_trip(port)
                        done += 1
                    except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                        failures.append(e)

            loaders = [asyncio.create_task(load()) for _ in range(4)]
            three = proxy_service("web", port, [a.address, b.address, c.address])
            heavier_c = proxy_service(
                "web",
                port,
                [a.address, b.address, Backend(ip_address(LOCALHOST), c.address[1], weight=5)],
            )
            for state in (three, heavier_c, three, heavier_c):
                await asyncio.sleep(0.1)
                pool.sync(desired(desired_for(state)))
            await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*loaders)
            assert not failures and done > 20
            answers = await asyncio.gather(*(conn.ask() for conn in held))
            assert all(answers)
            for conn in held:
                conn.close()


@async_test()
async def test_a_killed_worker_is_replaced_and_counters_do_not_go_back() -> None:
    port = free_port()
    async with echo_backends("A") as (a,):
        key = f"{LOCALHOST}:{a.address[1]}"
        async with pool_of(desired(proxy_service("web", port, [a.address]))) as pool:
            pids = pool.worker_pids()
            idle = [sockets_of(pid) for pid in pids]
            held = [await Held.open(port) for _ in range(20)]
            on_survivor = (sockets_of(pids[1]) - idle[1]) // 2
            await asyncio.gather(*(round_trip(port) for _ in range(10)))
            before = counters_of(pool, "web")[key]
            assert before.new_flows == 30

            os.kill(pids[0], signal.SIGKILL)
            await until(lambda: len(set(pool.worker_pids()) - set(pids)) == 1, "a replacement")
            new_pid = pool.worker_pids()[0]
            assert pool.worker_pids() == [new_pid, pids[1]]
            with pytest.raises(ChildProcessError):
                os.waitpid(pids[0], os.WNOHANG)  # reaped by the pool, not left a zombie

            # The survivor's connections live on; the dead worker's are gone.
            answers = await asyncio.gather(*(conn.ask() for conn in held))
            assert sum(answers) == on_survivor
            after = counters_of(pool, "web")[key]
            assert after.new_flows >= before.new_flows and after.bytes >= before.bytes

            # The replacement listens too: new connections reach both workers.
            idle_new = sockets_of(new_pid)
            more = [await Held.open(port) for _ in range(20)]
            assert sockets_of(new_pid) > idle_new
            assert counters_of(pool, "web")[key].new_flows == before.new_flows + 20
            for conn in held + more:
                conn.close()


@async_test()
async def test_close_stops_every_worker_and_leaves_no_descriptor() -> None:
    port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    async with echo_backends("A") as (a,):
        fds = open_fds()
        pool = WorkerPool(2)
        try:
            pool.sync(
                desired(
                    proxy_service("web", port, [a.address]),
                    proxy_service("dns", udp_port, [a.address], protocol=Protocol.UDP),
                )
            )
            pids = pool.worker_pids()
            held = [await Held.open(port) for _ in range(6)]
        finally:
            pool.close()
        for pid in pids:
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            assert not os.path.exists(f"/proc/{pid}")
        answers = await asyncio.gather(*(conn.ask() for conn in held))
        assert not any(answers)  # reset by the closing workers
        for conn in held:
            conn.close()
        # Once the test's clients and its backend's ends are closed, nothing is left.
        await until(lambda: open_fds() == fds, "descriptors back to where they were")
        # The listeners are gone: the ports can be bound again.
        socket.create_server((LOCALHOST, port)).close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOCALHOST, udp_port))
        with pytest.raises(DataplaneError, match="closed"):
            pool.sync(desired())


@async_test()
async def test_each_worker_enforces_its_share_of_max_connections() -> None:
    port = free_port()
    async with echo_backends("A") as (a,):
        service = with_options(proxy_service("web", port, [a.address]), max_connections=2)
        async with pool_of(desired(service)) as pool:
            held: list[Held] = []
            refused = 0
            # 20 clients: the kernel's hash gives both workers some (all on one: p = 2e-6).
            for _ in range(20):
                try:
                    held.append(await Held.open(port))
                except (OSError, asyncio.IncompleteReadError, AssertionError):
                    refused += 1
            assert (len(held), refused) == (2, 18)  # one each: 2 in all, not 2 per worker
            assert pool.counters()["web"].drops["max_connections"] == 18
            for conn in held:
                conn.close()


def test_the_channel_carries_more_sockets_than_one_sendmsg_may() -> None:
    ours, theirs = socket.socketpair()
    bound = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(300)]
    received: list[socket.socket] = []
    try:
        for sock in bound:
            sock.bind((LOCALHOST, 0))
        keys = tuple(ListenerKey("udp", LOCALHOST, s.getsockname()[1]) for s in bound)
        request = channel.SyncRequest(desired(), False, keys)
        channel.send(ours, request, [s.fileno() for s in bound])
        message, received = channel.receive(theirs)
        assert message == request
        assert [s.getsockname() for s in received] == [s.getsockname() for s in bound]
        ours.close()
        with pytest.raises(channel.ChannelClosed):
            channel.receive(theirs)
    finally:
        for sock in [*bound, *received, ours, theirs]:
            sock.close()
