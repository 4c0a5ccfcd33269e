"""The `proxy` data plane driver: userspace TCP/UDP relay on the daemon's event loop.

sync() is synchronous and runs inside the loop: it binds every new listener
socket first (any failure closes them all and raises, leaving the running
proxy as it was), then commits in steps that cannot fail: runtimes updated,
new listeners handed to the loop, removed ones stopped with their TCP
connections given the service's drain_timeout, the flows the state cuts reset
(of cut_flows backends; UDP ones of cut_udp backends; of backends the state no
longer names: a removed backend leaves it only once its drain ended in a cut).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from passlb.dataplane.base import ApplyResult, Flow, ServiceCounters
from passlb.dataplane.proxy.runtime import FlowHandle, ServiceRuntime, address_of
from passlb.dataplane.proxy.tcp import TcpRelay, set_reset_on_close, set_transparent
from passlb.dataplane.proxy.udp import UdpListener, UdpSession
from passlb.errors import DataplaneError
from passlb.model import IPAddress, Mode, ProxyOptions, ProxyProtocol, Service
from passlb.state import DesiredState, ServiceDesired

LISTEN_BACKLOG = 1024
_FlowFilter = Callable[[FlowHandle], bool]
# New listener keys -> their sockets, every one or none (raise DataplaneError).
Binder = Callable[[Mapping["ListenerKey", Service]], dict["ListenerKey", socket.socket]]
_ACCEPT_BATCH = 64  # connections accepted per wake-up, so one listener cannot starve the loop


@dataclass(frozen=True, order=True)
class ListenerKey:
    transport: str  # "tcp" | "udp"
    vip: str
    port: int


class _TcpListener:
    def __init__(
        self, driver: ProxyDriver, runtime: ServiceRuntime, sock: socket.socket, key: ListenerKey
    ) -> None:
        self.driver = driver
        self.runtime = runtime
        self.sock = sock
        self.vip = (address_of((key.vip, key.port))[0], key.port)
        self.loop = driver.loop
        # socket.accept() without its cost: it converts the listener's family and
        # type to enums on every call (README.md, "Connection rate": ~8 µs of 100).
        self._accept = sock._accept  # type: ignore[attr-defined]  # CPython's, as accept() uses
        self._conn_kind = (int(sock.family), int(sock.type), sock.proto)
        self.loop.add_reader(sock.fileno(), self._on_acceptable)

    def _on_acceptable(self) -> None:
        family, kind, proto = self._conn_kind
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, addr = self._accept()
                conn = socket.socket(family, kind, proto, fileno=fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of descriptors or an aborted handshake: the connection
                # stays in the backlog (or is gone); try again on the next wake-up.
                self.runtime.drops["accept_failed"] += 1
                return
            self._admit(conn, address_of(addr))

    def _admit(self, conn: socket.socket, client: tuple[IPAddress, int]) -> None:
        runtime = self.runtime
        options = runtime.options
        # With a trusted inbound PROXY header the peer is a proxy in front of
        # us; the allow-list then applies to the client the header names.
        refusal = None
        if not options.trust_inbound_proxy_protocol and not runtime.allows(client[0]):
            refusal = "not_allowed"
        elif runtime.at_capacity():
            refusal = "max_connections"
        if refusal is not None:
            runtime.drops[refusal] += 1
            set_reset_on_close(conn)
            conn.close()
            return
        conn.setblocking(False)
        relay = TcpRelay(runtime, self.loop, conn, client, self.vip)
        runtime.flows.add(relay)
        relay.start()

    def stop(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class ProxyDriver:
    """Driver protocol implementation for services in `proxy` mode."""

    name = "proxy"
    blocking = False  # on the event loop, microseconds (Driver)

    def __init__(self, *, bind: Binder | None = None) -> None:
        # A relay worker process binds nothing itself: its parent hands it
        # SO_REUSEPORT sockets it bound for each sync (workers.py).
        self._bind = bind or _bind_all
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtimes: dict[str, ServiceRuntime] = {}
        self._retired: list[ServiceRuntime] = []  # removed services whose flows drain
        self._listeners: dict[ListenerKey, _TcpListener | UdpListener] = {}
        self._drain_timers: set[asyncio.TimerHandle] = set()
        self._synced = False
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = running_loop()
        return self._loop

    # ------------------------------------------------------------ sync

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        if self._closed:
            raise DataplaneError("the proxy driver is closed")
        started = time.perf_counter()
        loop = self.loop
        wanted = wanted_listeners(desired)
        new_sockets = self._bind(
            {key: sd.service for key, sd in wanted.items() if key not in self._listeners}
        )
        # Nothing below raises: the change is committed as a whole.
        operations = 0
        wanted_names = {sd.service.name for sd in desired.services}
        for sd in desired.services:
            runtime = self._runtimes.get(sd.service.name)
            if runtime is None:
                self._runtimes[sd.service.name] = ServiceRuntime(sd)
            elif runtime.desired != sd:  # unchanged services keep their pickers
                runtime.update(sd)
        for key in sorted(set(self._listeners) - set(wanted)):
            operations += 1
            listener = self._listeners.pop(key)
            listener.stop()
            if listener.runtime.name in wanted_names:
                operations += self._drain(listener.runtime, _on_port(key.port))
        for name in sorted(set(self._runtimes) - wanted_names):
            runtime = self._runtimes.pop(name)
            operations += self._drain(runtime, lambda f: True)
            self._retired.append(runtime)
        for key, sd in wanted.items():
            runtime = self._runtimes[sd.service.name]
            if key in new_sockets:
                operations += 1
                sock = new_sockets[key]
                vip = (address_of((key.vip, key.port))[0], key.port)
                self._listeners[key] = (
                    _TcpListener(self, runtime, sock, key)
                    if key.transport == "tcp"
                    else UdpListener(loop, runtime, sock, vip)
                )
            else:
                self._listeners[key].runtime = runtime
        for sd in desired.services:
            operations += self._cut(self._runtimes[sd.service.name], sd)
        self._retired = [r for r in self._retired if r.flows]
        result = ApplyResult(
            full=full or not self._synced,
            operations=operations,
            duration=time.perf_counter() - started,
        )
        self._synced = True
        return result

    def _cut(self, runtime: ServiceRuntime, sd: ServiceDesired) -> int:
        named = {b.key for b in sd.backends}
        cut = {b.key for b in sd.backends if b.cut_flows}
        cut |= {k for k, stats in runtime.stats.items() if stats.active and k not in named}
        cut_udp = {b.key for b in sd.backends if b.cut_udp}
        if not (cut or cut_udp):
            return 0  # the common case: no walk over every flow
        doomed = [
            f
            for f in runtime.flows
            if f.backend_key in cut or (f.backend_key in cut_udp and isinstance(f, UdpSession))
        ]
        for flow in doomed:
            flow.close(reset=True)
        return len(doomed)

    def _drain(self, runtime: ServiceRuntime, which: _FlowFilter) -> int:
        """Give the chosen flows drain_timeout to end by themselves, then reset them."""
        flows = [f for f in runtime.flows if which(f)]
        if not flows:
            return 0

        def expire() -> None:
            self._drain_timers.discard(timer)
            for flow in flows:
                flow.close(reset=True)

        timer = self.loop.call_later(runtime.service.drain_timeout, expire)
        self._drain_timers.add(timer)
        return len(flows)

    # ------------------------------------------------------------ reading

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        # Active flows are counted as they come and go: cheap, so always given.
        return {name: runtime.counters() for name, runtime in self._runtimes.items()}

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        found = []
        for runtime in self._all_runtimes():
            if service is not None and runtime.name != service:
                continue
            for handle in list(runtime.flows):
                flow = handle.describe()
                if flow is not None and (backend is None or flow.backend == backend):
                    found.append(flow)
        return found

    def listening(self) -> list[ListenerKey]:
        return sorted(self._listeners)

    # ------------------------------------------------------------ teardown

    def close(self, *, cleanup: bool = False) -> None:
        """Stop listening and reset every connection now.

        `cleanup` changes nothing here: a userspace proxy leaves no state behind.
        Call from inside the loop. Every socket and pipe is closed on return:
        relays and sessions are callbacks on the loop, with no task to wait for.
        """
        self._closed = True
        for listener in self._listeners.values():
            listener.stop()
        self._listeners.clear()
        for timer in self._drain_timers:
            timer.cancel()
        self._drain_timers.clear()
        for runtime in self._all_runtimes():
            for flow in list(runtime.flows):
                flow.close(reset=True)
        self._retired.clear()

    async def aclose(self) -> None:
        """close(), for callers that hold the driver in an async context."""
        self.close()

    def _all_runtimes(self) -> Iterator[ServiceRuntime]:
        yield from self._runtimes.values()
        yield from self._retired


def running_loop() -> asyncio.AbstractEventLoop:
    """The loop a proxy driver lives on: the one running its first call."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError as e:
        raise DataplaneError("the proxy driver runs inside an asyncio event loop") from e


