"""Client helpers that talk to the lab's echo servers (`passlb.lab.servers`).

Plain blocking sockets, bounded in count and time; meant to run inside a
client namespace through `lab.call(client.ns, tcp_requests, vip, 80, 10)`.
Every request opens a new connection (or a new UDP socket), so each has its
own source port and is a new flow for the load balancer. A failed request
gives an entry {"error": "<exception>"} instead of a reply.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

MAX_REQUESTS = 10_000
MAX_SECONDS = 120.0
MAX_LINE = 65536

Reply = dict[str, Any]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_bounds(count: int = 1, seconds: float = 0.0) -> None:
    if not 0 <= count <= MAX_REQUESTS:
        raise ValueError(f"count {count} is not in 0..{MAX_REQUESTS}")
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"seconds {seconds} is not in 0..{MAX_SECONDS}")


def _error(exc: BaseException) -> Reply:
    return {"error": f"{type(exc).__name__}: {exc}"}


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} bytes, before a line")
        data += chunk
        if len(data) > MAX_LINE:
            raise ValueError("reply line too long")
    return data.split(b"\n", 1)[0]


def tcp_requests(host: str, port: int, count: int, timeout: float = 2.0) -> list[Reply]:
    """`count` TCP connections, each returning the server's greeting line."""
    _check_bounds(count)
    replies = []
    for _ in range(count):
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                replies.append(json.loads(_read_line(sock)))
        except (OSError, ValueError) as exc:
            replies.append(_error(exc))
    return replies


def tcp_flow_stream(
    host: str, port: int, seconds: float, gap: float = 0.01, timeout: float = 1.0
) -> list[Reply]:
    """A new TCP connection every `gap` seconds for `seconds`: each reply (or
    error) with its source port and wall-clock start and end, to line up with
    events elsewhere (a backend killed, the daemon's log)."""
    _check_bounds(count=int(seconds / gap) if gap > 0 else MAX_REQUESTS + 1, seconds=seconds)
    flows: list[Reply] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.time()
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.bind(("", 0))  # the port is known even when connect fails
            sport = sock.getsockname()[1]
            try:
                sock.connect((host, port))
                reply: Reply = json.loads(_read_line(sock))
            except (OSError, ValueError) as exc:
                reply = _error(exc)
        finally:
            sock.close()
        reply.update(sport=sport, started=started, finished=time.time())
        flows.append(reply)
        time.sleep(gap)
    return flows


def tls_requests(
    host: str, port: int, count: int, server_name: str, ca_file: str, timeout: float = 2.0
) -> list[Reply]:
    """`count` TLS connections verified against `ca_file` for `server_name`."""
    _check_bounds(count)
    context = ssl.create_default_context(cafile=ca_file)
    replies = []
    for _ in range(count):
        try:
            with (
                socket.create_connection((host, port), timeout=timeout) as raw,
                context.wrap_socket(raw, server_hostname=server_name) as sock,
            ):
                reply = json.loads(_read_line(sock))
                reply["tls_version"] = sock.version()
                replies.append(reply)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            replies.append(_error(exc))
    return replies


def udp_requests(host: str, port: int, count: int, timeout: float = 2.0) -> list[Reply]:
    """`count` datagrams, each from a new socket; a reply counts only when it
    comes from `host` (the socket is connected), as for a real client."""
    _check_bounds(count)
    replies = []
    for seq in range(count):
        try:
            with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
                sock.settimeout(timeout)
                sock.connect((host, port))
                sock.send(f"seq={seq}".encode())
                replies.append(json.loads(sock.recv(65535).split(b"\n", 1)[0]))
        except (OSError, ValueError) as exc:
            replies.append(_error(exc))
    return replies


