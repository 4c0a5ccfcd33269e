"""The validated configuration as immutable values.

Everything here is pure data: the config loader builds it, the hashing core and
the desired state read it, drivers render it. Nothing in this module does I/O.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Mode(enum.StrEnum):
    DSR = "dsr"
    NAT = "nat"
    PROXY = "proxy"


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"
    TCP_UDP = "tcp+udp"

    @property
    def transports(self) -> tuple[str, ...]:
        """The L4 protocols this setting covers, as nftables names them."""
        return ("tcp", "udp") if self is Protocol.TCP_UDP else (self.value,)


class Affinity(enum.StrEnum):
    """Which fields of a flow pick its backend (as the cloud NLBs name them)."""

    FIVE_TUPLE = "5-tuple"
    CLIENT_IP_PROTO = "client-ip-proto"
    CLIENT_IP = "client-ip"


class AdminState(enum.StrEnum):
    ENABLED = "enabled"
    DRAIN = "drain"  # no new flows; existing ones run until idle or drain_timeout
    DISABLED = "disabled"  # no new flows; existing ones are removed at once


class PersistOnUnhealthy(enum.StrEnum):
    """What happens to established flows on a backend that turns unhealthy."""

    DEFAULT = "default"  # TCP flows persist, UDP flows move (connectionless)
    NEVER = "never"
    ALWAYS = "always"


class AllUnhealthy(enum.StrEnum):
    FAIL_OPEN = "fail-open"  # every enabled backend serves, as cloud NLBs do
    DROP = "drop"


class HealthType(enum.StrEnum):
    TCP = "tcp"
    HTTP = "http"
    HTTPS = "https"
    UDP = "udp"
    TLS = "tls"
    EXEC = "exec"
    NONE = "none"


class ProxyProtocol(enum.StrEnum):
    NONE = "none"
    V1 = "v1"
    V2 = "v2"


class Balance(enum.StrEnum):
    """Backend choice; only the proxy mode offers more than the Maglev ring."""

    MAGLEV = "maglev"
    ROUND_ROBIN = "round-robin"
    LEAST_CONN = "least-conn"


class SniFallback(enum.StrEnum):
    DEFAULT_POOL = "default-pool"
    CLOSE = "close"


class Refusal(enum.StrEnum):
    """What traffic a service refuses gets (a denied client, a limit reached)."""

    DROP = "drop"  # silently: the client learns nothing and retries until it gives up
    REJECT = "reject"  # TCP reset, or ICMP administratively prohibited for UDP


class Announce(enum.StrEnum):
    """When a service keeps its VIP announced over BGP (``[bgp]``)."""

    WHEN_SERVING = "when-serving"  # while its ring has a backend for new flows
    ALWAYS = "always"  # even with no backend (new flows then drop on this node)
    NEVER = "never"  # the service never keeps its VIP announced


class Speaker(enum.StrEnum):
    """The BGP speaker passlb drives (passlb does not speak BGP itself)."""

    BIRD = "bird"  # BIRD 2 (Debian: bird2)


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


DEFAULT_POOL = "default"
DEFAULT_RING_SIZE = 65537
# A backend's weight: the config, the admin API and `passlb weight` take these
# bounds (the ring gives each backend slots in proportion to it).
MIN_WEIGHT, MAX_WEIGHT = 1, 65535


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class PortSet:
    """The service ports: sorted, non-overlapping ranges, or every port."""

    ranges: tuple[PortRange, ...] = ()
    all_ports: bool = False

    def __contains__(self, port: object) -> bool:
        if not isinstance(port, int) or not 0 < port < 65536:
            return False
        return self.all_ports or any(port in r for r in self.ranges)

    def overlaps(self, other: PortSet) -> bool:
        if self.all_ports or other.all_ports:
            return True
        return any(
            a.first <= b.last and b.first <= a.last for a in self.ranges for b in other.ranges
        )

    @property
    def is_single(self) -> bool:
        return (
            not self.all_ports
            and len(self.ranges) == 1
            and self.ranges[0].first == self.ranges[0].last
        )

    def __str__(self) -> str:
        return "all" if self.all_ports else ",".join(str(r) for r in self.ranges)


@dataclass(frozen=True)
class HealthSpec:
    type: HealthType = HealthType.TCP
    port: int | None = None  # None: the backend's port (or the service port)
    interval: float = 2.0  # seconds
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    # http / https
    method: str = "GET"
    path: str = "/"
    host: str | None = None
    expect_status: tuple[int, ...] = (200,)
    body_match: str | None = None
    verify_tls: bool = False
    ca_file: str | None = None  # PEM bundle to verify against (None: system store)
    server_name: str | None = None  # SNI for https / tls checks
    # udp
    request: bytes | None = None
    expect: bytes | None = None
    # exec
    command: tuple[str, ...] = ()
    # dsr: probe the backend's own address (default) or the VIP through it
    probe_vip: bool = False
    # Recovered backends ramp up to full weight over this many seconds (0: at once).
    slow_start: float = 0.0


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    port: int | None = None  # nat / proxy only
    weight: int = 1
    backup: bool = False
    admin: AdminState = AdminState.ENABLED
    pool: str = DEFAULT_POOL  # proxy SNI routing picks a pool by server name
    health: HealthSpec | None = None  # overrides the service's check
    max_connections: int | None = None  # nat: concurrent flows; new ones beyond are refused

    @functools.cached_property  # hot: every apply and diff looks backends up by key
    def key(self) -> str:
        """The stable identity of a backend within its service.

        Frozen format, never to change: it feeds the Maglev permutation, so every
        passlb node (and every version) must derive the same key from the same
        config. "198.18.2.11", "198.18.2.11:8080", "[2001:db8::1]:8080".
        """
        if self.port is None:
            return str(self.address)
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ConnTracking:
    tcp_timeout: float = 300.0  # idle seconds before a TCP flow is forgotten
    udp_timeout: float = 30.0
    persist_on_unhealthy: PersistOnUnhealthy = PersistOnUnhealthy.DEFAULT
    flow_table_size: int = 1_048_576
    # dsr: a TCP flow that has sent only its SYN is kept this long; its first packet
    # after the handshake extends it to tcp_timeout. Equal to tcp_timeout: no protection.
    syn_timeout: float = 5.0


@dataclass(frozen=True)
class ClientRules:
    """Who may reach a service, and what the others get."""

    allow: tuple[IPNetwork, ...] = ()  # empty: every client not denied
    deny: tuple[IPNetwork, ...] = ()  # wins over allow
    refuse: Refusal = Refusal.DROP

    @property
    def any(self) -> bool:
        return bool(self.allow or self.deny)

    def allows(self, client: IPAddress) -> bool:
        if any(client in network for network in self.deny):
            return False
        return not self.allow or any(client in network for network in self.allow)


@dataclass(frozen=True)
class Limits:
    """Kernel-enforced limits of a dsr or nat service; None: no limit."""

    client_new_flow_rate: int | None = None  # new flows per second from one client address
    new_flow_rate: int | None = None  # new flows per second to the whole service
    client_max_flows: int | None = None  # nat: concurrent flows of one client address
    max_flows: int | None = None  # nat: concurrent flows of the whole service


@dataclass(frozen=True)
class SniRoute:
    server_names: tuple[str, ...]  # exact "a.example.com" or wildcard "*.example.com"
    pool: str


@dataclass(frozen=True)
class ProxyOptions:
    proxy_protocol: ProxyProtocol = ProxyProtocol.NONE
    transparent: bool = False  # IP_TRANSPARENT: needs root and policy routing
    balance: Balance = Balance.MAGLEV
    sni_routes: tuple[SniRoute, ...] = ()
    sni_fallback: SniFallback = SniFallback.DEFAULT_POOL
    sni_timeout: float = 5.0
    max_connections: int | None = None
    max_connections_per_backend: int | None = None
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_udp_sessions: int = 65536
    trust_inbound_proxy_protocol: bool = False


@dataclass(frozen=True)
class Service:
    name: str
    vip: IPAddress
    protocol: Protocol
    ports: PortSet
    mode: Mode
    backends: tuple[Backend, ...]
    health: HealthSpec = field(default_factory=HealthSpec)
    affinity: Affinity = Affinity.FIVE_TUPLE
    target_port: int | None = None  # nat / proxy: VIP port -> this port (single-port services)
    conntrack: ConnTracking = field(default_factory=ConnTracking)
    drain_timeout: float = 30.0
    all_unhealthy: AllUnhealthy = AllUnhealthy.FAIL_OPEN
    failover_ratio: float = 0.0
    ring_size: int = DEFAULT_RING_SIZE
    hash_seed: int | None = None  # None: derived from the service name (see hashing)
    snat: bool = False  # nat only: masquerade towards backends (client IP is lost)
    # nat only: the kernel's SYN proxy completes TCP handshakes with SYN cookies
    # before conntrack and the backends see the flow.
    syn_proxy: bool = False
    proxy: ProxyOptions | None = None  # proxy only
    clients: ClientRules = field(default_factory=ClientRules)
    limits: Limits = field(default_factory=Limits)
    # Keys the file wrote in a place that still works but will go (for `passlb check`).
    deprecations: tuple[str, ...] = ()
    announce: Announce = Announce.WHEN_SERVING  # with [bgp]: when its VIP is announced

    def backend(self, key: str) -> Backend | None:
        return next((b for b in self.backends if b.key == key), None)


@dataclass(frozen=True)
class ApiSettings:
    listen: str = "127.0.0.1:9180"  # host:port, or unix:/path
    token: str | None = None
    # With a token: reads (status, events, history, flows, /metrics) need none;
    # changes still do. For a read-only status page on a wall screen.
    read_without_token: bool = False


@dataclass(frozen=True)
class ProxySettings:
    """How the proxy mode runs: settings for every proxy service at once."""

    workers: int | None = 1  # relay processes; 1: in the daemon itself; None: one per CPU


DEFAULT_HOLD_TIME = 90.0  # seconds (RFC 4271, section 10, suggests 90)


@dataclass(frozen=True)
class BgpPeer:
    address: IPAddress
    asn: int
    hold_time: float = DEFAULT_HOLD_TIME  # whole seconds, 0 (no keepalives) or 3..65535
    bfd: bool = False  # fast failure detection (the router must run BFD too)
    password: str | None = None  # TCP MD5 signature (RFC 2385)


@dataclass(frozen=True)
class Community:
    """A standard BGP community, "asn:value" (RFC 1997)."""

    asn: int
    value: int

    def __str__(self) -> str:
        return f"{self.asn}:{self.value}"


@dataclass(frozen=True)
class BgpSettings:
    """Announcing the VIPs to routers through a supervised BGP speaker."""

    asn: int
    router_id: IPv4Address
    peers: tuple[BgpPeer, ...]
    speaker: Speaker = Speaker.BIRD
    # At most one per family; none for a family: the session's own address.
    next_hops: tuple[IPAddress, ...] = ()
    communities: tuple[Community, ...] = ()
    run_dir: str = "/run/passlb/bgp"  # the speaker's config, control socket and pid file

    def next_hop(self, version: int) -> IPAddress | None:
        return next((a for a in self.next_hops if a.version == version), None)


@dataclass(frozen=True)
class Config:
    services: tuple[Service, ...]
    interfaces: tuple[str, ...] = ()  # empty: auto-detect at start
    api: ApiSettings = field(default_factory=ApiSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    log_level: str = "info"
    log_format: LogFormat = LogFormat.TEXT
    bgp: BgpSettings | None = None  # None: no VIP is announced (static routes, or one node)

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)
