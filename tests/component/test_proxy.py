"""The proxy driver over real loopback sockets: TCP, UDP, TLS, PROXY protocol, SNI, limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
import trustme

from passlb.dataplane.proxy import ProxyDriver, new_event_loop, tcp
from passlb.dataplane.proxy.proxy_protocol import (
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    Transport,
    encode_v1,
    parse,
)
from passlb.dataplane.proxy.testing import (
    client_hello,
    desired,
    desired_for,
    proxy_service,
    with_options,
)
from passlb.errors import DataplaneError
from passlb.hashing.flowkey import L4PROTO, ring_slot
from passlb.model import (
    Backend,
    Balance,
    ClientRules,
    ConnTracking,
    PortRange,
    PortSet,
    Protocol,
    ProxyProtocol,
    Service,
    SniFallback,
    SniRoute,
)
from passlb.state import BackendRole, DesiredState

P = ParamSpec("P")
LOCALHOST = "127.0.0.1"


def async_test(
    timeout: float = 20.0,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> Callable[[Callable[P, Coroutine[Any, Any, None]]], Callable[P, None]]:
    """Run the test coroutine on a fresh loop, bounded in time."""

    def wrap(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(asyncio.wait_for(fn(*args, **kwargs), timeout))

        return run

    return wrap


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- test backends


@dataclass
class EchoBackend:
    """A TCP backend: optional PROXY header, then its name and an echo until EOF."""

    name: str
    expect_proxy: bool = False
    tls: ssl.SSLContext | None = None
    headers: list[ProxyHeader] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    first_bytes: list[bytes] = field(default_factory=list)
    resets: int = 0
    server: asyncio.Server | None = None
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> EchoBackend:
        # A backlog for bursts of connects the proxy passes on at once.
        self.server = await asyncio.start_server(self._serve, LOCALHOST, 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        self.writers.append(writer)
        try:
            if self.expect_proxy:
                parser = ProxyHeaderParser()
                while True:
                    chunk = await reader.read(1)
                    result = parser.feed(chunk)
                    if isinstance(result, ProxyHeader):
                        self.headers.append(result)
                        break
            if self.tls is not None:
                await writer.start_tls(self.tls)
            writer.write(self.name.encode() + b"\n")
            first = True
            while data := await reader.read(65536):
                if first:
                    self.first_bytes.append(data)
                    first = False
                writer.write(data)
                await writer.drain()
            writer.write(b"bye")
            writer.close()
        except (ConnectionResetError, BrokenPipeError):
            self.resets += 1
        except (ProxyProtocolError, ssl.SSLError, asyncio.IncompleteReadError):
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()

    @property
    def address(self) -> tuple[str, int]:
        return (LOCALHOST, self.port)


@contextlib.asynccontextmanager
async def backends(*specs: EchoBackend) -> AsyncIterator[list[EchoBackend]]:
    started = [await b.start() for b in specs]
    try:
        yield started
    finally:
        for b in started:
            await b.stop()


@contextlib.asynccontextmanager
async def running(state: DesiredState) -> AsyncIterator[ProxyDriver]:
    driver = ProxyDriver()
    driver.sync(state)
    try:
        yield driver
    finally:
        await driver.aclose()


async def connect(
    port: int, *, source: str = LOCALHOST
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LOCALHOST, port, local_addr=(source, 0))


async def hello(port: int, payload: bytes = b"ping") -> tuple[str, bytes]:
    """Connect, read the backend's name, send payload, half-close, read the rest."""
    reader, writer = await connect(port)
    name = (await reader.readline()).decode().strip()
    writer.write(payload)
    writer.write_eof()
    rest = await reader.read()
    writer.close()
    return name, rest


def service_for(name: str, port: int, servers: list[EchoBackend], **options: Any) -> Service:
    svc = proxy_service(name, port, [b.address for b in servers])
    return with_options(svc, **options) if options else svc


