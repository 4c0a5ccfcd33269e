"""Health probes: tcp, http, https, tls, udp, exec and none.

``probe`` is the entry point; ``start_probe`` is the same for the scheduler,
which also takes a verdict known at once (a tcp connect to a near peer) without
awaiting anything. Each probe type is a small coroutine that returns a verdict
or raises; the entry points bound it by the spec's timeout and turn every
exception into a failed ProbeResult with a reason an operator can act on, so a
probe never raises into the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

from passlb.health.http import exchange
from passlb.health.policy import WEIGHT_HEADER, ProbeResult, parse_reported_weight
from passlb.model import HealthSpec, HealthType, IPAddress

log = logging.getLogger(__name__)

# Output of an exec check kept for the reason (its last line, shortened).
_EXEC_REASON_CHARS = 200
_MAX_DATAGRAM = 65535  # the largest UDP payload: a reply is never cut short
# Seconds a connection may take to hang up once the verdict is in.
_HANGUP_GRACE = 0.25
# connect() results that mean "wait until writable" (BlockingIOError, InterruptedError).
_CONNECT_PENDING = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY, errno.EINTR})


class _Verdict(NamedTuple):
    ok: bool
    reason: str
    weight: int | None = None


_ProbeImpl = Callable[[HealthSpec, IPAddress, int, IPAddress | None], Awaitable[_Verdict]]


def start_probe(
    spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
) -> ProbeResult | Coroutine[Any, Any, ProbeResult]:
    """Begin one check of `spec` against address:port.

    Returns the verdict itself when it is known at once, else a coroutine
    that produces it (the caller awaits it or runs it as a task). A tcp check
    of a near peer (loopback, the LAN) usually knows by the end of connect():
    at a thousand checks a second, not creating a task, a timer and a
    future for each is most of the scheduler's cost. Never raises.
    """
    if spec.type is HealthType.TCP:
        return _start_tcp(spec, address, port)
    return _bounded_probe(spec, address, port, vip)


async def probe(
    spec: HealthSpec, address: IPAddress, port: int, *, vip: IPAddress | None = None
) -> ProbeResult:
    """Run one check of `spec` against address:port and return its verdict.

    Never raises: every failure is a ProbeResult with ok=False. Only a
    cancellation of the caller goes through, as it must.
    """
    outcome = start_probe(spec, address, port, vip=vip)
    return outcome if isinstance(outcome, ProbeResult) else await outcome


async def _bounded_probe(
    spec: HealthSpec, address: IPAddress, port: int, vip: IPAddress | None
) -> ProbeResult:
    """Run a probe within the spec's timeout, every failure turned into a verdict."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(spec.timeout):
            verdict = await _PROBES[spec.type](spec, address, port, vip)
    except TimeoutError:
        verdict = _Verdict(False, f"timeout after {spec.timeout:g}s")
    except ConnectionRefusedError:
        verdict = _Verdict(False, "connection refused")
    except ssl.SSLCertVerificationError as exc:
        verdict = _Verdict(False, f"certificate verification failed: {exc.verify_message}")
    except ssl.SSLError as exc:
        verdict = _Verdict(False, f"TLS error: {exc.reason or exc}")
    except OSError as exc:
        verdict = _Verdict(False, exc.strerror or str(exc))
    except (ValueError, EOFError) as exc:
        verdict = _Verdict(False, str(exc) or type(exc).__name__)
    except Exception as exc:
        # A bug in a probe must not stop the backend's checks; say so loudly.
        log.exception("%s probe of %s:%d crashed", spec.type, address, port)
        verdict = _Verdict(False, f"probe error: {type(exc).__name__}: {exc}")
    return ProbeResult(verdict.ok, verdict.reason, time.perf_counter() - started, verdict.weight)


async def _probe_none(
    spec: HealthSpec, address: IPAddress, port: int, vip: IPAddress | None
) -> _Verdict:
    return _Verdict(True, "not checked (type none)")


def _start_tcp(
    spec: HealthSpec, address: IPAddress, port: int
) -> ProbeResult | Coroutine[Any, Any, ProbeResult]:
    # A bare socket, not a stream: at a thousand checks a second the stream
    # machinery (protocol, reader, graceful close) was most of a probe's cost.
    # And no loop.sock_connect: uvloop's resolves even an IP literal through
    # getaddrinfo on its thread pool, a thread hop per probe.
    started = time.perf_counter()
    peer = (str(address), port)
    try:
        sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET)
    except OSError as exc:  # out of descriptors, most likely
        return ProbeResult(False, exc.strerror or str(exc), time.perf_counter() - started)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(peer)
        if err in _CONNECT_PENDING:
            # Asking again tells how it went: 0 once connected, the error once
            # failed, EALREADY while the handshake runs. A near peer has often
            # answered by then, and the probe needs no wake-up at all.
            err = sock.connect_ex(peer)
            if err == errno.EISCONN:
                err = 0
    except OSError as exc:
        sock.close()
        return ProbeResult(False, exc.strerror or str(exc), time.perf_counter() - started)
    if err in _CONNECT_PENDING:
        return _finish_tcp(spec, sock, started)
    sock.close()
    return ProbeResult(not err, _tcp_reason(err), time.perf_counter() - started)


async def _finish_tcp(spec: HealthSpec, sock: socket.socket, started: float) -> ProbeResult:
    """Wait out a handshake that connect() left running; owns (and closes) `sock`."""
    with sock:
        try:
            async with asyncio.timeout(spec.timeout - (time.perf_counter() - started)):
                await _writable(sock)
        except TimeoutError:
            reason = f"timeout after {spec.timeout:g}s"
            return ProbeResult(False, reason, time.perf_counter() - started)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return ProbeResult(not err, _tcp_reason(err), time.perf_counter() - started)


