"""One service as the proxy runs it: its current desired state, its flows, its counters.

Listeners and flows hold a ServiceRuntime; a sync swaps what it holds
(`update`) without touching the flows, so a new ring or pool only steers new
flows.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Protocol

from passlb.dataplane.base import BackendCounters, Flow, ServiceCounters
from passlb.dataplane.proxy.picker import BackendPicker
from passlb.dataplane.proxy.sni import SniRouter
from passlb.hashing.flowkey import L4PROTO, ring_slot
from passlb.model import IPAddress, ProxyOptions, Service
from passlb.state import BackendDesired, ServiceDesired


class FlowHandle(Protocol):
    """A TCP relay or a UDP session, as the driver manages it."""

    @property
    def backend_key(self) -> str | None: ...  # None until a backend is chosen

    @property
    def vip_port(self) -> int: ...

    def describe(self) -> Flow | None: ...  # None until a backend is chosen

    def close(self, *, reset: bool) -> None: ...


@dataclass
class BackendStats:
    packets: int = 0  # reads, both directions
    bytes: int = 0  # both directions
    new_flows: int = 0
    active: int = 0

    def frozen(self) -> BackendCounters:
        return BackendCounters(
            packets=self.packets,
            bytes=self.bytes,
            new_flows=self.new_flows,
            active_flows=self.active,
        )


class ServiceRuntime:
    def __init__(self, desired: ServiceDesired) -> None:
        self.stats: dict[str, BackendStats] = {}
        self.flows: set[FlowHandle] = set()
        self.drops: Counter[str] = Counter()  # reason -> flows or datagrams refused
        self.update(desired)

    def update(self, desired: ServiceDesired) -> None:
        self.desired = desired
        self.service: Service = desired.service
        self.options: ProxyOptions = desired.service.proxy or ProxyOptions()
        self.picker = BackendPicker(
            desired, self.options.balance, limit=self.options.max_connections_per_backend
        )
        self.router = (
            SniRouter(self.options.sni_routes, self.options.sni_fallback)
            if self.options.sni_routes
            else None
        )
        for backend in desired.backends:
            self.stats.setdefault(backend.key, BackendStats())
        self._sockaddrs: dict[tuple[str, int], tuple[str, int]] = {}

    @property
    def name(self) -> str:
        return self.service.name

    def allows(self, client: IPAddress) -> bool:
        return self.service.clients.allows(client)

    def at_capacity(self) -> bool:
        limit = self.options.max_connections
        return limit is not None and len(self.flows) >= limit

    def load(self, key: str) -> int:
        stats = self.stats.get(key)
        return stats.active if stats is not None else 0

    def choose(
        self,
        pool: str | None,
        client: tuple[IPAddress, int],
        vip: tuple[IPAddress, int],
        transport: str,
    ) -> BackendDesired | None:
        slot = None
        if self.picker.uses_ring and self.picker.ring_size:
            slot = _flow_slot(self, client, vip, transport)
        elif self.picker.uses_ring:
            return None  # no ring: the desired state drops new flows
        return self.picker.pick(pool, slot, self.load)

    def backend_port(self, backend: BackendDesired, vip_port: int) -> int:
        return backend.port or self.service.target_port or vip_port

    def backend_sockaddr(self, backend: BackendDesired, vip_port: int) -> tuple[str, int]:
        """(host, port) to connect to; kept until the next update, not formatted per flow."""
        key = (backend.key, vip_port)
        sockaddr = self._sockaddrs.get(key)
        if sockaddr is None:
            sockaddr = (str(backend.address), self.backend_port(backend, vip_port))
            self._sockaddrs[key] = sockaddr
        return sockaddr

    def flow_opened(self, flow: FlowHandle, backend_key: str) -> BackendStats:
        """Count a new flow; its backend's stats, for the flow to count its transfers."""
        stats = self.stats.get(backend_key)
        if stats is None:  # not setdefault: no throw-away BackendStats per flow
            stats = self.stats[backend_key] = BackendStats()
        stats.new_flows += 1
        stats.active += 1
        return stats

    def flow_closed(self, flow: FlowHandle) -> None:
        self.flows.discard(flow)
        key = flow.backend_key
        if key is not None and key in self.stats:
            self.stats[key].active -= 1

    def count_transfer(self, backend_key: str, size: int) -> None:
        stats = self.stats[backend_key]
        stats.packets += 1
        stats.bytes += size

    def counters(self) -> ServiceCounters:
        return ServiceCounters(
            backends={k: s.frozen() for k, s in self.stats.items()}, drops=dict(self.drops)
        )


def _flow_slot(
    runtime: ServiceRuntime,
    client: tuple[IPAddress, int],
    vip: tuple[IPAddress, int],
    transport: str,
) -> int:
    vip_ip = vip[0]
    if vip_ip.version != client[0].version:
        # Only a trusted PROXY header can pair an IPv4 client with an IPv6 VIP
        # (or the reverse); the hash needs one family, so the client's stands in.
        vip_ip = client[0]
    return ring_slot(
        runtime.service.affinity,
        runtime.desired.seed,
        runtime.picker.ring_size,
        client[0],
        client[1],
        vip_ip,
        vip[1],
        L4PROTO[transport],
    )


def address_of(sockaddr: tuple[object, ...]) -> tuple[IPAddress, int]:
    """(ip, port) from a socket address tuple (IPv4 or IPv6, scope dropped)."""
    host, port = sockaddr[0], sockaddr[1]
    assert isinstance(host, str) and isinstance(port, int)
    return _parse_ip(host), port


@functools.lru_cache(maxsize=4096)
def _parse_ip(host: str) -> IPAddress:
    # Cached: parsing costs a few microseconds per accepted connection, and
    # the same clients connect again and again.
    ip = ip_address(host.partition("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