def _on_port(port: int) -> _FlowFilter:
    return lambda flow: flow.vip_port == port


def wanted_listeners(desired: DesiredState) -> dict[ListenerKey, ServiceDesired]:
    """Every listener the desired state needs; DataplaneError for what proxy cannot serve."""
    wanted: dict[ListenerKey, ServiceDesired] = {}
    for sd in desired.services:
        service = sd.service
        _check_supported(service)
        for transport in service.protocol.transports:
            for port in _ports(service):
                key = ListenerKey(transport, str(service.vip), port)
                other = wanted.get(key)
                if other is not None:
                    raise DataplaneError(
                        f"services {other.service.name} and {service.name} both listen on "
                        f"{transport} {service.vip}:{port}"
                    )
                wanted[key] = sd
    return wanted


def _check_supported(service: Service) -> None:
    where = f"service {service.name}"
    if service.mode is not Mode.PROXY:
        raise DataplaneError(f"{where}: mode {service.mode} is not served by the proxy driver")
    if service.ports.all_ports:
        raise DataplaneError(f"{where}: ports = all is not supported in proxy mode")
    options = service.proxy or ProxyOptions()
    if options.proxy_protocol is ProxyProtocol.V1 and "udp" in service.protocol.transports:
        raise DataplaneError(f"{where}: PROXY protocol v1 has no UDP form; use v2")