def tcp_stream(
    host: str, port: int, seconds: float, chunk: int = 16384, timeout: float = 2.0
) -> dict[str, Any]:
    """Keep one connection echoing for `seconds`; report the backend, the bytes
    sent and echoed back intact, and the error that ended it early, if any."""
    _check_bounds(seconds=seconds)
    result: dict[str, Any] = {"backend": None, "sent": 0, "received": 0, "rounds": 0, "errors": []}
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            result["backend"] = json.loads(_read_line(sock)).get("backend")
            while time.monotonic() - started < seconds:
                # The round number in every chunk catches reordered or stale echoes.
                payload = struct.pack("!Q", result["rounds"]).ljust(chunk, b"x")
                sock.sendall(payload)
                result["sent"] += len(payload)
                echoed = _recv_exactly(sock, len(payload))
                if echoed != payload:
                    raise ValueError(f"round {result['rounds']}: the echo differs from the data")
                result["received"] += len(echoed)
                result["rounds"] += 1
    except (OSError, ValueError) as exc:
        result["errors"].append(_error(exc)["error"])
    result["seconds"] = time.monotonic() - started
    return result


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts, remaining = [], size
    while remaining:
        part = sock.recv(min(remaining, 1 << 20))
        if not part:
            raise ConnectionError(f"connection closed with {remaining} echo bytes missing")
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def tcp_streams(
    host: str,
    port: int,
    count: int,
    seconds: float,
    interval: float = 0.2,
    stall_limit: float = 20.0,
    connect_timeout: float = 5.0,
    stop_file: str | None = None,
    on_open: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """`count` long-lived TCP connections, each sending a numbered 64-byte
    message every `interval` for `seconds` (or until `stop_file` exists) and
    checking its echo. `on_open` is called once every connection is open.

    A connection breaks on a reset, a close, an echo that differs from what
    was sent, or no echo for `stall_limit` seconds. Reports each connection's
    source port and backend, the broken ones with their error, and the longest
    any message waited for its echo (how long a flow was without service).
    """
    _check_bounds(count, seconds)
    conns: list[dict[str, Any]] = []
    for _ in range(count):
        conn: dict[str, Any] = {"sport": None, "backend": None, "error": None, "max_wait": 0.0}
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
            conn["sport"] = sock.getsockname()[1]
            conn["backend"] = json.loads(_read_line(sock)).get("backend")
            sock.setblocking(False)
            conn.update(sock=sock, pending=bytearray(), sent_at=[], seq=0)
        except (OSError, ValueError) as exc:
            conn["error"] = _error(exc)["error"]
        conns.append(conn)
    live = {c["sock"].fileno(): c for c in conns if c["error"] is None}
    if on_open is not None:
        on_open()
    started = time.monotonic()
    next_send = started
    with selectors.DefaultSelector() as selector:
        for fd in live:
            selector.register(fd, selectors.EVENT_READ)
        while live and (now := time.monotonic()) < started + seconds + stall_limit:
            sending = now < started + seconds and not (
                stop_file is not None and os.path.exists(stop_file)
            )
            if not sending:
                seconds = min(seconds, now - started)
            if sending and now >= next_send:
                for conn in list(live.values()):
                    _stream_send(conn, now, live, selector)
                next_send += interval
            if not sending and not any(c["pending"] for c in live.values()):
                break
            timeout = max(0.0, min(next_send if sending else now + 0.1, now + 0.1) - now)
            for key, _ in selector.select(timeout):
                if int(key.fd) in live:
                    _stream_receive(live[int(key.fd)], time.monotonic(), live, selector)
            now = time.monotonic()
            for conn in list(live.values()):
                if conn["sent_at"] and now - conn["sent_at"][0][1] > stall_limit:
                    _stream_fail(conn, f"no echo for {stall_limit:g} s", live, selector)
    for conn in conns:
        if "sock" in conn:
            conn["sock"].close()
    broken = [
        {k: c[k] for k in ("sport", "backend", "error")} for c in conns if c["error"] is not None
    ]
    return {
        "opened": sum(1 for c in conns if c["sport"] is not None),
        "broken": broken,
        "flows": [(c["sport"], c["backend"]) for c in conns],
        "by_backend": dict(Counter(c["backend"] for c in conns if c["backend"])),
        "max_wait": max((c["max_wait"] for c in conns), default=0.0),
        "messages": sum(c.get("seq", 0) for c in conns),
    }


def _stream_send(
    conn: dict[str, Any], now: float, live: dict[int, Any], selector: selectors.BaseSelector
) -> None:
    message = f"{conn['seq']:08d}".encode().ljust(63, b".") + b"\n"
    try:
        conn["sock"].send(message)  # 64 bytes always fit an empty-enough send buffer
    except BlockingIOError:
        return  # the echoes are behind: this round is skipped for this connection
    except OSError as exc:
        _stream_fail(conn, _error(exc)["error"], live, selector)
        return
    conn["pending"] += message
    conn["sent_at"].append((len(message), now))
    conn["seq"] += 1


def _stream_receive(
    conn: dict[str, Any], now: float, live: dict[int, Any], selector: selectors.BaseSelector
) -> None:
    try:
        data = conn["sock"].recv(65536)
    except BlockingIOError:
        return
    except OSError as exc:
        _stream_fail(conn, _error(exc)["error"], live, selector)
        return
    if not data:
        _stream_fail(conn, "closed by the peer", live, selector)
        return
    pending: bytearray = conn["pending"]
    if not pending.startswith(data):
        _stream_fail(conn, "the echo differs from the data sent", live, selector)
        return
    del pending[: len(data)]
    echoed = len(data)
    while conn["sent_at"] and echoed:
        size, at = conn["sent_at"][0]
        conn["max_wait"] = max(conn["max_wait"], now - at)
        if size <= echoed:
            conn["sent_at"].pop(0)
            echoed -= size
        else:
            conn["sent_at"][0] = (size - echoed, at)
            echoed = 0


def _stream_fail(
    conn: dict[str, Any], error: str, live: dict[int, Any], selector: selectors.BaseSelector
) -> None:
    conn["error"] = error
    fd = conn["sock"].fileno()
    live.pop(fd, None)
    selector.unregister(fd)


def udp_stream(
    host: str,
    port: int,
    seconds: float,
    interval: float = 0.01,
    timeout: float = 1.0,
    stop_file: str | None = None,
) -> dict[str, Any]:
    """Send a numbered datagram every `interval` from one socket (one flow) for
    `seconds` (or until `stop_file` exists); report which backend answered
    each one and which were lost."""
    _check_bounds(seconds=seconds)
    if interval <= 0:
        raise ValueError("interval must be positive")
    answered_by: dict[int, str] = {}
    errors: list[str] = []
    sent = 0
    with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        sock.setblocking(False)
        started = time.monotonic()
        next_send = started
        end_of_sending = started + seconds
        deadline = end_of_sending + timeout
        while (now := time.monotonic()) < deadline:
            if stop_file is not None and now < end_of_sending and os.path.exists(stop_file):
                end_of_sending, deadline = now, now + timeout
            if now >= next_send and now < end_of_sending:
                _send_seq(sock, sent, errors)
                sent += 1
                next_send += interval
            wake = next_send if next_send < end_of_sending else deadline
            readable, _, _ = select.select([sock], [], [], max(0.0, wake - time.monotonic()))
            if readable:
                _collect_udp_replies(sock, answered_by, errors)
            if sent and len(answered_by) == sent and time.monotonic() >= end_of_sending:
                break
    backends = [answered_by.get(seq) for seq in range(sent)]
    return {
        "sent": sent,
        "received": len(answered_by),
        "lost": [seq for seq, backend in enumerate(backends) if backend is None],
        "backends": backends,
        "by_backend": dict(Counter(b for b in backends if b is not None)),
        "errors": errors,
    }


def _send_seq(sock: socket.socket, seq: int, errors: list[str]) -> None:
    try:
        sock.send(f"seq={seq}".encode())
    except OSError as exc:
        errors.append(f"send seq={seq}: {exc}")


def _collect_udp_replies(
    sock: socket.socket, answered_by: dict[int, str], errors: list[str]
) -> None:
    while True:
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return
        except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
            errors.append(f"recv: {exc}")
            continue
        try:
            reply = json.loads(data.split(b"\n", 1)[0])
            seq = int(str(reply["echo"]).removeprefix("seq="))
            answered_by[seq] = str(reply["backend"])
        except (ValueError, KeyError) as exc:
            errors.append(f"bad reply {data[:80]!r}: {exc}")


class _HeldTcp:
    """One long-lived connection of `held_flows`: a numbered line out, its echo back."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.backend = json.loads(_read_line(self.sock)).get("backend")
        self.sock.setblocking(False)
        self.rounds = 0
        self.last_ok = time.time()
        self.error: str | None = None
        self.broken_at: float | None = None
        self.pending = b""  # the line sent whose echo is still due, or b""
        self.sent_at = 0.0
        self.received = b""

    def send(self) -> None:
        self.pending = f"{self.rounds}\n".encode()
        self.sent_at = time.monotonic()
        try:
            self.sock.send(self.pending)
        except OSError as exc:
            self.fail(exc)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(exc)
            return
        if not data:
            self.fail(ConnectionError("closed by the peer"))
            return
        self.received += data
        if len(self.received) >= len(self.pending):
            if self.received != self.pending:
                self.fail(ValueError(f"echo {self.received!r} for {self.pending!r}"))
                return
            self.rounds += 1
            self.last_ok = time.time()
            self.pending = self.received = b""

    def check_timeout(self, timeout: float) -> None:
        if self.pending and time.monotonic() - self.sent_at > timeout:
            self.fail(TimeoutError(f"no echo of round {self.rounds} within {timeout} s"))

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = _error(exc)["error"]
            self.broken_at = time.time()
            self.sock.close()

    def report(self) -> Reply:
        self.sock.close()
        return {
            "backend": self.backend,
            "rounds": self.rounds,
            "last_ok": self.last_ok,
            "error": self.error,
            "broken_at": self.broken_at,
        }


def held_flows(
    host: str,
    port: int,
    tcp: int,
    udp: int,
    first_udp_port: int,
    interval: float = 0.1,
    timeout: float = 2.0,
    stop_fd: int = 0,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """`tcp` long-lived TCP connections and `udp` UDP sessions from the fixed
    source ports `first_udp_port`, +1, …, each sending a numbered line every
    `interval` until `stop_fd` (stdin) is readable or MAX_SECONDS pass;
    `on_ready` is called once all are open.

    TCP: the backend that greeted each connection, its echoed rounds, the
    wall-clock time of the last good echo and the error that broke it (a
    reset, a close, a wrong or missing echo). UDP: per session, the backend
    that answered each datagram, None where no answer came.
    """
    _check_bounds(count=tcp + udp)
    conns = [_HeldTcp(host, port, timeout) for _ in range(tcp)]
    sessions = []
    for n in range(udp):
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        sock.bind(("", first_udp_port + n))
        sock.connect((host, port))
        sock.setblocking(False)
        sessions.append(sock)
    if on_ready is not None:
        on_ready()  # every connection is open, every source port bound
    answered: list[dict[int, str]] = [{} for _ in sessions]
    errors: list[str] = []
    sent = 0
    started = time.monotonic()
    next_round = started
    stopping_at: float | None = None
    while True:
        now = time.monotonic()
        if stopping_at is None and now - started > MAX_SECONDS:
            stopping_at = now
        if stopping_at is None and now >= next_round:
            for conn in conns:
                if conn.error is None and not conn.pending:
                    conn.send()
            for sock in sessions:
                _send_seq(sock, sent, errors)
            sent += 1
            next_round += interval
        for conn in conns:
            if conn.error is None:
                conn.check_timeout(timeout)
        live = [c for c in conns if c.error is None]
        waiting = any(c.pending for c in live) or any(len(a) < sent for a in answered)
        if stopping_at is not None and (not waiting or now - stopping_at > timeout):
            break
        wake = stopping_at + timeout if stopping_at is not None else next_round
        watched: list[Any] = [c.sock for c in live] + sessions
        if stopping_at is None:
            watched.append(stop_fd)
        readable, _, _ = select.select(watched, [], [], max(0.0, min(wake - now, interval)))
        for ready in readable:
            if ready is stop_fd:
                stopping_at = time.monotonic()
            elif ready in sessions:
                _collect_udp_replies(ready, answered[sessions.index(ready)], errors)
            else:
                next(c for c in live if c.sock is ready).on_readable()
    for sock in sessions:
        sock.close()
    return {
        "tcp": [conn.report() for conn in conns],
        "udp": [
            {"sport": first_udp_port + n, "backends": [a.get(seq) for seq in range(sent)]}
            for n, a in enumerate(answered)
        ],
        "errors": errors,
    }


def ping(host: str, count: int = 1, timeout: float = 1.0) -> list[float | None]:
    """ICMP echo `count` times (needs root: raw socket); the round-trip time in
    seconds of each, None where no reply came within `timeout`."""
    _check_bounds(count)
    v6 = _family(host) == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    rtts: list[float | None] = []
    with socket.socket(_family(host), socket.SOCK_RAW, proto) as sock:
        for seq in range(count):
            payload = b"passlb-lab"
            header = struct.pack("!BBHHH", request_type, 0, 0, ident, seq)
            if not v6:  # the kernel fills in the ICMPv6 checksum itself (RFC 3542)
                checksum = internet_checksum(header + payload)
                header = struct.pack("!BBHHH", request_type, 0, checksum, ident, seq)
            sent_at = time.monotonic()
            sock.sendto(header + payload, (host, 0))
            replied_at = _await_echo_reply(sock, v6, reply_type, ident, seq, sent_at + timeout)
            rtts.append(None if replied_at is None else replied_at - sent_at)
    return rtts


def _await_echo_reply(
    sock: socket.socket, v6: bool, reply_type: int, ident: int, seq: int, deadline: float
) -> float | None:
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            return None
        packet = sock.recv(65535)
        # IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
        icmp = packet if v6 else packet[(packet[0] & 0x0F) * 4 :]
        if len(icmp) >= 8:
            kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", icmp[:8])
            if (kind, got_ident, got_seq) == (reply_type, ident, seq):
                return time.monotonic()
    return None


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