def _tcp_reason(err: int) -> str:
    if not err:
        return "connected"
    return "connection refused" if err == errno.ECONNREFUSED else os.strerror(err)


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    writable = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _wake, writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _probe_tls(
    spec: HealthSpec, address: IPAddress, port: int, vip: IPAddress | None
) -> _Verdict:
    _, writer = await asyncio.open_connection(
        str(address), port, ssl=_tls_context(spec), server_hostname=_server_hostname(spec, address)
    )
    version = writer.get_extra_info("ssl_object").version()
    await _close(writer)
    return _Verdict(True, f"{version} handshake done")


async def _probe_http(
    spec: HealthSpec, address: IPAddress, port: int, vip: IPAddress | None
) -> _Verdict:
    secure = spec.type is HealthType.HTTPS
    if secure:
        reader, writer = await asyncio.open_connection(
            str(address),
            port,
            ssl=_tls_context(spec),
            server_hostname=_server_hostname(spec, address),
        )
    else:
        reader, writer = await asyncio.open_connection(str(address), port)
    try:
        response = await exchange(
            reader,
            writer,
            method=spec.method,
            path=spec.path,
            host=_host_header(spec, address, port, secure=secure),
            read_body=spec.body_match is not None,
        )
    finally:
        await _close(writer)

    weight, weight_issue = None, None
    raw_weight = response.header(WEIGHT_HEADER)
    if raw_weight is not None:
        weight, weight_issue = parse_reported_weight(raw_weight)
    notes = f"; {weight_issue}" if weight_issue else ""

    if response.status not in spec.expect_status:
        expected = ", ".join(str(s) for s in spec.expect_status)
        return _Verdict(False, f"HTTP {response.status}, expected {expected}{notes}")
    if spec.body_match is not None and spec.body_match.encode() not in response.body:
        return _Verdict(False, f"HTTP {response.status} body lacks {spec.body_match!r}{notes}")
    return _Verdict(True, f"HTTP {response.status}{notes}", weight)


async def _probe_udp(
    spec: HealthSpec, address: IPAddress, port: int, vip: IPAddress | None
) -> _Verdict:
    # A plain socket, not a datagram transport: asyncio's transport silently
    # drops an empty datagram, and an empty request is a valid check.
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((str(address), port))  # UDP: sets the peer, sends nothing
        await loop.sock_sendall(sock, spec.request or b"")
        try:
            data = await loop.sock_recv(sock, _MAX_DATAGRAM)
        except ConnectionRefusedError:
            # On a connected UDP socket the kernel reports an ICMP port
            # unreachable as ECONNREFUSED on the next receive.
            return _Verdict(False, "port unreachable")
    if spec.expect is not None and spec.expect not in data:
        return _Verdict(False, f"reply lacks {spec.expect!r}: {data[:40]!r}")
    return _Verdict(True, f"reply of {len(data)} bytes")


async def _probe_exec(
    spec: HealthSpec, address: IPAddress, port: int, vip: IPAddress | None
) -> _Verdict:
    if not spec.command:
        return _Verdict(False, "exec check has no command")
    env = dict(os.environ, PASSLB_BACKEND_ADDRESS=str(address), PASSLB_BACKEND_PORT=str(port))
    if vip is not None:
        env["PASSLB_BACKEND_VIP"] = str(vip)
    try:
        process = await asyncio.create_subprocess_exec(
            *spec.command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group, so a timeout kills the children a shell
            # script started too, and none keeps the output pipe open.
            start_new_session=True,
        )
    except FileNotFoundError:
        return _Verdict(False, f"command not found: {spec.command[0]}")
    try:
        output, _ = await process.communicate()
    except asyncio.CancelledError:
        # Timed out (or the checker stops): the whole group goes, even when
        # the command itself has exited and only its children hold the pipe.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    last_line = output.decode(errors="replace").strip().rpartition("\n")[2]
    said = f": {last_line[:_EXEC_REASON_CHARS]}" if last_line else ""
    if process.returncode == 0:
        return _Verdict(True, f"exit 0{said}")
    return _Verdict(False, f"exit {process.returncode}{said}")


def _tls_context(spec: HealthSpec) -> ssl.SSLContext:
    if spec.verify_tls:
        return ssl.create_default_context(cafile=spec.ca_file)
    # Unverified: the check asks "does it speak TLS", not "is it who it says".
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _server_hostname(spec: HealthSpec, address: IPAddress) -> str:
    # Names the peer for verification and SNI; Python sends no SNI for an IP.
    return spec.server_name or spec.host or str(address)


def _host_header(spec: HealthSpec, address: IPAddress, port: int, *, secure: bool) -> str:
    if spec.host:
        return spec.host
    host = spec.server_name or (f"[{address}]" if address.version == 6 else str(address))
    default_port = 443 if secure else 80
    return host if port == default_port else f"{host}:{port}"


async def _close(writer: asyncio.StreamWriter) -> None:
    # The verdict is in; hanging up must neither change it nor stall the probe.
    # A TLS close waits for the peer's close_notify, which some never send.
    writer.close()
    try:
        async with asyncio.timeout(_HANGUP_GRACE):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError as exc:
        log.debug("closing a probe connection: %s", exc)


_PROBES: dict[HealthType, _ProbeImpl] = {
    HealthType.NONE: _probe_none,
    HealthType.TLS: _probe_tls,
    HealthType.HTTP: _probe_http,
    HealthType.HTTPS: _probe_http,
    HealthType.UDP: _probe_udp,
    HealthType.EXEC: _probe_exec,
}
