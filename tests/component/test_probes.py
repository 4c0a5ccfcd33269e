"""Every probe type against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import cast

import pytest
import trustme

from passlb.health.policy import ProbeResult
from passlb.health.probes import probe, start_probe
from passlb.model import HealthSpec, HealthType

LOOPBACK = IPv4Address("127.0.0.1")
TIMEOUT = 2.0  # generous: the probes under test answer in milliseconds


def check(spec: HealthSpec, port: int, **kwargs: object) -> ProbeResult:
    return asyncio.run(probe(spec, LOOPBACK, port, **kwargs))  # type: ignore[arg-type]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def unused_port(kind: int) -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    import socket

    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------- servers


@asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class HttpBackend:
    """Answers every request with `response` (raw bytes) and keeps the requests."""

    response: bytes
    requests: list[bytes] = field(default_factory=list)
    stall: bool = False  # read the request, never answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.stall:
                await reader.read()  # until the prober hangs up
                return
            writer.write(self.response)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the prober may hang up first; that is its right
        finally:
            writer.close()


def http_response(
    status: str = "200 OK", body: bytes = b"", headers: tuple[str, ...] = ()
) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def http_check(port: int, backend: HttpBackend, **spec: object) -> ProbeResult:
    async def scenario() -> ProbeResult:
        async with tcp_server(backend.handle) as server_port:
            return await probe(
                HealthSpec(type=HealthType.HTTP, timeout=TIMEOUT, **spec),  # type: ignore[arg-type]
                LOOPBACK,
                server_port if port == 0 else port,
            )

    return asyncio.run(scenario())


# ---------------------------------------------------------------- none, tcp


def test_none_is_always_up() -> None:
    result = check(HealthSpec(type=HealthType.NONE), unused_port(1))
    assert result.ok and "type none" in result.reason


def test_tcp_up_then_refused_when_the_listener_closes() -> None:
    async def scenario() -> None:
        spec = HealthSpec(type=HealthType.TCP, timeout=TIMEOUT)

        async def idle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        async with tcp_server(idle) as port:
            up = await probe(spec, LOOPBACK, port)
        down = await probe(spec, LOOPBACK, port)
        assert up.ok and up.reason == "connected"
        assert 0 < up.latency < TIMEOUT
        assert not down.ok and down.reason == "connection refused"

    run(scenario)


@contextmanager
def hanging_handshake() -> Iterator[int]:
    """A loopback port whose full accept queue drops new SYNs: a connect to
    it stays pending, so a probe has to wait for the socket or time out."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


def test_tcp_times_out_while_the_handshake_hangs() -> None:
    with hanging_handshake() as port:
        result = check(HealthSpec(type=HealthType.TCP, timeout=0.2), port)
    assert not result.ok and result.reason == "timeout after 0.2s"


def test_tcp_verdict_of_a_near_peer_comes_without_awaiting() -> None:
    """start_probe decides a loopback connect in the call: no task, no timer."""

    async def results(port: int) -> tuple[list[ProbeResult], int]:
        # The loopback handshake runs inside connect() unless the kernel defers
        # its softirq work (a loaded machine): then the probe hands back a
        # coroutine. Most of 20 must be decided at once.
        spec = HealthSpec(type=HealthType.TCP, timeout=TIMEOUT)
        found, instant = [], 0
        for _ in range(20):
            outcome = start_probe(spec, LOOPBACK, port)
            if isinstance(outcome, ProbeResult):
                instant += 1
                found.append(outcome)
            else:
                found.append(await outcome)
        return found, instant

    async def scenario() -> None:
        async def idle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        async with tcp_server(idle) as port:
            up, up_instant = await results(port)
        down, down_instant = await results(port)
        assert {(r.ok, r.reason) for r in up} == {(True, "connected")}
        assert {(r.ok, r.reason) for r in down} == {(False, "connection refused")}
        assert up_instant > 10 and down_instant > 10

    run(scenario)


def test_tcp_pending_handshake_is_handed_back_to_await() -> None:
    async def scenario() -> None:
        with hanging_handshake() as port:
            outcome = start_probe(HealthSpec(type=HealthType.TCP, timeout=0.2), LOOPBACK, port)
            assert not isinstance(outcome, ProbeResult)
            result = await outcome
        assert not result.ok and result.reason == "timeout after 0.2s"
        assert 0.2 <= result.latency < 1.0

    run(scenario)


# ---------------------------------------------------------------- http


def test_http_status_match_and_request_shape() -> None:
    backend = HttpBackend(http_response())
    result = http_check(0, backend, path="/healthz")
    assert result.ok, result.reason
    assert result.reason == "HTTP 200"
    assert result.weight is None
    (request,) = backend.requests
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /healthz HTTP/1.1"
    assert "Connection: close" in lines
    assert any(line.startswith("Host: 127.0.0.1:") for line in lines)


def test_http_status_mismatch() -> None:
    result = http_check(0, HttpBackend(http_response("503 Service Unavailable")))
    assert not result.ok
    assert result.reason == "HTTP 503, expected 200"