def _ports(service: Service) -> Iterator[int]:
    for port_range in service.ports.ranges:
        yield from range(port_range.first, port_range.last + 1)


def _bind_all(wanted: Mapping[ListenerKey, Service]) -> dict[ListenerKey, socket.socket]:
    """Bind every listener or none: on the first failure, close what was bound."""
    bound: dict[ListenerKey, socket.socket] = {}
    try:
        for key, service in sorted(wanted.items()):
            bound[key] = bind_listener(key, service)
    except OSError as e:
        for sock in bound.values():
            sock.close()
        raise listen_error(key, service, e) from e
    return bound


def listen_error(key: ListenerKey, service: Service, error: OSError) -> DataplaneError:
    return DataplaneError(
        f"service {service.name}: cannot listen on {key.transport} "
        f"{service.vip}:{key.port}: {error.strerror or error}"
    )


def bind_listener(
    key: ListenerKey, service: Service, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """The listening socket of one key; `reuse_port` for one of several relay workers'
    sockets on the same key, `listen=False` to probe whether the address is free."""
    family = socket.AF_INET6 if service.vip.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if key.transport == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            # Lets a restarted daemon rebind past TIME_WAIT; Linux still refuses
            # a second TCP listener on the same address, so conflicts surface.
            # (Not for UDP: there it would let two sockets share the port.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if service.proxy is not None and service.proxy.transparent:
            set_transparent(sock, family)
        sock.bind((key.vip, key.port))
        if not listen:
            return sock
        if kind == socket.SOCK_STREAM:
            # Accepted sockets inherit it (Linux copies the listener's TCP
            # options): one setsockopt per connection saved. See tcp.py.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
