"""UDP relay: one session per client address and port, one connected socket per session.

Datagrams from a client go out of its session's socket to the backend chosen
when the session began; replies come back in on that socket and leave from
the VIP socket, so the client sees the VIP answer. A session ends after the
service's conntrack.udp_timeout without traffic. The session table is bounded
by max_udp_sessions: when full, datagrams that would open a new session are
dropped and counted. With PROXY protocol v2 every datagram carries the header
(a datagram may be lost or reordered, so none can be "the first").

Sockets are driven by add_reader callbacks rather than transports: a
datagram is a complete message, so there is nothing to buffer, and sockets
bound synchronously in sync() start serving without awaiting anything.
"""

from __future__ import annotations

import asyncio
import socket

from passlb.dataplane.base import Flow
from passlb.dataplane.proxy import proxy_protocol
from passlb.dataplane.proxy.runtime import ServiceRuntime, address_of
from passlb.dataplane.proxy.tcp import set_transparent
from passlb.model import IPAddress, ProxyProtocol
from passlb.state import BackendDesired

MAX_DATAGRAM = 65535
_BATCH = 64  # datagrams read per wake-up, so one busy socket cannot starve the loop


class UdpSession:
    def __init__(
        self,
        listener: UdpListener,
        client_addr: tuple[object, ...],
        client: tuple[IPAddress, int],
        backend: BackendDesired,
        sock: socket.socket,
    ) -> None:
        self.listener = listener
        self.runtime = listener.runtime
        self.client_addr = client_addr  # as the socket reports it, for sendto
        self.client = client
        self.backend = backend
        self._sock = sock
        self._loop = listener.loop
        self._last_activity = self._loop.time()
        self._header = b""
        vip = listener.vip
        if (
            self.runtime.options.proxy_protocol is ProxyProtocol.V2
            and client[0].version == vip[0].version
        ):
            self._header = proxy_protocol.encode_v2(
                client[0], client[1], vip[0], vip[1], proxy_protocol.Transport.UDP
            )
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._timer = self._loop.call_at(self._deadline(), self._on_timer)

    @property
    def backend_key(self) -> str | None:
        return self.backend.key

    @property
    def vip_port(self) -> int:
        return self.listener.vip[1]

    def describe(self) -> Flow:
        return Flow(
            service=self.runtime.name,
            backend=self.backend.key,
            protocol="udp",
            src=self.client[0],
            src_port=self.client[1],
            dst=self.listener.vip[0],
            dst_port=self.listener.vip[1],
            expires_in=max(0.0, self._deadline() - self._loop.time()),
        )

    def send(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self.runtime.count_transfer(self.backend.key, len(data))
        try:
            self._sock.send(self._header + data if self._header else data)
        except (BlockingIOError, ConnectionRefusedError):
            # Full socket buffer, or the ICMP error of an earlier datagram:
            # UDP may drop, the client retries as it would on any path.
            self.runtime.drops["udp_send_failed"] += 1

    def _on_readable(self) -> None:
        for _ in range(_BATCH):
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                continue  # the backend's port is closed; keep the session for its timeout
            self._last_activity = self._loop.time()
            self.runtime.count_transfer(self.backend.key, len(data))
            self.listener.reply(data, self.client_addr)

    def _deadline(self) -> float:
        return self._last_activity + self.runtime.service.conntrack.udp_timeout

    def _on_timer(self) -> None:
        if self._loop.time() >= self._deadline():
            self.close(reset=False)
        else:
            self._timer = self._loop.call_at(self._deadline(), self._on_timer)

    def close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self.listener.session_closed(self)


class UdpListener:
    """The VIP socket of one UDP port and the sessions behind it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        runtime: ServiceRuntime,
        sock: socket.socket,
        vip: tuple[IPAddress, int],
    ) -> None:
        self.loop = loop
        self.runtime = runtime
        self.vip = vip
        self._sock = sock
        self.sessions: dict[tuple[object, ...], UdpSession] = {}
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(_BATCH):
            try:
                data, addr = self._sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error queued on the VIP socket; the next datagram counts
            session = self.sessions.get(addr) or self._open_session(addr)
            if session is not None:
                session.send(data)

    def _open_session(self, addr: tuple[object, ...]) -> UdpSession | None:
        runtime = self.runtime
        client = address_of(addr)
        if not runtime.allows(client[0]):
            runtime.drops["not_allowed"] += 1
            return None
        if len(self.sessions) >= runtime.options.max_udp_sessions or runtime.at_capacity():
            runtime.drops["udp_sessions_full"] += 1
            return None
        backend = runtime.choose(None, client, self.vip, "udp")
        if backend is None:
            runtime.drops["no_backend"] += 1
            return None
        family = socket.AF_INET6 if backend.address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if runtime.options.transparent:
                set_transparent(sock, family)
                sock.bind((str(client[0]), 0))
            sock.connect((str(backend.address), runtime.backend_port(backend, self.vip[1])))
        except OSError:
            sock.close()
            runtime.drops["backend_unreachable"] += 1
            return None
        session = UdpSession(self, addr, client, backend, sock)
        self.sessions[addr] = session
        runtime.flows.add(session)
        runtime.flow_opened(session, backend.key)
        return session

    def reply(self, data: bytes, addr: tuple[object, ...]) -> None:
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, ConnectionRefusedError):
            self.runtime.drops["udp_reply_failed"] += 1

    def session_closed(self, session: UdpSession) -> None:
        if self.sessions.get(session.client_addr) is session:
            del self.sessions[session.client_addr]
        self.runtime.flow_closed(session)

    def stop(self) -> None:
        """Stop serving: end every session and close the VIP socket."""
        for session in list(self.sessions.values()):
            session.close(reset=False)
        self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