def test_http_expected_statuses_and_host_header_and_head() -> None:
    backend = HttpBackend(http_response("204 No Content"))
    result = http_check(0, backend, method="HEAD", host="api.test", expect_status=(200, 204))
    assert result.ok, result.reason
    lines = backend.requests[0].decode().split("\r\n")
    assert lines[0] == "HEAD / HTTP/1.1"
    assert "Host: api.test" in lines


def test_http_body_match() -> None:
    page = b"<html>status: READY</html>"
    assert http_check(0, HttpBackend(http_response(body=page)), body_match="READY").ok
    missing = http_check(0, HttpBackend(http_response(body=page)), body_match="GREEN")
    assert not missing.ok
    assert missing.reason == "HTTP 200 body lacks 'GREEN'"


def test_http_chunked_and_unframed_bodies_are_read() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7;ext=1\r\n, READY\r\n0\r\n\r\n"
    )
    assert http_check(0, HttpBackend(chunked), body_match="hello, READY").ok
    unframed = b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 5000 + b"READY"
    assert http_check(0, HttpBackend(unframed), body_match="READY").ok


def test_http_weight_header() -> None:
    reported = http_response(headers=("X-Load-Balancing-Endpoint-Weight: 250",))
    result = http_check(0, HttpBackend(reported))
    assert result.ok and result.weight == 250

    for bad, why in (("abc", "not an integer"), ("5000", "above 1000")):
        invalid = http_response(headers=(f"x-load-balancing-endpoint-weight: {bad}",))
        result = http_check(0, HttpBackend(invalid))
        assert result.ok, "an invalid weight is ignored, not a failed check"
        assert result.weight is None
        assert why in result.reason


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x status line"),
        (b"", "connection closed before the status line"),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "body ended after 5 of 10"),
    ],
)
def test_http_malformed_responses_fail_with_a_reason(response: bytes, reason: str) -> None:
    result = http_check(0, HttpBackend(response), body_match="x")
    assert not result.ok
    assert reason in result.reason


def test_http_refused_and_stalled() -> None:
    refused = http_check(unused_port(1), HttpBackend(b""))
    assert not refused.ok and refused.reason == "connection refused"

    async def scenario() -> None:
        backend = HttpBackend(b"", stall=True)
        async with tcp_server(backend.handle) as port:
            spec = HealthSpec(type=HealthType.HTTP, timeout=0.2)
            result = await probe(spec, LOOPBACK, port)
        assert not result.ok and result.reason == "timeout after 0.2s"
        assert 0.2 <= result.latency < 1.0

    run(scenario)


def test_http_request_injection_is_refused_not_raised() -> None:
    result = http_check(0, HttpBackend(http_response()), path="/x HTTP/1.1\r\nEvil: 1")
    assert not result.ok and "invalid HTTP path" in result.reason