async def refused(port: int, *, source: str = LOCALHOST) -> bool:
    """The proxy closes (or resets) a new connection before any backend speaks."""
    try:
        reader, writer = await connect(port, source=source)
    except ConnectionResetError:
        return True  # the reset beat the end of our connect
    try:
        return await closed_by_peer(reader)
    finally:
        writer.close()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------- TCP basics


@async_test()
async def test_tcp_relay_counts_and_lists_flows() -> None:
    async with backends(EchoBackend("a")) as servers:
        port = free_port()
        svc = service_for("web", port, servers)
        async with running(desired(svc)) as driver:
            reader, writer = await connect(port)
            assert await reader.readline() == b"a\n"
            writer.write(b"x" * 100_000)
            assert await reader.readexactly(100_000) == b"x" * 100_000
            [flow] = driver.flows()
            assert (flow.service, flow.protocol, flow.dst_port) == ("web", "tcp", port)
            assert (str(flow.src), flow.src_port) == writer.get_extra_info("sockname")
            assert flow.backend == f"127.0.0.1:{servers[0].port}"
            writer.write_eof()
            assert await reader.read() == b"bye"
            writer.close()
            total = driver.counters()["web"].total
            assert total.new_flows == 1
            assert total.bytes == 2 + 200_000 + 3
            assert total.packets >= 3
            await asyncio.sleep(0.05)
            assert driver.counters()["web"].total.active_flows == 0
            assert driver.flows() == []


@async_test()
async def test_half_close_each_way() -> None:
    async with backends(EchoBackend("a")) as servers:
        port = free_port()
        async with running(desired(service_for("web", port, servers))):
            # client half-closes first: the backend sees EOF, still answers
            assert await hello(port, b"abc") == ("a", b"abcbye")
            # backend half-closes first: the client keeps sending afterwards
            backend_first = EchoBackend("b")
            async with backends(backend_first) as [b]:
                svc2 = service_for("two", free_port(), [b])
                async with running(desired(svc2)):
                    reader, writer = await connect(svc2.ports.ranges[0].first)
                    await reader.readline()
                    for server_writer in b.writers:
                        server_writer.write_eof()
                    assert await reader.read() == b""  # EOF passed on
                    writer.write(b"still")  # our direction still open
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    assert b.first_bytes == [b"still"]
                    writer.close()


async def _accept_one(server_sock: socket.socket) -> socket.socket:
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(server_sock)
    return conn


@async_test()
async def test_reset_propagates_both_ways() -> None:
    loop = asyncio.get_running_loop()
    with socket.create_server((LOCALHOST, 0)) as server_sock:
        server_sock.setblocking(False)
        svc = proxy_service("rst", free_port(), [server_sock.getsockname()])
        port = svc.ports.ranges[0].first
        async with running(desired(svc)):
            # client resets -> backend sees a reset
            client = socket.create_connection((LOCALHOST, port))
            backend_conn = await _accept_one(server_sock)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            backend_conn.setblocking(False)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(backend_conn, 10), 5)
            backend_conn.close()
            # backend resets -> client sees a reset
            client = socket.create_connection((LOCALHOST, port))
            client.setblocking(False)
            backend_conn = await _accept_one(server_sock)
            backend_conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            backend_conn.close()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(client, 10), 5)
            client.close()


@async_test(timeout=30)
async def test_back_pressure_bounds_what_the_proxy_buffers() -> None:
    loop = asyncio.get_running_loop()
    with socket.create_server((LOCALHOST, 0)) as server_sock:
        server_sock.setblocking(False)
        svc = proxy_service("bp", free_port(), [server_sock.getsockname()])
        port = svc.ports.ranges[0].first
        async with running(desired(svc)):
            _reader, writer = await connect(port)
            backend_conn = await _accept_one(server_sock)  # accepts, does not read yet
            chunk, total = b"z" * (1 << 20), 64
            sent = 0

            async def push() -> None:
                nonlocal sent
                for _ in range(total):
                    writer.write(chunk)
                    await writer.drain()
                    sent += 1

            pusher = asyncio.create_task(push())
            await asyncio.sleep(1.0)
            # Kernel buffers on both hops hold a few MiB; a proxy without
            # back-pressure would have swallowed all 64 MiB by now.
            assert not pusher.done() and sent < total // 2
            received = 0
            while received < total << 20:
                data = await loop.sock_recv(backend_conn, 1 << 20)
                assert data
                received += len(data)
            await asyncio.wait_for(pusher, 10)
            assert received == total << 20
            backend_conn.close()
            writer.close()


