"""One proxied TCP connection: preamble (PROXY header in, ClientHello peek), backend
choice and connect, then a byte relay with back-pressure, half-close, reset
propagation and, for bulk flows on Linux, zero-copy splice.

The relay owns both sockets as plain non-blocking sockets driven by the
loop's add_reader/add_writer callbacks: no transports, protocols, tasks or
futures per connection (they were a good part of what a connection cost),
and the descriptors stay ours, so a direction can switch to splice mid-flow.

Life of a relay (callbacks only; one timer bounds each phase):

  PREAMBLE --decision--> CONNECTING --backend up--> RELAYING --both directions ended--> CLOSED
      \\___________________ any failure / timeout / close() _________________/

PREAMBLE is skipped unless the service peeks at a ClientHello or trusts an
inbound PROXY header; the timer is sni_timeout there, connect_timeout while
CONNECTING and idle_timeout (from the last read) while RELAYING.

Each direction (client -> backend, backend -> client) reads only once what
it read before has been written; at most one read is in flight:

- Back-pressure: a write that would block stops reading the source until the
  destination takes the rest (at most READ_SIZE bytes, or one pipe, per
  direction).
- Zero-copy: a read that fills READ_SIZE marks the direction as bulk; once that
  read is written the direction makes a pipe (PIPE_SIZE) and moves bytes
  socket -> pipe -> socket with splice(2), never through userspace. Short
  request/response flows never fill a read and never pay for pipes. When no
  pipe can be made (EMFILE, ENFILE, EPERM past fs.pipe-user-pages-soft, not
  Linux) the direction stays on recv/send.
- Half-close: EOF from one side (read only with nothing in flight, so the
  pipe is empty) becomes shutdown(SHUT_WR) on the other; the other direction
  keeps flowing. The second EOF closes both sockets (both read to EOF, so
  the close sends a FIN).
- Reset: a socket error (RST, EPIPE) on either side closes both with
  SO_LINGER 0, so the peer sees a reset too, not a clean FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import socket
import struct
from typing import Final

from passlb.dataplane.base import Flow
from passlb.dataplane.proxy import proxy_protocol, sni
from passlb.dataplane.proxy.runtime import BackendStats, ServiceRuntime
from passlb.model import IPAddress, ProxyProtocol
from passlb.state import BackendDesired

try:
    import fcntl
except ImportError:  # not POSIX: no pipes to size, no splice
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

READ_SIZE: Final = 256 * 1024  # one recv, as asyncio's and uvloop's transports read
PREAMBLE_READ_SIZE: Final = 64 * 1024
# 1 MiB: with the default 64 KiB pipe splice saved no CPU (bench/bench_splice.py).
PIPE_SIZE: Final = 1024 * 1024
CAN_SPLICE: Final = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# Linux: non-blocking from socket() on, one fcntl pair fewer per connection.
_SOCK_NONBLOCK: Final = getattr(socket, "SOCK_NONBLOCK", 0)
# Linux values; the socket module of Python 3.11 names neither.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)


class Phase(enum.Enum):
    PREAMBLE = "preamble"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


def set_reset_on_close(sock: socket.socket) -> None:
    """SO_LINGER 0: the next close sends RST instead of FIN."""
    with contextlib.suppress(OSError):  # already gone: nothing left to reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def set_transparent(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def open_pipe() -> tuple[int, int]:
    """A non-blocking (read end, write end) pipe of PIPE_SIZE; OSError when none can be had."""
    if not CAN_SPLICE:
        raise OSError(errno.ENOSYS, "splice needs Linux")
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # Fails with EPERM for users past fs.pipe-user-pages-soft (without
        # CAP_SYS_RESOURCE) or above fs.pipe-max-size.
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    return read_end, write_end


def _handshake_done(sock: socket.socket) -> bool:
    """Whether a non-blocking connect that said EINPROGRESS is already up.

    Over loopback or veth the kernel often runs the whole handshake inside
    connect(): then the relay starts at once, without a writer, a wake-up and
    SO_ERROR (getpeername fails with ENOTCONN until the handshake is done).
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class _Direction:
    """Bytes from src to dst; src is read only when nothing read before waits for dst."""

    __slots__ = (
        "bulk",
        "dst",
        "ended",
        "in_pipe",
        "loop",
        "may_splice",
        "pending",
        "pipe",
        "reading",
        "relay",
        "src",
        "writing",
    )

    def __init__(self, relay: TcpRelay, src: socket.socket, dst: socket.socket) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.src = src
        self.dst = dst
        self.pending: bytes | memoryview = b""  # read, not yet written (plain path)
        self.pipe: tuple[int, int] | None = None  # (read end, write end) once bulk
        self.in_pipe = 0  # bytes spliced in, not yet out
        self.bulk = False  # a read filled READ_SIZE: make a pipe once it is written
        self.may_splice = CAN_SPLICE  # no pipe tried yet
        self.reading = False  # a reader is registered on src
        self.writing = False  # a writer is registered on dst
        self.ended = False  # EOF passed on

    def start(self, first: bytes) -> None:
        self.pending = first
        self._flush()

    def _on_readable(self) -> None:
        pipe = self.pipe
        try:
            if pipe is not None:
                size = os.splice(self.src.fileno(), pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            else:
                data = self.src.recv(READ_SIZE)
                size = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.relay.fail(e)
            return
        if not size:
            self._pass_eof()
            return
        self.relay.transferred(size)
        if pipe is not None:
            self.in_pipe = size
        else:
            self.pending = data
            self.bulk = size == READ_SIZE and self.may_splice
        self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        """Write what is in flight; then read again, or wait until dst takes more."""
        try:
            if self.in_pipe:
                assert self.pipe is not None
                while self.in_pipe:
                    self.in_pipe -= os.splice(
                        self.pipe[0], self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS
                    )
            else:
                while self.pending:
                    sent = self.dst.send(self.pending)
                    if sent == len(self.pending):
                        self.pending = b""
                    else:
                        self.pending = memoryview(self.pending)[sent:]
        except (BlockingIOError, InterruptedError):
            if self.reading:
                self.loop.remove_reader(self.src.fileno())
                self.reading = False
            if not self.writing:
                self.loop.add_writer(self.dst.fileno(), self._on_writable)
                self.writing = True
            return
        except OSError as e:
            self.relay.fail(e)
            return
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        if self.bulk and self.pipe is None:
            self._switch_to_splice()
        if not self.reading:
            self.loop.add_reader(self.src.fileno(), self._on_readable)
            self.reading = True

    def _switch_to_splice(self) -> None:
        self.bulk = self.may_splice = False  # one try per direction
        try:
            self.pipe = open_pipe()
        except OSError as e:
            who = self.relay.who()
            log.debug("service %s: flow from %s:%s has no pipe, stays on recv/send: %r", *who, e)

    def _pass_eof(self) -> None:
        self.loop.remove_reader(self.src.fileno())
        self.reading = False
        if self.relay.other_direction_ended(self):
            # Both sockets have been read to EOF, so their close sends a FIN
            # (not a reset): no shutdown needed first.
            self.ended = True
            self.relay.close(reset=False)
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.relay.fail(e)
            return
        self.ended = True

    def release(self) -> None:
        """Unregister from the loop and close the pipe; the relay closes the sockets."""
        if self.reading:
            self.loop.remove_reader(self.src.fileno())
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None
            self.in_pipe = 0


class TcpRelay:
    __slots__ = (
        "_backend",
        "_backend_sock",
        "_buffered",
        "_down",
        "_inbound_header",
        "_last_activity",
        "_peeker",
        "_server_name",
        "_sock",
        "_stats",
        "_timer",
        "_up",
        "_watching",
        "client",
        "loop",
        "phase",
        "runtime",
        "vip",
    )

    def __init__(
        self,
        runtime: ServiceRuntime,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        client: tuple[IPAddress, int],
        vip: tuple[IPAddress, int],
    ) -> None:
        self.runtime = runtime
        self.loop = loop
        self.phase = Phase.PREAMBLE
        self._sock = sock  # the client's
        self._backend_sock: socket.socket | None = None
        self.client = client  # whom we believe the client is (PROXY header when trusted)
        self.vip = vip
        self._buffered = b""  # client bytes read in the preamble, for the backend
        self._backend: BackendDesired | None = None
        self._stats: BackendStats | None = None
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False  # a reader (preamble) or writer (connect) is registered
        self._up: _Direction | None = None  # client -> backend
        self._down: _Direction | None = None  # backend -> client
        options = runtime.options
        self._inbound_header = (
            proxy_protocol.ProxyHeaderParser() if options.trust_inbound_proxy_protocol else None
        )
        self._peeker = sni.ClientHelloPeeker() if runtime.router is not None else None
        self._server_name: str | None = None

    # ------------------------------------------------------------ FlowHandle

    @property
    def backend_key(self) -> str | None:
        return self._backend.key if self._backend is not None else None

    @property
    def vip_port(self) -> int:
        return self.vip[1]

    def describe(self) -> Flow | None:
        if self._backend is None:
            return None
        idle = self.runtime.options.idle_timeout
        return Flow(
            service=self.runtime.name,
            backend=self._backend.key,
            protocol="tcp",
            src=self.client[0],
            src_port=self.client[1],
            dst=self.vip[0],
            dst_port=self.vip[1],
            expires_in=max(0.0, self._last_activity + idle - self.loop.time()),
        )

    def close(self, *, reset: bool) -> None:
        """Close both sides now (reset: RST instead of FIN), pipes included."""
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        backend = self._backend_sock
        if self._watching:
            self.loop.remove_reader(self._sock.fileno())
            if backend is not None:
                self.loop.remove_writer(backend.fileno())
            self._watching = False
        for direction in (self._up, self._down):
            if direction is not None:
                direction.release()
        self._up = self._down = None  # the directions point at us: no cycle left for the GC
        for sock in (self._sock, backend):
            if sock is not None:
                if reset:
                    set_reset_on_close(sock)
                sock.close()
        self.runtime.flow_closed(self)

    # ------------------------------------------------------------ setup

    def start(self) -> None:
        if self._inbound_header is not None or self._peeker is not None:
            self._arm_timer(self.runtime.options.sni_timeout)
            self.loop.add_reader(self._sock.fileno(), self._on_preamble_readable)
            self._watching = True
        else:
            self._connect_backend()

    def who(self) -> tuple[str, IPAddress, int]:
        return self.runtime.name, self.client[0], self.client[1]

    def fail(self, exc: OSError) -> None:
        log.debug("service %s: flow from %s:%s fails: %r", *self.who(), exc)
        self.close(reset=True)

    def _connect_backend(self) -> None:
        runtime = self.runtime
        router = runtime.router
        pool = router.pool_for(self._server_name) if router is not None else None
        if router is not None and pool is None:
            runtime.drops["sni_no_route"] += 1
            self.close(reset=False)
            return
        backend = runtime.choose(pool, self.client, self.vip, "tcp")
        if backend is None:
            runtime.drops["no_backend"] += 1
            self.close(reset=True)
            return
        self._backend = backend
        self._stats = runtime.flow_opened(self, backend.key)
        self.phase = Phase.CONNECTING
        self._arm_timer(runtime.options.connect_timeout)
        address = backend.address
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        try:
            # Our own non-blocking connect by address: uvloop's sock_connect
            # would resolve even a numeric address on its thread pool.
            self._backend_sock = sock = socket.socket(family, socket.SOCK_STREAM | _SOCK_NONBLOCK)
            if not _SOCK_NONBLOCK:
                sock.setblocking(False)
            # As asyncio's and uvloop's transports do: relay each read at once.
            # (The client's socket inherits TCP_NODELAY from the listener.)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if runtime.options.transparent:
                set_transparent(sock, family)
                sock.bind((str(self.client[0]), 0))
            error = sock.connect_ex(runtime.backend_sockaddr(backend, self.vip[1]))
        except OSError as e:
            self._unreachable(e)
            return
        if error == 0 or (error == errno.EINPROGRESS and _handshake_done(sock)):
            self._start_relay()
        elif error == errno.EINPROGRESS:
            self.loop.add_writer(sock.fileno(), self._on_connected)
            self._watching = True
        else:
            self._unreachable(OSError(error, os.strerror(error)))

    def _on_connected(self) -> None:
        sock = self._backend_sock
        assert sock is not None
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._unreachable(OSError(error, os.strerror(error)))
        else:
            self._start_relay()

    def _unreachable(self, exc: OSError) -> None:
        # The client gets a reset: like a refused or timed-out connection in
        # front of a passthrough load balancer.
        self.runtime.drops["backend_unreachable"] += 1
        self.fail(exc)

    def _start_relay(self) -> None:
        backend = self._backend_sock
        assert backend is not None
        self.phase = Phase.RELAYING
        self._last_activity = now = self.loop.time()
        idle_deadline = now + self.runtime.options.idle_timeout
        # The connect timer stays when it fires first: _on_timer re-arms from
        # the last activity, which saves a cancel and a new timer per connection.
        if self._timer is None or self._timer.when() > idle_deadline:
            self._arm_timer(self.runtime.options.idle_timeout)
        first = self._proxy_header()
        if self._buffered:
            self.transferred(len(self._buffered))
            first += self._buffered
            self._buffered = b""
        up = self._up = _Direction(self, self._sock, backend)
        down = self._down = _Direction(self, backend, self._sock)
        # The backend's reader goes on before the connect's writer comes off:
        # uvloop then keeps one poll handle for the descriptor rather than
        # making a second one (4 epoll_ctl and an ioctl each).
        down.start(b"")
        if self._watching:
            self.loop.remove_writer(backend.fileno())
            self._watching = False
        if self.phase is Phase.RELAYING:
            up.start(first)

    def _proxy_header(self) -> bytes:
        version = self.runtime.options.proxy_protocol
        if version is ProxyProtocol.NONE:
            return b""
        (src, sport), (dst, dport) = self.client, self.vip
        if src.version != dst.version:
            # An IPv4 client reached through an IPv6 VIP (or a trusted header
            # saying so) has no single-family form; LOCAL/UNKNOWN says "no address".
            if version is ProxyProtocol.V1:
                return proxy_protocol.encode_v1_unknown()
            return proxy_protocol.encode_v2_local()
        if version is ProxyProtocol.V1:
            return proxy_protocol.encode_v1(src, sport, dst, dport)
        return proxy_protocol.encode_v2(src, sport, dst, dport)

    # ------------------------------------------------------------ preamble

    def _on_preamble_readable(self) -> None:
        try:
            data = self._sock.recv(PREAMBLE_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail(e)
            return
        if not data:
            self.close(reset=False)  # gone before it said enough to route
            return
        try:
            route = self._on_preamble(data)
        except (sni.SniError, proxy_protocol.ProxyProtocolError) as e:
            log.debug("service %s: flow from %s:%s has a bad preamble: %r", *self.who(), e)
            self.close(reset=True)
            return
        if route is None:
            return
        self.loop.remove_reader(self._sock.fileno())
        self._watching = False
        if route:
            self._connect_backend()
        else:
            self.close(reset=False)

    def _on_preamble(self, data: bytes) -> bool | None:
        """Feed the parsers: None while they need more, else whether to route the flow."""
        if self._inbound_header is not None:
            header = self._inbound_header.feed(data)
            if header is proxy_protocol.NEED_MORE:
                return None
            assert isinstance(header, proxy_protocol.ProxyHeader)
            if header.addresses is not None:
                self.client = (header.addresses.src, header.addresses.src_port)
            data = self._inbound_header.rest
            self._inbound_header = None
            if not self.runtime.allows(self.client[0]):
                self.runtime.drops["not_allowed"] += 1
                return False
        self._buffered += data
        if self._peeker is None:
            return True
        if not data:
            return None
        try:
            found = self._peeker.feed(data)
        except sni.NotTlsError:
            found = sni.Found(server_name=None)  # plain bytes: routed as "no SNI"
        if found is sni.NEED_MORE:
            return None
        assert isinstance(found, sni.Found)
        self._server_name = found.server_name
        self._peeker = None
        return True

    # ------------------------------------------------------------ relay events

    def transferred(self, size: int) -> None:
        self._last_activity = self.loop.time()
        stats = self._stats
        assert stats is not None
        stats.packets += 1
        stats.bytes += size

    def other_direction_ended(self, direction: _Direction) -> bool:
        other = self._down if direction is self._up else self._up
        return other is not None and other.ended

    # ------------------------------------------------------------ timer

    def _arm_timer(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase is Phase.RELAYING:
            # Re-armed from the last activity rather than on every read: one
            # timer per relay, no per-read timer churn.
            deadline = self._last_activity + self.runtime.options.idle_timeout
            if self.loop.time() < deadline:
                self._timer = self.loop.call_at(deadline, self._on_timer)
            else:
                self.close(reset=False)
            return
        log.debug("service %s: flow from %s:%s times out in %s", *self.who(), self.phase.value)
        self.close(reset=True)
