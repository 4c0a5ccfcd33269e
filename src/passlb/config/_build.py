"""Raw TOML tables -> model values, recording every problem on the way.

Each builder reads one table, reports what is wrong with it at the exact field
path and returns the model value it could build (None when a required part is
missing). The caller turns a non-empty issue list into one ConfigError, so a
half-built object never leaves this package.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from passlb.config import _values as values
from passlb.config._bgp import build_bgp
from passlb.config._lines import FieldPath
from passlb.config._reader import (
    Issues,
    Parser,
    Table,
    boolean,
    choice,
    duration,
    format_duration,
    integer,
    number,
    text,
)
from passlb.hashing.maglev import MAX_BACKENDS
from passlb.health.target import missing_probe_port
from passlb.model import (
    DEFAULT_POOL,
    DEFAULT_RING_SIZE,
    MAX_WEIGHT,
    MIN_WEIGHT,
    AdminState,
    Affinity,
    AllUnhealthy,
    Announce,
    ApiSettings,
    Backend,
    Balance,
    ClientRules,
    Config,
    ConnTracking,
    HealthSpec,
    HealthType,
    IPAddress,
    IPNetwork,
    Limits,
    LogFormat,
    Mode,
    PersistOnUnhealthy,
    PortSet,
    Protocol,
    ProxyOptions,
    ProxyProtocol,
    ProxySettings,
    Refusal,
    Service,
    SniFallback,
    SniRoute,
)


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


# The largest ring the nft maps are sized for; 16777213 is the largest prime below it.
MAX_RING_SIZE = 1 << 24
# Maglev paper (Eisenbud et al., NSDI 2016), section 3.4: a table size M with
# M > 100 * N keeps each backend's share of slots within about 1% of its ideal.
RING_SLOTS_PER_BACKEND = 100
_MANY = 10_000_000

TOP_KEYS = ("interfaces", "api", "log", "proxy", "services", "bgp")
API_KEYS = ("listen", "token", "read_without_token")
PROXY_SETTINGS_KEYS = ("workers",)
LOG_KEYS = ("level", "format")
SERVICE_KEYS = (
    "name", "vip", "protocol", "ports", "mode", "affinity", "target_port", "ring_size",
    "hash_seed", "drain_timeout", "all_unhealthy", "failover_ratio", "snat", "proxy_protocol",
    "conntrack", "health", "proxy", "backends", "allow_clients", "deny_clients", "refuse",
    "limits", "syn_proxy", "announce",
)  # fmt: skip
CONNTRACK_KEYS = (
    "tcp_timeout", "udp_timeout", "persist_on_unhealthy", "flow_table_size", "syn_timeout",
)  # fmt: skip
LIMITS_KEYS = ("client_new_flow_rate", "new_flow_rate", "client_max_flows", "max_flows")
# The largest rate nft's limit statement takes per second without overflowing its
# token bucket arithmetic in a useful way; far above what one host forwards.
MAX_FLOW_RATE = 100_000_000
BACKEND_KEYS = (
    "address", "port", "weight", "backup", "state", "pool", "health", "max_connections",
)  # fmt: skip
PROXY_KEYS = (
    "proxy_protocol", "transparent", "balance", "sni_routes", "sni_fallback", "sni_timeout",
    "max_connections", "max_connections_per_backend", "connect_timeout", "idle_timeout",
    "max_udp_sessions", "trust_inbound_proxy_protocol", "allow_clients",
)  # fmt: skip
SNI_ROUTE_KEYS = ("server_names", "pool")

_HTTP = (HealthType.HTTP, HealthType.HTTPS)
_TLS = (HealthType.HTTPS, HealthType.TLS)
# Fields every check type (but none) takes, and the fields of one kind of check.
HEALTH_COMMON: Mapping[str, Parser[object]] = {
    "port": values.port,
    "interval": duration(),
    "timeout": duration(),
    "rise": integer(1, 100),
    "fall": integer(1, 100),
    "probe_vip": boolean,
    "slow_start": duration(allow_zero=True),
}
HEALTH_SPECIFIC: Mapping[str, tuple[Parser[object], tuple[HealthType, ...]]] = {
    "method": (values.http_method, _HTTP),
    "path": (values.http_path, _HTTP),
    "host": (values.host_name, _HTTP),
    "expect_status": (values.status_codes, _HTTP),
    "body_match": (text, _HTTP),
    "verify_tls": (boolean, _TLS),
    "ca_file": (text, _TLS),
    "server_name": (values.dns_name, _TLS),
    "request": (values.utf8_bytes, (HealthType.UDP,)),
    "request_hex": (values.hex_bytes, (HealthType.UDP,)),
    "expect": (values.utf8_bytes, (HealthType.UDP,)),
    "expect_hex": (values.hex_bytes, (HealthType.UDP,)),
    "command": (values.command, (HealthType.EXEC,)),
}
HEALTH_KEYS = ("type", *HEALTH_COMMON, *HEALTH_SPECIFIC)
# The _hex spellings fill the same HealthSpec field as the text ones.
_HEALTH_FIELD = {"request_hex": "request", "expect_hex": "expect"}

ServiceNames = dict[int, str]  # index in the file -> its valid name

_NEEDS_SINGLE_PORT = "needs a single service port; with a range or 'all' each port is kept"


def build_config(top: Table, names: ServiceNames) -> Config:
    top.check_keys(TOP_KEYS)
    interfaces: list[str] = []
    for position, name in top.each("interfaces", values.interface, non_empty=False) or []:
        if name in interfaces:
            top.issues.add(("interfaces", position), f"{name!r} is listed twice")
        interfaces.append(name)
    api = _api(top.table("api"))
    proxy = _proxy_settings(top.table("proxy"))
    log = top.table("log")
    level, log_format = LogLevel.INFO, LogFormat.TEXT
    if log is not None:
        log.check_keys(LOG_KEYS)
        level = log.get("level", choice(LogLevel), level)
        log_format = log.get("format", choice(LogFormat), log_format)
    services: list[tuple[int, Service]] = []
    for index, table in top.tables("services", "services") or []:
        service = _service(table, index, names)
        if service is not None:
            services.append((index, service))
    _check_names(top.issues, names)
    _check_overlaps(top.issues, services, display_names(names))
    bgp = build_bgp(top.table("bgp"), services)
    return Config(
        services=tuple(service for _, service in services),
        interfaces=tuple(interfaces),
        api=api,
        proxy=proxy,
        log_level=level.value,
        log_format=log_format,
        bgp=bgp,
    )


def display_names(names: ServiceNames) -> dict[int, str]:
    """The names usable in paths: valid and unique (else the index is shown)."""
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {index: name for index, name in names.items() if counts[name] == 1}


def service_label(index: int, shown: Mapping[int, str]) -> str:
    return f"services[{shown.get(index, index)}]"


def _api(table: Table | None) -> ApiSettings:
    if table is None:
        return ApiSettings()
    table.check_keys(API_KEYS)
    listen = table.get("listen", values.listen_address, ApiSettings.listen)
    token = table.optional("token", text)
    if token is None and not table.has("token") and not values.is_local_listen(listen):
        table.problem(
            "token",
            f"required when api.listen ({listen}) is reachable from other machines"
            " (not loopback or a unix socket)",
        )
    read_without_token = table.get("read_without_token", boolean, False)
    return ApiSettings(listen=listen, token=token, read_without_token=read_without_token)


def _proxy_settings(table: Table | None) -> ProxySettings:
    if table is None:
        return ProxySettings()
    table.check_keys(PROXY_SETTINGS_KEYS)
    if not table.has("workers"):
        return ProxySettings()
    workers = table.optional("workers", values.proxy_workers)
    return ProxySettings(workers=workers)


def _only_for(table: Table, key: str, modes: Sequence[Mode], mode: Mode | None) -> bool:
    """Report key when the service's mode has no use for it; True when it may stay."""
    if not table.has(key) or mode is None or mode in modes:
        return True
    wanted = " or ".join(m.value for m in modes)
    table.problem(key, f"only for mode {wanted}; this service is mode {mode.value}")
    return False