# ---------------------------------------------------------------- https, tls


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("backend.test", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def wrong_ca_file(tmp_path: Path) -> str:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def https_check(server_tls: ssl.SSLContext, **spec: object) -> tuple[ProbeResult, list[bytes]]:
    backend = HttpBackend(http_response(body=b"READY"))

    async def scenario() -> ProbeResult:
        async with tcp_server(backend.handle, tls=server_tls) as port:
            return await probe(
                HealthSpec(type=HealthType.HTTPS, timeout=TIMEOUT, **spec),  # type: ignore[arg-type]
                LOOPBACK,
                port,
            )

    return asyncio.run(scenario()), backend.requests


def test_https_verified_against_the_right_ca(server_tls: ssl.SSLContext, ca_file: str) -> None:
    by_address, _ = https_check(server_tls, verify_tls=True, ca_file=ca_file, body_match="READY")
    assert by_address.ok, by_address.reason
    by_name, requests = https_check(
        server_tls, verify_tls=True, ca_file=ca_file, server_name="backend.test"
    )
    assert by_name.ok, by_name.reason
    assert b"Host: backend.test:" in requests[0]


def test_https_fails_against_a_wrong_ca(server_tls: ssl.SSLContext, wrong_ca_file: str) -> None:
    result, requests = https_check(server_tls, verify_tls=True, ca_file=wrong_ca_file)
    assert not result.ok
    assert result.reason.startswith("certificate verification failed")
    assert requests == []


def test_https_fails_on_a_name_the_certificate_lacks(
    server_tls: ssl.SSLContext, ca_file: str
) -> None:
    result, _ = https_check(server_tls, verify_tls=True, ca_file=ca_file, server_name="other.test")
    assert not result.ok
    assert "certificate verification failed" in result.reason
    assert "other.test" in result.reason


def test_https_unverified_accepts_any_certificate(
    server_tls: ssl.SSLContext, wrong_ca_file: str
) -> None:
    result, _ = https_check(server_tls, ca_file=wrong_ca_file)
    assert result.ok, result.reason


def test_https_sends_sni(ca: trustme.CA, ca_file: str) -> None:
    seen: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("backend.test").configure_cert(context)

    def remember(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    context.sni_callback = remember
    result, _ = https_check(context, verify_tls=True, ca_file=ca_file, server_name="backend.test")
    assert result.ok, result.reason
    assert seen == ["backend.test"]


def test_tls_handshake(server_tls: ssl.SSLContext, ca_file: str) -> None:
    async def scenario() -> None:
        async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        spec = HealthSpec(type=HealthType.TLS, timeout=TIMEOUT, verify_tls=True, ca_file=ca_file)
        async with tcp_server(idle, tls=server_tls) as port:
            result = await probe(spec, LOOPBACK, port)
        assert result.ok, result.reason
        assert result.reason.startswith("TLSv1")

        async def plain_http(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(http_response("400 Bad Request"))
            writer.close()

        async with tcp_server(plain_http) as port:
            result = await probe(HealthSpec(type=HealthType.TLS, timeout=TIMEOUT), LOOPBACK, port)
        assert not result.ok
        assert "TLS error" in result.reason

    run(scenario)


# ---------------------------------------------------------------- udp


class Echo(asyncio.DatagramProtocol):
    def __init__(self, prefix: bytes = b"", silent: bool = False) -> None:
        self.prefix = prefix
        self.silent = silent
        self.received: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.received.append(data)
        if not self.silent:
            self.transport.sendto(self.prefix + data, addr)


@asynccontextmanager
async def udp_server(echo: Echo) -> AsyncIterator[int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: echo, local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def test_udp_echo_up_and_expect() -> None:
    async def scenario() -> None:
        echo = Echo(prefix=b"PONG ")
        spec = HealthSpec(type=HealthType.UDP, timeout=TIMEOUT, request=b"PING", expect=b"PONG")
        async with udp_server(echo) as port:
            up = await probe(spec, LOOPBACK, port)
            empty = await probe(HealthSpec(type=HealthType.UDP, timeout=TIMEOUT), LOOPBACK, port)
            wrong = await probe(
                HealthSpec(type=HealthType.UDP, timeout=TIMEOUT, request=b"x", expect=b"READY"),
                LOOPBACK,
                port,
            )
        assert up.ok and up.reason == "reply of 9 bytes"
        assert empty.ok and empty.reason == "reply of 5 bytes"
        assert echo.received[:2] == [b"PING", b""]
        assert not wrong.ok and "reply lacks b'READY'" in wrong.reason

    run(scenario)


def test_udp_closed_port_is_port_unreachable() -> None:
    spec = HealthSpec(type=HealthType.UDP, timeout=TIMEOUT, request=b"PING")
    result = check(spec, unused_port(2))
    assert not result.ok
    assert result.reason == "port unreachable"
    assert result.latency < TIMEOUT / 2  # the ICMP answer, not the timeout


def test_udp_no_reply_times_out() -> None:
    async def scenario() -> None:
        echo = Echo(silent=True)
        spec = HealthSpec(type=HealthType.UDP, timeout=0.2, request=b"PING")
        async with udp_server(echo) as port:
            result = await probe(spec, LOOPBACK, port)
        assert echo.received == [b"PING"]
        assert not result.ok and result.reason == "timeout after 0.2s"

    run(scenario)


# ---------------------------------------------------------------- exec


def exec_check(*command: str, timeout: float = TIMEOUT) -> ProbeResult:
    spec = HealthSpec(type=HealthType.EXEC, timeout=timeout, command=command)
    return asyncio.run(probe(spec, LOOPBACK, 8080, vip=IPv4Address("198.18.0.10")))


def test_exec_exit_status() -> None:
    assert exec_check("true").ok
    failed = exec_check("sh", "-c", "echo 'disk full' >&2; exit 3")
    assert not failed.ok
    assert failed.reason == "exit 3: disk full"


def test_exec_environment() -> None:
    script = (
        'test "$PASSLB_BACKEND_ADDRESS" = 127.0.0.1 && test "$PASSLB_BACKEND_PORT" = 8080'
        ' && test "$PASSLB_BACKEND_VIP" = 198.18.0.10 && echo fine'
    )
    result = exec_check("sh", "-c", script)
    assert result.ok, result.reason
    assert result.reason == "exit 0: fine"


def test_exec_killed_on_timeout_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    # A shell whose child sleeps: both must die, or the child would hold the pipe.
    script = f"sleep 30 & echo $! > {pid_file}; echo $$ >> {pid_file}; wait"
    result = exec_check("sh", "-c", script, timeout=0.3)
    assert not result.ok and result.reason == "timeout after 0.3s"
    assert result.latency < 2.0
    for pid in (int(line) for line in pid_file.read_text().split()):
        assert not running(pid)


def running(pid: int) -> bool:
    """Whether pid runs, waiting up to 1 s for a kill to land (zombies count as dead)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False
        time.sleep(0.01)
    return True


def test_exec_missing_command_and_empty_command() -> None:
    missing = exec_check("/nonexistent/passlb-check")
    assert not missing.ok and missing.reason == "command not found: /nonexistent/passlb-check"
    empty = exec_check()
    assert not empty.ok and empty.reason == "exec check has no command"


def test_every_check_type_has_a_probe() -> None:
    # An unknown type would surface as a KeyError caught as "probe error".
    for kind in HealthType:
        spec = HealthSpec(type=kind, timeout=0.5, command=("true",))
        result = check(spec, unused_port(1))
        assert "probe error" not in result.reason, kind
