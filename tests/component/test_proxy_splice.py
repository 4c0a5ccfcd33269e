"""The proxy's relay on both paths: zero-copy splice for bulk flows, and recv/send
when no pipe can be made; each on asyncio's loop and on uvloop (the daemon's).

Real loopback sockets and real pipes; the only stand-in is the pipe factory,
wrapped to count (or to refuse, as EMFILE or EPERM would) at the tcp module's edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop

from passlb.dataplane.proxy import ProxyDriver, tcp
from passlb.dataplane.proxy.testing import desired, desired_for, proxy_service, with_options

LOCALHOST = "127.0.0.1"
MIB = 1024 * 1024
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@dataclass
class Pipes:
    """What the relay asked the pipe factory for, and what it got."""

    refuse: bool
    asked: int = 0

    @property
    def made(self) -> int:
        return 0 if self.refuse else self.asked


@pytest.fixture(params=["splice", "no-pipes"])
def pipes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Pipes:
    if not tcp.CAN_SPLICE:
        pytest.skip("splice needs Linux")  # the no-pipes path is the only one there
    record = Pipes(refuse=request.param == "no-pipes")
    real = tcp.open_pipe

    def counted() -> tuple[int, int]:
        record.asked += 1
        if record.refuse:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real()

    monkeypatch.setattr(tcp, "open_pipe", counted)
    return record


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, None]], None]]:
    def runner(test: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(asyncio.wait_for(test, 15))

    yield runner


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.asynccontextmanager
async def relayed(**options: Any) -> AsyncIterator[tuple[ProxyDriver, socket.socket, int]]:
    """A proxy in front of a listening backend socket: (driver, backend listener, proxy port)."""
    with socket.create_server((LOCALHOST, 0)) as listener:
        listener.setblocking(False)
        with socket.socket() as probe:
            probe.bind((LOCALHOST, 0))
            port = probe.getsockname()[1]
        svc = proxy_service("bulk", port, [listener.getsockname()])
        driver = ProxyDriver()
        driver.sync(desired(with_options(svc, **options) if options else svc))
        try:
            yield driver, listener, port
        finally:
            await driver.aclose()


async def connected(listener: socket.socket, port: int) -> tuple[socket.socket, socket.socket]:
    """A client through the proxy and the backend's end of the same flow."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, (LOCALHOST, port))
    backend, _ = await loop.sock_accept(listener)
    backend.setblocking(False)
    return client, backend