def _service(table: Table, index: int, names: ServiceNames) -> Service | None:
    table.check_keys(SERVICE_KEYS)
    name = table.required("name", values.name)
    if name is not None:
        names[index] = name
    vip = table.required("vip", values.ip_address)
    protocol = table.get("protocol", choice(Protocol), Protocol.TCP)
    ports = table.required("ports", values.port_set)
    mode = table.required("mode", choice(Mode))
    if mode is Mode.PROXY and ports is not None and ports.all_ports:
        table.problem("ports", "mode proxy listens on each port; 'all' needs mode dsr or nat")
    single_port = ports is None or ports.is_single

    target_port = None
    if table.has("target_port"):
        if mode is Mode.DSR:
            table.problem(
                "target_port",
                "dsr forwards packets unchanged; target_port needs mode nat or proxy",
            )
        elif not single_port:
            table.problem("target_port", _NEEDS_SINGLE_PORT)
        else:
            target_port = table.optional("target_port", values.port)

    health_table = table.table("health") or Table({}, table.at("health"), table.issues)
    health_fields = _health_fields(health_table, None, mode)
    health = _health_spec(health_table, health_fields)

    raw_backends = table.raw.get("backends")
    if raw_backends is None or raw_backends == []:
        table.problem("backends", "a service needs at least one backend ([[services.backends]])")
    backends: list[tuple[int, Backend]] = []
    for position, backend_table in table.tables("backends", "services.backends") or []:
        backend = _backend(backend_table, mode, single_port, health_fields)
        if backend is not None:
            backends.append((position, backend))
    if vip is not None:
        _check_backends(table, vip, mode, backends)

    backend_count = len(raw_backends) if isinstance(raw_backends, list) else 0
    if backend_count > MAX_BACKENDS:
        table.problem(
            "backends", f"at most {MAX_BACKENDS} backends per service, got {backend_count}"
        )
    ring_size = _ring_size(table, backend_count)

    if _only_for(table, "snat", (Mode.NAT,), mode):
        snat = table.get("snat", boolean, False)
    else:
        snat = False
    syn_proxy = False
    if _only_for(table, "syn_proxy", (Mode.NAT,), mode):
        syn_proxy = table.get("syn_proxy", boolean, False)
        if syn_proxy and protocol is Protocol.UDP:
            table.problem("syn_proxy", "proxies TCP handshakes; this service is protocol udp")
    proxy = None
    if mode is Mode.PROXY:
        proxy_table = table.table("proxy") or Table({}, table.at("proxy"), table.issues)
        proxy = _proxy(proxy_table, table, protocol, backends)
    else:
        _only_for(table, "proxy", (Mode.PROXY,), mode)
        _only_for(table, "proxy_protocol", (Mode.PROXY,), mode)

    conntrack = _conntrack(table.table("conntrack"), mode)
    deprecations: list[str] = []
    clients = _client_rules(table, vip, mode, deprecations)
    limits = _limits(table, mode)
    affinity = table.get("affinity", choice(Affinity), Affinity.FIVE_TUPLE)
    hash_seed = table.optional("hash_seed", integer(0, 2**32 - 1))
    drain_timeout = table.get("drain_timeout", duration(allow_zero=True), 30.0)
    all_unhealthy = table.get("all_unhealthy", choice(AllUnhealthy), AllUnhealthy.FAIL_OPEN)
    failover_ratio = table.get("failover_ratio", number(0.0, 1.0), 0.0)
    announce = table.get("announce", choice(Announce), Announce.WHEN_SERVING)

    if name is None or vip is None or ports is None or mode is None:
        return None
    service = Service(
        name=name,
        vip=vip,
        protocol=protocol,
        ports=ports,
        mode=mode,
        backends=tuple(backend for _, backend in backends),
        health=health,
        affinity=affinity,
        target_port=target_port,
        conntrack=conntrack,
        drain_timeout=drain_timeout,
        all_unhealthy=all_unhealthy,
        failover_ratio=failover_ratio,
        ring_size=ring_size,
        hash_seed=hash_seed,
        snat=snat,
        syn_proxy=syn_proxy,
        proxy=proxy,
        clients=clients,
        limits=limits,
        deprecations=tuple(deprecations),
        announce=announce,
    )
    _check_probe_ports(table, service, backends)
    return service