@async_test()
async def test_refused_backend_resets_the_client() -> None:
    dead = free_port()
    svc = proxy_service("dead", free_port(), [(LOCALHOST, dead)])
    async with running(desired(svc)):
        reader, writer = await connect(svc.ports.ranges[0].first)
        assert await closed_by_peer(reader)
        writer.close()


async def relay_once_the_backend_handshake_is_done() -> None:
    loop = asyncio.get_running_loop()
    # listen(0) queues one connection, the filler's: the backend then drops
    # the relay's SYN, so connect() returns with the handshake in flight and
    # it completes on the SYN's retransmit, about 1 s later.
    with (
        socket.create_server((LOCALHOST, 0), backlog=0) as backend,
        socket.create_connection(backend.getsockname()),
    ):
        backend.setblocking(False)
        port = free_port()
        svc = proxy_service("slow", port, [backend.getsockname()])
        async with running(desired(svc)) as driver:
            reader, writer = await connect(port)
            writer.write(b"ping")
            await asyncio.sleep(0.2)
            assert len(driver.flows()) == 1  # backend chosen, still connecting
            filler, _ = await loop.sock_accept(backend)
            filler.close()
            freed = loop.time()
            conn, _ = await asyncio.wait_for(loop.sock_accept(backend), 5)
            assert loop.time() - freed > 0.3, "the SYN was not dropped: nothing was in flight"
            with conn:
                assert await loop.sock_recv(conn, 4) == b"ping"
                await loop.sock_sendall(conn, b"pong")
                assert await reader.readexactly(4) == b"pong"
            assert await reader.read() == b""  # the backend's FIN, passed on
            writer.close()
            assert driver.counters()["slow"].drops == {}


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, new_event_loop], ids=["asyncio", "uvloop"]
)
def test_relay_waits_for_a_backend_handshake_in_flight(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # Over loopback the handshake is usually done inside connect() and the
    # relay starts at once; this is the other path: a writer, then SO_ERROR.
    async_test(loop_factory=loop_factory)(relay_once_the_backend_handshake_is_done)()


@async_test()
async def test_idle_timeout_closes_both_sides() -> None:
    async with backends(EchoBackend("a")) as servers:
        port = free_port()
        svc = service_for("idle", port, servers, idle_timeout=0.3)
        async with running(desired(svc)) as driver:
            reader, writer = await connect(port)
            await reader.readline()
            assert await closed_by_peer(reader)
            assert driver.flows() == []
            writer.close()


# ---------------------------------------------------------------- PROXY protocol


@pytest.mark.parametrize("version", [ProxyProtocol.V1, ProxyProtocol.V2])
@async_test()
async def test_backend_learns_the_client_address(version: ProxyProtocol) -> None:
    async with backends(EchoBackend("a", expect_proxy=True)) as servers:
        port = free_port()
        svc = service_for("pp", port, servers, proxy_protocol=version)
        async with running(desired(svc)):
            reader, writer = await connect(port, source="127.0.0.3")
            assert await reader.readline() == b"a\n"
            [header] = servers[0].headers
            assert header.version == (1 if version is ProxyProtocol.V1 else 2)
            assert header.addresses is not None
            client = writer.get_extra_info("sockname")
            assert (str(header.addresses.src), header.addresses.src_port) == client
            assert (str(header.addresses.dst), header.addresses.dst_port) == (LOCALHOST, port)
            writer.close()


@async_test()
async def test_forged_inbound_header_is_not_believed() -> None:
    forged = encode_v1(ip_address("198.18.0.66"), 1111, ip_address(LOCALHOST), 2222)
    async with backends(EchoBackend("a", expect_proxy=True)) as servers:
        port = free_port()
        svc = service_for("pp", port, servers, proxy_protocol=ProxyProtocol.V2)
        async with running(desired(svc)) as driver:
            reader, writer = await connect(port)
            await reader.readline()
            writer.write(forged + b"data")
            assert await reader.readexactly(len(forged) + 4) == forged + b"data"
            [header] = servers[0].headers
            assert header.addresses is not None
            assert str(header.addresses.src) == LOCALHOST  # the real peer
            assert str(driver.flows()[0].src) == LOCALHOST
            writer.close()


@async_test()
async def test_trusted_inbound_header_names_the_client() -> None:
    inbound = encode_v1(ip_address("198.18.0.66"), 1111, ip_address(LOCALHOST), 2222)
    async with backends(EchoBackend("a", expect_proxy=True)) as servers:
        port = free_port()
        svc = replace(
            service_for(
                "pp", port, servers, proxy_protocol=ProxyProtocol.V2,
                trust_inbound_proxy_protocol=True,
            ),
            clients=ClientRules(allow=(ip_network("198.18.0.0/24"),)),
        )  # fmt: skip
        async with running(desired(svc)) as driver:
            reader, writer = await connect(port)
            writer.write(inbound + b"data")
            assert await reader.readline() == b"a\n"
            assert await reader.readexactly(4) == b"data"  # header stripped
            [header] = servers[0].headers
            assert header.addresses is not None
            assert (str(header.addresses.src), header.addresses.src_port) == ("198.18.0.66", 1111)
            assert str(driver.flows()[0].src) == "198.18.0.66"
            writer.close()
            # A header naming a client outside the allow-list is refused.
            reader, writer = await connect(port)
            writer.write(encode_v1(ip_address("203.0.113.1"), 1, ip_address(LOCALHOST), 2))
            assert await closed_by_peer(reader)
            writer.close()
            # Garbage instead of a header is refused too.
            reader, writer = await connect(port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            assert await closed_by_peer(reader)
            writer.close()
            assert len(servers[0].headers) == 1


# ---------------------------------------------------------------- UDP


class _UdpBackend(asyncio.DatagramProtocol):
    def __init__(self, name: bytes, expect_proxy: bool = False) -> None:
        self.name = name
        self.expect_proxy = expect_proxy
        self.transport: asyncio.DatagramTransport | None = None
        self.headers: list[ProxyHeader] = []
        self.peers: set[tuple[str, int]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peers.add(addr)
        if self.expect_proxy:
            header, data = parse(data)
            self.headers.append(header)
        assert self.transport is not None
        self.transport.sendto(self.name + b":" + data, addr)


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)


async def _udp_backend(
    name: bytes, expect_proxy: bool = False
) -> tuple[asyncio.DatagramTransport, _UdpBackend]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpBackend(name, expect_proxy), local_addr=(LOCALHOST, 0)
    )
    return transport, protocol


async def _udp_client(port: int) -> tuple[asyncio.DatagramTransport, _UdpClient]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(_UdpClient, remote_addr=(LOCALHOST, port))


@async_test()
async def test_udp_sessions_relay_expire_and_are_bounded() -> None:
    transport, backend = await _udp_backend(b"u", expect_proxy=True)
    try:
        port = free_port(socket.SOCK_DGRAM)
        svc = proxy_service(
            "dns", port, [transport.get_extra_info("sockname")], protocol=Protocol.UDP
        )
        svc = replace(
            with_options(svc, proxy_protocol=ProxyProtocol.V2, max_udp_sessions=2),
            conntrack=ConnTracking(udp_timeout=0.4),
        )
        async with running(desired(svc)) as driver:
            clients = [await _udp_client(port) for _ in range(3)]
            for i, (client, _) in enumerate(clients[:2]):
                client.sendto(b"q%d" % i)
                client.sendto(b"again")
            for i, (_, protocol) in enumerate(clients[:2]):
                assert await asyncio.wait_for(protocol.replies.get(), 5) == b"u:q%d" % i
                assert await asyncio.wait_for(protocol.replies.get(), 5) == b"u:again"
            clients[2][0].sendto(b"dropped")  # the table is full
            await asyncio.sleep(0.05)
            assert clients[2][1].replies.empty()
            assert driver.counters()["dns"].drops["udp_sessions_full"] == 1
            assert len(driver.flows(service="dns")) == 2
            header = backend.headers[0]
            assert header.addresses is not None
            assert header.addresses.transport is Transport.UDP
            assert (str(header.addresses.src), header.addresses.src_port) == clients[0][
                0
            ].get_extra_info("sockname")
            assert len(backend.peers) == 2  # one socket per session
            total = driver.counters()["dns"].total
            assert (total.new_flows, total.active_flows, total.packets) == (2, 2, 8)
            await asyncio.sleep(0.8)  # idle sessions end; room again
            assert driver.flows() == []
            clients[2][0].sendto(b"now")
            assert await asyncio.wait_for(clients[2][1].replies.get(), 5) == b"u:now"
            for client, _ in clients:
                client.close()
    finally:
        transport.close()


# ---------------------------------------------------------------- TLS and SNI


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def _tls_name(port: int, ca: trustme.CA, server_name: str | None) -> tuple[str, str | None]:
    """Backend name over verified TLS, and the certificate's first DNS name."""
    context = _client_context(ca)
    if server_name is None:
        context.check_hostname = False
    reader, writer = await asyncio.open_connection(
        LOCALHOST, port, ssl=context, server_hostname=server_name
    )
    name = (await reader.readline()).decode().strip()
    cert = writer.get_extra_info("peercert")
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    return name, cert["subjectAltName"][0][1]


def _sni_service(
    port: int, a: EchoBackend, b: EchoBackend, fallback: SniFallback, **options: Any
) -> Service:
    svc = proxy_service(
        "tls",
        port,
        [
            Backend(address=ip_address(LOCALHOST), port=a.port, pool="alpha"),
            Backend(address=ip_address(LOCALHOST), port=b.port),  # pool "default"
        ],
    )
    return with_options(
        svc,
        sni_routes=(SniRoute(server_names=("alpha.example.com", "*.alpha.test"), pool="alpha"),),
        sni_fallback=fallback,
        **options,
    )


@async_test()
async def test_sni_routes_tls_to_pools_end_to_end(ca: trustme.CA) -> None:
    alpha = EchoBackend("alpha", tls=_server_context(ca, "alpha.example.com", "*.alpha.test"))
    beta = EchoBackend("beta", tls=_server_context(ca, "beta.example.com", "localhost"))
    async with backends(alpha, beta) as (a, b):
        port = free_port()
        async with running(desired(_sni_service(port, a, b, SniFallback.DEFAULT_POOL))):
            assert await _tls_name(port, ca, "alpha.example.com") == ("alpha", "alpha.example.com")
            assert await _tls_name(port, ca, "x.alpha.test") == ("alpha", "alpha.example.com")
            assert await _tls_name(port, ca, "beta.example.com") == ("beta", "beta.example.com")
            assert await _tls_name(port, ca, None) == ("beta", "beta.example.com")


@async_test()
async def test_sni_close_fallback_and_split_hello(ca: trustme.CA) -> None:
    async with backends(EchoBackend("alpha"), EchoBackend("beta")) as (a, b):
        port = free_port()
        svc = _sni_service(port, a, b, SniFallback.CLOSE, sni_timeout=0.5)
        async with running(desired(svc)) as driver:
            for name in ("beta.example.com", None, "y.x.alpha.test"):
                reader, writer = await connect(port)
                writer.write(client_hello(name))
                assert await closed_by_peer(reader)
                writer.close()
            assert driver.counters()["tls"].drops["sni_no_route"] == 3
            # A hello dribbled out in small segments still routes.
            data = client_hello("q.alpha.test")
            reader, writer = await connect(port)
            writer.transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
            for i in range(0, len(data), 37):
                writer.write(data[i : i + 37])
                await writer.drain()
                await asyncio.sleep(0.002)
            assert await reader.readline() == b"alpha\n"
            assert await reader.readexactly(len(data)) == data  # forwarded unchanged
            writer.close()
            # A client that sends nothing is closed after sni_timeout.
            started = asyncio.get_running_loop().time()
            reader, writer = await connect(port)
            assert await closed_by_peer(reader)
            assert 0.4 < asyncio.get_running_loop().time() - started < 3
            writer.close()


@async_test(timeout=30)
async def test_openssl_s_client_through_the_proxy(ca: trustme.CA, tmp_path: Path) -> None:
    alpha = EchoBackend("alpha", tls=_server_context(ca, "alpha.example.com"))
    async with backends(alpha, EchoBackend("beta")) as (a, b):
        port = free_port()
        ca_file = str(tmp_path / "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        async with running(desired(_sni_service(port, a, b, SniFallback.CLOSE))):
            process = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"{LOCALHOST}:{port}",
                "-servername", "alpha.example.com", "-verify_hostname", "alpha.example.com",
                "-CAfile", ca_file, "-verify_return_error", "-brief",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            try:
                out, _ = await asyncio.wait_for(process.communicate(b"hi\n"), 15)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            text = out.decode(errors="replace")
            assert "Verification: OK" in text, text
            assert "alpha" in text


# ---------------------------------------------------------------- choosing backends


@async_test()
async def test_maglev_follows_the_ring_and_ring_changes_keep_connections() -> None:
    async with backends(EchoBackend("a"), EchoBackend("b"), EchoBackend("c")) as servers:
        port = free_port()
        svc = service_for("ring", port, servers)
        sd = desired_for(svc)
        async with running(desired(sd)) as driver:
            conns = [await connect(port) for _ in range(24)]
            by_key = {f"127.0.0.1:{s.port}": s.name for s in servers}
            assert sd.ring is not None
            for reader, writer in conns:
                name = (await reader.readline()).decode().strip()
                src, sport = writer.get_extra_info("sockname")
                slot = ring_slot(
                    svc.affinity, sd.seed, len(sd.ring), ip_address(src), sport,
                    ip_address(LOCALHOST), port, L4PROTO["tcp"],
                )  # fmt: skip
                assert by_key[sd.backends[sd.ring.slots[slot]].key] == name
            assert len({s.name for s in servers if s.peers}) > 1
            # Drop backend "a" from the ring and reweight: no connection breaks.
            shrunk = desired_for(svc, roles={f"127.0.0.1:{servers[0].port}": BackendRole.DOWN})
            driver.sync(desired(shrunk))
            for reader, writer in conns:
                writer.write(b"alive")
                assert await reader.readexactly(5) == b"alive"
            assert driver.counters()["ring"].total.active_flows == 24
            for _ in range(10):
                new_reader, new_writer = await connect(port)
                assert await new_reader.readline() in (b"b\n", b"c\n")  # never "a" now
                new_writer.close()
            for _, writer in conns:
                writer.close()


@pytest.mark.parametrize("balance", [Balance.ROUND_ROBIN, Balance.LEAST_CONN])
@async_test()
async def test_round_robin_and_least_conn_spread_evenly(balance: Balance) -> None:
    async with backends(EchoBackend("a"), EchoBackend("b"), EchoBackend("c")) as servers:
        port = free_port()
        async with running(desired(service_for("spread", port, servers, balance=balance))):
            conns = [await connect(port) for _ in range(9)]
            names = [(await r.readline()).decode().strip() for r, _ in conns]
            assert sorted(names) == sorted(["a", "b", "c"] * 3)
            for _, writer in conns:
                writer.close()


@async_test()
async def test_connection_limits() -> None:
    async with backends(EchoBackend("a"), EchoBackend("b")) as servers:
        port = free_port()
        svc = service_for("lim", port, servers, max_connections_per_backend=1)
        async with running(desired(svc)) as driver:
            first = [await connect(port) for _ in range(2)]
            names = {(await r.readline()).decode().strip() for r, _ in first}
            assert names == {"a", "b"}  # the second skips the full backend
            assert await refused(port)
            assert driver.counters()["lim"].drops["no_backend"] == 1
            for _, w in first:
                w.close()
        port = free_port()
        async with running(desired(service_for("cap", port, servers, max_connections=2))) as d:
            first = [await connect(port) for _ in range(2)]
            for r, _ in first:
                await r.readline()
            assert await refused(port)
            assert d.counters()["cap"].drops["max_connections"] == 1
            for _, w in first:
                w.close()


@async_test()
async def test_allow_list_closes_other_clients_at_once() -> None:
    async with backends(EchoBackend("a")) as servers:
        port = free_port()
        svc = replace(
            service_for("acl", port, servers),
            clients=ClientRules(allow=(ip_network("127.0.0.2/32"),)),
        )
        async with running(desired(svc)) as driver:
            assert await refused(port, source="127.0.0.1")
            reader, writer = await connect(port, source="127.0.0.2")
            assert await reader.readline() == b"a\n"
            writer.close()
            assert driver.counters()["acl"].drops["not_allowed"] == 1
            assert servers[0].peers and len(servers[0].peers) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT needs CAP_NET_ADMIN")
@async_test()
async def test_transparent_backend_sees_the_client_as_peer() -> None:
    async with backends(EchoBackend("a")) as servers:
        port = free_port()
        async with running(desired(service_for("tp", port, servers, transparent=True))):
            reader, writer = await connect(port, source="127.0.0.9")
            assert await reader.readline() == b"a\n"
            assert servers[0].peers[0][0] == "127.0.0.9"
            writer.close()


# ---------------------------------------------------------------- sync semantics


@async_test()
async def test_sync_is_all_or_nothing_on_bind_errors() -> None:
    async with backends(EchoBackend("a")) as servers:
        ok_port = free_port()
        with socket.create_server((LOCALHOST, 0)) as taken:
            taken_port = taken.getsockname()[1]
            driver = ProxyDriver()
            try:
                good = service_for("good", ok_port, servers)
                bad = service_for("bad", taken_port, servers)
                with pytest.raises(DataplaneError, match=f"service bad.*:{taken_port}"):
                    driver.sync(desired(good, bad))
                assert driver.listening() == []
                with pytest.raises(ConnectionRefusedError):
                    await connect(ok_port)
                everything = replace(good, name="all", ports=PortSet(all_ports=True))
                with pytest.raises(DataplaneError, match="service all: ports = all"):
                    driver.sync(desired(everything))
                driver.sync(desired(good))
                assert await hello(ok_port) == ("a", b"pingbye")
            finally:
                await driver.aclose()


@async_test()
async def test_removed_service_drains_then_resets_and_cut_flows_reset() -> None:
    async with backends(EchoBackend("a"), EchoBackend("b")) as servers:
        port = free_port()
        svc = replace(service_for("gone", port, servers), drain_timeout=0.3)
        async with running(desired(svc)) as driver:
            reader, writer = await connect(port)
            await reader.readline()
            driver.sync(DesiredState(services=()))
            with pytest.raises(ConnectionRefusedError):
                await connect(port)
            writer.write(b"during drain")
            assert await reader.readexactly(12) == b"during drain"
            assert await closed_by_peer(reader)  # reset at the drain deadline
            writer.close()

            driver.sync(desired(svc))
            conns = [await connect(port) for _ in range(6)]
            names = [(await r.readline()).decode().strip() for r, _ in conns]
            cut_key = f"127.0.0.1:{servers[0].port}"
            driver.sync(desired(desired_for(svc, cut=[cut_key])))
            for (reader, writer), name in zip(conns, names, strict=True):
                if name == "a":
                    assert await closed_by_peer(reader)
                else:
                    writer.write(b"ok")
                    assert await reader.readexactly(2) == b"ok"
                writer.close()
            assert all(f.backend != cut_key for f in driver.flows())


@async_test(timeout=60, loop_factory=new_event_loop)  # the daemon's loop: uvloop
async def test_ten_thousand_connections_leave_no_fd_or_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipes_made = 0
    real_open_pipe = tcp.open_pipe

    def counted_open_pipe() -> tuple[int, int]:
        nonlocal pipes_made
        pipes_made += 1
        return real_open_pipe()

    monkeypatch.setattr(tcp, "open_pipe", counted_open_pipe)
    async with backends(EchoBackend("a"), EchoBackend("b")) as servers:
        port = free_port()
        svc = service_for("churn", port, servers)
        fds_before = len(os.listdir("/proc/self/fd"))
        tasks_before = len(asyncio.all_tasks())
        driver = ProxyDriver()
        driver.sync(desired(svc))
        bulk = b"B" * (1 << 20)

        async def one(i: int) -> None:
            reader, writer = await connect(port)
            await reader.readline()
            if i % 500 == 0:  # bulk: the relay moves it through pipes
                writer.write(bulk)
                writer.write_eof()
                assert await reader.read() == bulk + b"bye"
            elif i % 7 == 0:  # the client resets; the proxy resets the backend
                writer.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                writer.transport.abort()
                return
            elif i % 3 == 0:  # half-close: the answer still comes
                writer.write(b"x")
                writer.write_eof()
                assert await reader.read() == b"xbye"
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

        for batch in range(50):  # 200 at a time: bounded descriptors
            await asyncio.gather(*(one(batch * 200 + i) for i in range(200)))
        await asyncio.sleep(0.1)
        assert driver.counters()["churn"].total.new_flows == 10_000
        assert driver.counters()["churn"].total.active_flows == 0
        assert pipes_made >= 20  # each bulk flow's upstream direction at least
        assert sum(s.resets for s in servers) > 0
        await driver.aclose()
        for server in servers:
            for writer in server.writers:
                writer.close()
            server.writers.clear()
        await asyncio.sleep(0.1)
        assert len(asyncio.all_tasks()) <= tasks_before
        assert len(os.listdir("/proc/self/fd")) <= fds_before


@async_test()
async def test_ipv6_vip_port_range_and_removed_port_drains() -> None:
    async with backends(EchoBackend("a")) as servers:
        p1 = free_port()
        p2 = next(p for p in iter(free_port, None) if p != p1)  # the kernel may repeat one
        svc = replace(
            proxy_service("six", [p1, p2], [servers[0].address], vip="::1"), drain_timeout=0.3
        )
        async with running(desired(svc)) as driver:
            assert [k.port for k in driver.listening()] == sorted([p1, p2])
            conns = {}
            for port in (p1, p2):
                reader, writer = await asyncio.open_connection("::1", port)
                assert await reader.readline() == b"a\n"
                conns[port] = (reader, writer)
            [flow] = driver.flows(backend=f"127.0.0.1:{servers[0].port}")[:1]
            assert str(flow.src) == "::1"
            driver.sync(desired(replace(svc, ports=PortSet(ranges=(PortRange(p1, p1),)))))
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("::1", p2)
            reader, writer = conns[p2]
            assert await closed_by_peer(reader)  # drained, then reset
            reader, writer = conns[p1]
            writer.write(b"kept")
            assert await reader.readexactly(4) == b"kept"
            for _, w in conns.values():
                w.close()