async def send_then_eof(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def read_to_eof(sock: socket.socket) -> bytearray:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while chunk := await loop.sock_recv(sock, MIB):
        received += chunk
    return received


async def closed_by_peer(sock: socket.socket) -> bool:
    """EOF or a reset within 5 s."""
    try:
        return await asyncio.wait_for(read_to_eof(sock), 5) is not None
    except ConnectionResetError:
        return True


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------- the tests


def test_bulk_both_ways_is_byte_exact_and_eof_follows_the_data(
    run: Callable[[Coroutine[Any, Any, None]], None], pipes: Pipes
) -> None:
    up, down = payload(12 * MIB + 7, 1), payload(9 * MIB + 3, 2)

    async def test() -> None:
        fds_before = open_fds()
        async with relayed() as (driver, listener, port):
            client, backend = await connected(listener, port)
            with client, backend:
                # Each side sends its bulk and half-closes, and reads the other's
                # to EOF: the FIN must come after the last byte left the pipe.
                _, _, got_up, got_down = await asyncio.gather(
                    send_then_eof(client, up),
                    send_then_eof(backend, down),
                    read_to_eof(backend),
                    read_to_eof(client),
                )
                assert digest(got_up) == digest(up)
                assert digest(got_down) == digest(down)
                await asyncio.sleep(0.05)
                assert driver.flows() == []  # both directions ended: both sockets closed
                total = driver.counters()["bulk"].total
                assert total.bytes == len(up) + len(down)
                assert total.packets >= (len(up) + len(down)) // tcp.PIPE_SIZE
                assert (total.new_flows, total.active_flows) == (1, 0)
        assert pipes.asked == 2  # one try per direction, both bulk
        assert open_fds() == fds_before  # pipes closed with the flow

    run(test())


def test_half_close_after_bulk_keeps_the_other_direction(
    run: Callable[[Coroutine[Any, Any, None]], None], pipes: Pipes
) -> None:
    bulk, answer = payload(6 * MIB, 3), payload(5 * MIB, 4)

    async def test() -> None:
        loop = asyncio.get_running_loop()
        async with relayed() as (driver, listener, port):
            client, backend = await connected(listener, port)
            with client, backend:
                await send_then_eof(client, bulk)
                assert digest(await read_to_eof(backend)) == digest(bulk)
                # The client said all it had; it still gets the whole answer.
                await loop.sock_sendall(backend, answer)
                assert len(driver.flows()) == 1
                backend.shutdown(socket.SHUT_WR)
                assert digest(await read_to_eof(client)) == digest(answer)
        assert pipes.asked == 2

    run(test())


@pytest.mark.parametrize("who_resets", ["client", "backend"])
def test_reset_during_bulk_reaches_the_other_side(
    run: Callable[[Coroutine[Any, Any, None]], None], pipes: Pipes, who_resets: str
) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        fds_before = open_fds()
        async with relayed() as (driver, listener, port):
            client, backend = await connected(listener, port)
            sender, receiver = (backend, client) if who_resets == "client" else (client, backend)
            pushing = asyncio.create_task(loop.sock_sendall(sender, b"r" * 64 * MIB))
            got = 0
            while got < 4 * MIB:  # well into the bulk flow: on the pipe, when there is one
                got += len(await loop.sock_recv(receiver, MIB))
            reset(receiver)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                await pushing
            sender.close()
            await asyncio.sleep(0.05)
            assert driver.flows() == []
        assert pipes.asked == 1
        assert open_fds() == fds_before

    run(test())


def test_slow_reader_bounds_what_the_proxy_holds(
    run: Callable[[Coroutine[Any, Any, None]], None], pipes: Pipes
) -> None:
    chunk, total = payload(MIB, 6), 64

    async def test() -> None:
        loop = asyncio.get_running_loop()
        async with relayed() as (_, listener, port):
            client, backend = await connected(listener, port)
            with client, backend:
                sent = 0

                async def push() -> None:
                    nonlocal sent
                    for _ in range(total):
                        await loop.sock_sendall(client, chunk)
                        sent += 1

                pusher = asyncio.create_task(push())
                got = bytearray(await loop.sock_recv(backend, MIB))  # starts the flow, then stalls
                await asyncio.sleep(0.5)
                # Kernel buffers on both hops and one pipe (or one read) hold a few
                # MiB; a relay without back-pressure would have taken all 64.
                assert sent < total // 2
                assert not pusher.done()
                while len(got) < total * MIB:
                    got += await loop.sock_recv(backend, MIB)
                await pusher
                assert got == chunk * total
        assert pipes.asked == 1

    run(test())


def test_idle_timeout_cut_and_close_end_bulk_flows_with_their_pipes(
    run: Callable[[Coroutine[Any, Any, None]], None], pipes: Pipes
) -> None:
    async def bulk_then(listener: socket.socket, port: int) -> tuple[socket.socket, socket.socket]:
        loop = asyncio.get_running_loop()
        client, backend = await connected(listener, port)
        await loop.sock_sendall(client, payload(2 * MIB, 7))
        got = 0
        while got < 2 * MIB:
            got += len(await loop.sock_recv(backend, MIB))
        return client, backend

    async def test() -> None:
        fds_before = open_fds()
        async with relayed(idle_timeout=0.3) as (driver, listener, port):
            client, backend = await bulk_then(listener, port)
            with client, backend:
                assert await closed_by_peer(client)  # idle after its bulk
                assert await closed_by_peer(backend)
                assert driver.flows() == []
            client, backend = await bulk_then(listener, port)
            with client, backend:
                # cut_flows for its backend resets it, pipe and all.
                [flow] = driver.flows()
                svc = with_options(
                    proxy_service("bulk", port, [listener.getsockname()]), idle_timeout=0.3
                )
                driver.sync(desired(desired_for(svc, cut=[flow.backend])))
                assert await closed_by_peer(client)
                assert await closed_by_peer(backend)
                assert driver.flows() == []
            client, backend = await bulk_then(listener, port)
            with client, backend:
                driver.close()  # the daemon's shutdown resets every flow
                assert await closed_by_peer(client)
        assert pipes.asked == 3
        assert open_fds() == fds_before

    run(test())


def test_short_flows_never_make_pipes(
    run: Callable[[Coroutine[Any, Any, None]], None], pipes: Pipes
) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        async with relayed() as (_, listener, port):
            for _ in range(20):
                client, backend = await connected(listener, port)
                with client, backend:
                    await send_then_eof(client, b"GET / HTTP/1.0\r\n\r\n")
                    assert await read_to_eof(backend) == b"GET / HTTP/1.0\r\n\r\n"
                    await loop.sock_sendall(backend, payload(64 * 1024, 8))
                    backend.shutdown(socket.SHUT_WR)
                    assert len(await read_to_eof(client)) == 64 * 1024
        assert pipes.asked == 0

    run(test())