def _check_probe_ports(
    table: Table, service: Service, backends: Sequence[tuple[int, Backend]]
) -> None:
    """A check that needs a port must find one (health.target.probe_port): the
    daemon's checker uses the same rule, so a file `check` accepts never fails
    at `run` after the kernel has been written."""
    if service.mode is Mode.PROXY:
        return  # listens on named ports only ('all' is refused above)
    reported: set[FieldPath] = set()  # the service's check once, not for every backend
    for position, backend in backends:
        problem = missing_probe_port(service, backend)
        own = backend.health is not None
        where = (*table.at("backends"), position, "health") if own else table.at("health")
        if problem is not None and where not in reported:
            reported.add(where)
            table.issues.add((*where, "port"), problem)


def _ring_size(table: Table, backend_count: int) -> int:
    ring_size = table.get("ring_size", integer(1, MAX_RING_SIZE), DEFAULT_RING_SIZE)
    if not values.is_prime(ring_size):
        table.problem(
            "ring_size",
            f"must be a prime number, got {ring_size}; the next prime is {_next_prime(ring_size)}",
        )
    elif ring_size < RING_SLOTS_PER_BACKEND * backend_count:
        least = RING_SLOTS_PER_BACKEND * backend_count
        table.problem(
            "ring_size",
            f"must be at least 100 x the number of backends (the Maglev paper's bound for an"
            f" even spread): {backend_count} backends need {least} or more, got {ring_size};"
            f" try {_next_prime(least)}",
        )
    return ring_size


