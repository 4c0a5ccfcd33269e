"""One proxied TCP connection: preamble (PROXY header in, ClientHello peek), backend
choice and connect, then a byte relay with back-pressure, half-close and reset
propagation.

Life of a relay (one task runs the setup; protocol callbacks run the relay):

  PREAMBLE --decision--> CONNECTING --backend up--> RELAYING --both sides done--> CLOSED
      \\______________________ any failure / timeout / close() _______________/

- Back-pressure: when one side's write buffer passes the high-water mark the
  other side stops reading until it drains (asyncio pause/resume_writing).
- Half-close: EOF from one side becomes write_eof() on the other; the other
  direction keeps flowing. When both directions have ended, both close.
- Reset: a side that fails with an OSError (RST, EPIPE) has its peer aborted
  with SO_LINGER 0, so the peer sees a reset too, not a clean FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from typing import Any, cast

from passlb.control.desired import BackendDesired
from passlb.dataplane.base import Flow
from passlb.dataplane.proxy import proxy_protocol, sni
from passlb.dataplane.proxy.runtime import ServiceRuntime
from passlb.model import IPAddress, ProxyProtocol

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
# Linux values; the socket module of Python 3.11 names neither.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)


class Phase(enum.Enum):
    PREAMBLE = "preamble"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


def set_reset_on_close(sock: Any) -> None:
    """SO_LINGER 0: the next close sends RST instead of FIN."""
    with contextlib.suppress(OSError):  # already gone: nothing left to reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def set_transparent(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


class _Side(asyncio.Protocol):
    """One socket of a relay; hands every event to the relay."""

    def __init__(self, relay: TcpRelay, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.eof = False  # this side sent FIN
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.relay.on_data(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.on_eof(self)
        return True  # keep the transport: the other direction may still run

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.relay.on_pressure(self, paused=True)

    def resume_writing(self) -> None:
        self.relay.on_pressure(self, paused=False)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.eof:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write_eof()

    def detach(self) -> None:
        """Drop the links to the relay and the transport, once the socket is gone."""
        self.transport = None
        del self.relay

    def close(self, *, reset: bool) -> None:
        transport = self.transport
        if transport is None or self.lost:
            return
        if reset:
            set_reset_on_close(transport.get_extra_info("socket"))
            transport.abort()
        else:
            transport.close()


class TcpRelay:
    def __init__(
        self,
        runtime: ServiceRuntime,
        sock: socket.socket,
        client: tuple[IPAddress, int],
        vip: tuple[IPAddress, int],
    ) -> None:
        self.runtime = runtime
        self.phase = Phase.PREAMBLE
        self._sock = sock
        self._peer = client  # the TCP peer
        self.client = client  # whom we believe the client is (PROXY header when trusted)
        self.vip = vip
        self._client_side = _Side(self, is_client=True)
        self._backend_side = _Side(self, is_client=False)
        self._buffered = bytearray()  # client bytes read before the backend is up
        self._backend: BackendDesired | None = None
        self._loop = asyncio.get_running_loop()
        self._decided: asyncio.Future[None] = self._loop.create_future()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._last_activity = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        options = runtime.options
        self._inbound_header = (
            proxy_protocol.ProxyHeaderParser() if options.trust_inbound_proxy_protocol else None
        )
        self._peeker = sni.ClientHelloPeeker() if runtime.router is not None else None
        self._server_name: str | None = None
        self._refuse = False  # the preamble says: close without a backend
        self.task: asyncio.Task[None] | None = None

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
            expires_in=max(0.0, self._last_activity + idle - self._loop.time()),
        )

    def close(self, *, reset: bool) -> None:
        """Close both sides now (reset: RST instead of FIN)."""
        if self.phase is Phase.CLOSED:
            return
        if (
            self.task is not None
            and not self.task.done()
            and self.task is not asyncio.current_task(self._loop)
        ):
            self.task.cancel()
        self._client_side.close(reset=reset)
        self._backend_side.close(reset=reset)
        if self._client_side.transport is None:
            self._sock.close()
        self._finish()

    # ------------------------------------------------------------ setup task

    async def run(self) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: self._client_side, self._sock)
            if self._needs_preamble():
                await asyncio.wait_for(self._decided, self.runtime.options.sni_timeout)
            else:
                self._client_side.pause_reading()
            if self._refuse or self.phase is Phase.CLOSED:
                self.close(reset=False)
                return
            await self._connect_backend()
        except (OSError, TimeoutError, sni.SniError, proxy_protocol.ProxyProtocolError) as e:
            # The client gets a reset: like a refused or timed-out connection
            # in front of a passthrough load balancer.
            log.debug("service %s: flow from %s:%s ends in setup: %r", *self._who(), e)
            self.close(reset=True)
        except BaseException:
            self.close(reset=True)  # cancelled, or a bug: never leave sockets behind
            raise

    def _who(self) -> tuple[str, IPAddress, int]:
        return self.runtime.name, self.client[0], self.client[1]

    def _needs_preamble(self) -> bool:
        return self._inbound_header is not None or self._peeker is not None

    async def _connect_backend(self) -> None:
        runtime = self.runtime
        pool = runtime.router.pool_for(self._server_name) if runtime.router is not None else None
        if runtime.router is not None and pool is None:
            runtime.drops["sni_no_route"] += 1
            self.close(reset=False)
            return
        backend = runtime.choose(pool, self.client, self.vip, "tcp")
        if backend is None:
            runtime.drops["no_backend"] += 1
            self.close(reset=True)
            return
        self._backend = backend
        runtime.flow_opened(self, backend.key)
        self.phase = Phase.CONNECTING
        host, port = str(backend.address), runtime.backend_port(backend, self.vip[1])
        async with asyncio.timeout(runtime.options.connect_timeout):
            if runtime.options.transparent:
                await self._connect_transparent(host, port, backend.address.version)
            else:
                # By host and port, not sock_connect: uvloop's sock_connect
                # resolves even a numeric address on its thread pool.
                await self._loop.create_connection(lambda: self._backend_side, host, port)
        if self.phase is Phase.CLOSED:
            self._backend_side.close(reset=True)
            return
        self._start_relay()

    async def _connect_transparent(self, host: str, port: int, version: int) -> None:
        """Connect from the client's own address (IP_TRANSPARENT, bound before connect)."""
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            set_transparent(sock, family)
            sock.bind((str(self.client[0]), 0))
            await self._loop.sock_connect(sock, (host, port))
            await self._loop.create_connection(lambda: self._backend_side, sock=sock)
        except BaseException:
            if self._backend_side.transport is None:
                sock.close()
            raise

    def _start_relay(self) -> None:
        self.phase = Phase.RELAYING
        header = self._proxy_header()
        if header:
            self._backend_side.write(header)
        if self._buffered:
            self._count(len(self._buffered))
            self._backend_side.write(bytes(self._buffered))
            self._buffered.clear()
        if self._client_side.eof:
            self._backend_side.write_eof()
        else:
            self._client_side.resume_reading()
        self._arm_idle_timer()

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

    def _on_preamble(self, data: bytes) -> None:
        if self._inbound_header is not None:
            header = self._inbound_header.feed(data)
            if header is proxy_protocol.NEED_MORE:
                return
            assert isinstance(header, proxy_protocol.ProxyHeader)
            if header.addresses is not None:
                self.client = (header.addresses.src, header.addresses.src_port)
            data = self._inbound_header.rest
            self._inbound_header = None
            if not self.runtime.allows(self.client[0]):
                self.runtime.drops["not_allowed"] += 1
                self._decide(refuse=True)
                return
        self._buffered += data
        if self._peeker is None:
            self._decide(refuse=False)
            return
        if not data:
            return
        try:
            found = self._peeker.feed(data)
        except sni.NotTlsError:
            found = sni.Found(server_name=None)  # plain bytes: routed as "no SNI"
        if found is sni.NEED_MORE:
            return
        assert isinstance(found, sni.Found)
        self._server_name = found.server_name
        self._peeker = None
        self._decide(refuse=False)

    def _decide(self, *, refuse: bool) -> None:
        self._refuse = refuse
        self._client_side.pause_reading()
        if not self._decided.done():
            self._decided.set_result(None)

    def _fail_preamble(self, exc: Exception) -> None:
        self._client_side.pause_reading()
        if not self._decided.done():
            self._decided.set_exception(exc)

    # ------------------------------------------------------------ relay events

    def on_data(self, side: _Side, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if side.is_client:
            if self.phase is Phase.PREAMBLE and not self._decided.done():
                try:
                    self._on_preamble(data)
                except (sni.SniError, proxy_protocol.ProxyProtocolError) as e:
                    self._fail_preamble(e)
            elif self.phase is Phase.RELAYING:
                self._count(len(data))
                self._backend_side.write(data)
            else:
                self._buffered += data  # read before pause_reading took effect
        else:
            self._count(len(data))
            self._client_side.write(data)

    def on_eof(self, side: _Side) -> None:
        if side.is_client and self.phase is Phase.PREAMBLE and not self._decided.done():
            self._decide(refuse=True)  # gone before it said enough to route
            return
        if self.phase is not Phase.RELAYING:
            return  # the relay start passes a client EOF on
        other = self._backend_side if side.is_client else self._client_side
        other.write_eof()
        if self._client_side.eof and self._backend_side.eof:
            self._client_side.close(reset=False)
            self._backend_side.close(reset=False)

    def on_lost(self, side: _Side, exc: Exception | None) -> None:
        reset = isinstance(exc, OSError)
        if self.phase is Phase.RELAYING:
            other = self._backend_side if side.is_client else self._client_side
            other.close(reset=reset)
        else:
            self.close(reset=reset)  # gone before the relay started: abandon the setup
        self._finish()

    def on_pressure(self, side: _Side, *, paused: bool) -> None:
        other = self._backend_side if side.is_client else self._client_side
        if paused:
            other.pause_reading()
        elif self.phase is Phase.RELAYING:
            other.resume_reading()

    # ------------------------------------------------------------ bookkeeping

    def _count(self, size: int) -> None:
        if self._backend is not None:
            self.runtime.count_transfer(self._backend.key, size)

    def _arm_idle_timer(self) -> None:
        deadline = self._last_activity + self.runtime.options.idle_timeout
        self._idle_timer = self._loop.call_at(deadline, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        # Rearmed from the last activity rather than on every read: one timer
        # per relay, no per-read timer churn.
        if self.phase is Phase.CLOSED:
            return
        if self._loop.time() >= self._last_activity + self.runtime.options.idle_timeout:
            self.close(reset=False)
        else:
            self._arm_idle_timer()

    def _finish(self) -> None:
        """Account the relay as closed; `done` once both sockets are gone."""
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self.runtime.flow_closed(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        client_gone = self._client_side.transport is None or self._client_side.lost
        backend_gone = self._backend_side.transport is None or self._backend_side.lost
        if client_gone and backend_gone and not self.done.done():
            self.done.set_result(None)
            if self.task is None or self.task.done():
                # No socket calls back any more, and no setup can make one:
                # without these cycles the relay is freed at once, not by the
                # cyclic GC (~10 % of the CPU a connection costs).
                self._client_side.detach()
                self._backend_side.detach()