def _next_prime(start: int) -> int:
    candidate = start
    while not values.is_prime(candidate):
        candidate += 1
    return candidate


def _conntrack(table: Table | None, mode: Mode | None) -> ConnTracking:
    if table is None:
        return ConnTracking()
    table.check_keys(CONNTRACK_KEYS)
    defaults = ConnTracking()
    tcp_timeout = table.get("tcp_timeout", duration(), defaults.tcp_timeout)
    syn_timeout = min(defaults.syn_timeout, tcp_timeout)
    if _only_for(table, "syn_timeout", (Mode.DSR,), mode):
        syn_timeout = table.get("syn_timeout", duration(), syn_timeout)
        if syn_timeout > tcp_timeout:
            table.problem(
                "syn_timeout",
                f"must not exceed tcp_timeout ({format_duration(tcp_timeout)}),"
                f" got {format_duration(syn_timeout)}; equal to it turns the SYN protection off",
            )
    return ConnTracking(
        tcp_timeout=tcp_timeout,
        syn_timeout=syn_timeout,
        udp_timeout=table.get("udp_timeout", duration(), defaults.udp_timeout),
        persist_on_unhealthy=table.get(
            "persist_on_unhealthy", choice(PersistOnUnhealthy), defaults.persist_on_unhealthy
        ),
        flow_table_size=table.get(
            "flow_table_size", integer(1, 2**32 - 1), defaults.flow_table_size
        ),
    )


# -- edge protection ----------------------------------------------------------


def _client_rules(
    table: Table, vip: IPAddress | None, mode: Mode | None, deprecations: list[str]
) -> ClientRules:
    allow = _networks(table, "allow_clients", vip)
    proxy_table = table.table("proxy") if mode is Mode.PROXY else None
    if proxy_table is not None and proxy_table.has("allow_clients"):
        if table.has("allow_clients"):
            proxy_table.problem(
                "allow_clients", "also set on the service (allow_clients); keep that one"
            )
        else:
            # Issue 15 moved the key to the service, where every mode reads it.
            allow = _networks(proxy_table, "allow_clients", vip)
            deprecations.append(
                "proxy.allow_clients is deprecated: write allow_clients on the service"
                " itself ([[services]]), where every mode reads it"
            )
    deny = _networks(table, "deny_clients", vip)
    refuse = Refusal.DROP
    if table.has("refuse") and mode is Mode.PROXY:
        table.problem(
            "refuse",
            "only for mode dsr or nat; the proxy resets refused TCP connections"
            " (the kernel completed their handshake) and drops refused datagrams",
        )
    else:
        refuse = table.get("refuse", choice(Refusal), Refusal.DROP)
    return ClientRules(allow=allow, deny=deny, refuse=refuse)


def _networks(table: Table, key: str, vip: IPAddress | None) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for position, network in table.each(key, values.ip_network) or []:
        if vip is not None and network.version != vip.version:
            table.issues.add(
                (*table.at(key), position),
                f"{network} is IPv{network.version};"
                f" clients of an IPv{vip.version} VIP are IPv{vip.version}",
            )
        else:
            networks.append(network)
    return tuple(networks)


def _limits(service: Table, mode: Mode | None) -> Limits:
    if not _only_for(service, "limits", (Mode.DSR, Mode.NAT), mode):
        return Limits()
    table = service.table("limits")
    if table is None:
        return Limits()
    table.check_keys(LIMITS_KEYS)
    concurrent = {}
    for key in ("client_max_flows", "max_flows"):
        if _only_for(table, key, (Mode.NAT,), mode):
            concurrent[key] = table.optional(key, integer(1, _MANY))
    return Limits(
        client_new_flow_rate=table.optional("client_new_flow_rate", integer(1, MAX_FLOW_RATE)),
        new_flow_rate=table.optional("new_flow_rate", integer(1, MAX_FLOW_RATE)),
        **concurrent,
    )


# -- health -------------------------------------------------------------------


def _health_fields(table: Table, inherited: HealthType | None, mode: Mode | None) -> dict[str, Any]:
    """The HealthSpec fields this table writes, validated against its check type."""
    table.check_keys(HEALTH_KEYS)
    kind = table.get("type", choice(HealthType), inherited or HealthType.TCP)
    fields: dict[str, Any] = {"type": kind}
    for key, parse in HEALTH_COMMON.items():
        if not table.has(key):
            continue
        if kind is HealthType.NONE:
            table.problem(key, "type none runs no check; remove this key")
            continue
        if key == "probe_vip" and not _only_for(table, key, (Mode.DSR,), mode):
            continue
        parsed = table.optional(key, parse)
        if parsed is not None:
            fields[key] = parsed
    for key, (parse, kinds) in HEALTH_SPECIFIC.items():
        if not table.has(key):
            continue
        if kind not in kinds:
            wanted = " or ".join(k.value for k in kinds)
            table.problem(key, f"only for type {wanted}; this check is type {kind.value}")
            continue
        parsed = table.optional(key, parse)
        if parsed is not None:
            fields[_HEALTH_FIELD.get(key, key)] = parsed
    for text_key in ("request", "expect"):
        if table.has(text_key) and table.has(f"{text_key}_hex"):
            table.problem(f"{text_key}_hex", f"set either {text_key} or {text_key}_hex, not both")
    return fields


def _inherit(service: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A backend's check: its own fields over the service's.

    When the backend picks another check type, only the fields every type shares
    (port, timing, rise/fall) come from the service.
    """
    if override["type"] is service["type"]:
        return {**service, **override}
    return {**{k: v for k, v in service.items() if k in HEALTH_COMMON}, **override}


def _health_spec(table: Table, fields: Mapping[str, Any]) -> HealthSpec:
    """Build the check and report what is wrong with the fields taken together.

    A rule fires only where one of its keys is written, so a mistake in the
    service's check is not repeated for every backend that inherits it.
    """
    spec = HealthSpec(**fields)
    exec_lacks_command = spec.type is HealthType.EXEC and not spec.command
    if exec_lacks_command and table.has("type") and not table.has("command"):
        table.problem(
            "command", "required for type exec: the program to run, like ['/usr/local/bin/check']"
        )
    if spec.timeout >= spec.interval and (table.has("timeout") or table.has("interval")):
        table.problem(
            "timeout",
            f"must be shorter than interval, got timeout {format_duration(spec.timeout)}"
            f" and interval {format_duration(spec.interval)}",
        )
    return spec


# -- backends -----------------------------------------------------------------


def _backend(
    table: Table, mode: Mode | None, single_port: bool, service_health: Mapping[str, Any]
) -> Backend | None:
    table.check_keys(BACKEND_KEYS)
    address = table.required("address", values.ip_address)
    port = None
    if table.has("port"):
        if mode is Mode.DSR:
            table.problem(
                "port", "dsr forwards packets unchanged; the backend port is the VIP port"
            )
        elif not single_port:
            table.problem("port", _NEEDS_SINGLE_PORT)
        else:
            port = table.optional("port", values.port)
    weight = table.get("weight", integer(MIN_WEIGHT, MAX_WEIGHT), 1)
    backup = table.get("backup", boolean, False)
    admin = table.get("state", choice(AdminState), AdminState.ENABLED)
    pool = DEFAULT_POOL
    if table.has("pool") and mode is not None and mode is not Mode.PROXY:
        table.problem(
            "pool",
            f"pools are for SNI routing, only in mode proxy; this service is mode {mode.value}",
        )
    else:
        pool = table.get("pool", values.name, DEFAULT_POOL)
    max_connections = None
    if _only_for(table, "max_connections", (Mode.NAT,), mode):
        max_connections = table.optional("max_connections", integer(1, _MANY))
    health = None
    override = table.table("health")
    if override is not None:
        fields = _health_fields(override, service_health["type"], mode)
        health = _health_spec(override, _inherit(service_health, fields))
    if address is None:
        return None
    return Backend(
        address=address,
        port=port,
        weight=weight,
        backup=backup,
        admin=admin,
        pool=pool,
        health=health,
        max_connections=max_connections,
    )


def _check_backends(
    service: Table, vip: IPAddress, mode: Mode | None, backends: Sequence[tuple[int, Backend]]
) -> None:
    seen: dict[str, int] = {}
    for position, backend in backends:
        where = (*service.at("backends"), position, "address")
        if backend.address == vip:
            service.issues.add(
                where, f"{backend.address} is the VIP itself; a backend needs its own address"
            )
        # dsr and nat forward packets, which cannot change IP version; the proxy
        # opens a new connection and may.
        elif backend.address.version != vip.version and mode is not Mode.PROXY:
            service.issues.add(
                where,
                f"IPv{backend.address.version} backend for an IPv{vip.version} VIP;"
                f" only mode proxy can mix address families",
            )
        if backend.key in seen:
            service.issues.add(
                where, f"duplicate backend {backend.key} (also backends[{seen[backend.key]}])"
            )
        else:
            seen[backend.key] = position


# -- proxy --------------------------------------------------------------------


def _proxy(
    table: Table,
    service: Table,
    protocol: Protocol,
    backends: Sequence[tuple[int, Backend]],
) -> ProxyOptions:
    table.check_keys(PROXY_KEYS)
    defaults = ProxyOptions()
    # The issue that asked for PROXY v2 wrote it on the service; both spellings work.
    proxy_protocol = table.get("proxy_protocol", choice(ProxyProtocol), defaults.proxy_protocol)
    if service.has("proxy_protocol"):
        if table.has("proxy_protocol"):
            service.problem("proxy_protocol", "also set in [services.proxy]; keep one")
        else:
            proxy_protocol = service.get("proxy_protocol", choice(ProxyProtocol), proxy_protocol)
    if proxy_protocol is ProxyProtocol.V1 and "udp" in protocol.transports:
        written = table if table.has("proxy_protocol") else service
        written.problem("proxy_protocol", "v1 has no UDP form; use v2 for a udp service")
    return ProxyOptions(
        proxy_protocol=proxy_protocol,
        transparent=table.get("transparent", boolean, defaults.transparent),
        balance=table.get("balance", choice(Balance), defaults.balance),
        sni_routes=_sni_routes(table, protocol, backends),
        sni_fallback=table.get("sni_fallback", choice(SniFallback), defaults.sni_fallback),
        sni_timeout=table.get("sni_timeout", duration(), defaults.sni_timeout),
        max_connections=table.optional("max_connections", integer(1, _MANY)),
        max_connections_per_backend=table.optional(
            "max_connections_per_backend", integer(1, _MANY)
        ),
        connect_timeout=table.get("connect_timeout", duration(), defaults.connect_timeout),
        idle_timeout=table.get("idle_timeout", duration(), defaults.idle_timeout),
        max_udp_sessions=table.get(
            "max_udp_sessions", integer(1, _MANY), defaults.max_udp_sessions
        ),
        trust_inbound_proxy_protocol=table.get(
            "trust_inbound_proxy_protocol", boolean, defaults.trust_inbound_proxy_protocol
        ),
    )


def _sni_routes(
    table: Table, protocol: Protocol, backends: Sequence[tuple[int, Backend]]
) -> tuple[SniRoute, ...]:
    route_tables = table.tables("sni_routes", "services.proxy.sni_routes") or []
    if route_tables and protocol is Protocol.UDP:
        table.problem(
            "sni_routes", "SNI routing reads the TLS ClientHello, which needs protocol tcp"
        )
    pools_with_backends = {backend.pool for _, backend in backends}
    routes: list[SniRoute] = []
    routed_pools: set[str] = set()
    routed_by: dict[str, int] = {}
    for position, route_table in route_tables:
        route_table.check_keys(SNI_ROUTE_KEYS)
        server_names = route_table.each("server_names", values.server_name_pattern, required=True)
        for name_position, server_name in server_names or []:
            if server_name in routed_by:
                route_table.issues.add(
                    (*route_table.at("server_names"), name_position),
                    f"{server_name!r} is already routed by sni_routes[{routed_by[server_name]}]",
                )
            routed_by.setdefault(server_name, position)
        pool = route_table.required("pool", values.name)
        if pool is None:
            continue
        routed_pools.add(pool)
        if pool not in pools_with_backends:
            route_table.problem(
                "pool", f"no backend is in pool {pool!r}; give its backends pool = {pool!r}"
            )
        if server_names:
            routes.append(SniRoute(tuple(name for _, name in server_names), pool))
    for position, backend in backends:
        if backend.pool != DEFAULT_POOL and backend.pool not in routed_pools:
            table.issues.add(
                (*table.path[:-1], "backends", position, "pool"),
                f"no proxy.sni_routes entry names pool {backend.pool!r};"
                " this backend would get no flows",
            )
    return tuple(routes)


# -- across services ----------------------------------------------------------


def _check_names(issues: Issues, names: ServiceNames) -> None:
    first: dict[str, int] = {}
    for index, name in sorted(names.items()):
        if name in first:
            issues.add(
                ("services", index, "name"),
                f"duplicate service name {name!r} (also services[{first[name]}])",
            )
        else:
            first[name] = index


def _check_overlaps(
    issues: Issues, services: Sequence[tuple[int, Service]], shown: Mapping[int, str]
) -> None:
    for later, (index, service) in enumerate(services):
        for earlier_index, earlier in services[:later]:
            if earlier.vip != service.vip or not earlier.ports.overlaps(service.ports):
                continue
            shared = [t for t in service.protocol.transports if t in earlier.protocol.transports]
            if shared:
                issues.add(
                    ("services", index, "ports"),
                    f"{service.vip} {'+'.join(shared)} {_overlap(earlier.ports, service.ports)}"
                    f" is already served by {service_label(earlier_index, shown)}",
                )


def _overlap(a: PortSet, b: PortSet) -> str:
    if a.all_ports and b.all_ports:
        return "all ports"
    if a.all_ports or b.all_ports:
        return f"port {(b if a.all_ports else a).ranges[0].first}"
    first = min(
        max(x.first, y.first)
        for x in a.ranges
        for y in b.ranges
        if x.first <= y.last and y.first <= x.last
    )
    return f"port {first}"
