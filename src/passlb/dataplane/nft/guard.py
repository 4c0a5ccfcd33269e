"""Edge protection of one kernel service: who may connect, how fast, and what was refused.

Both kernel drivers put these rules into the service chain: the client rules
first (dsr: every packet; nat: the first packet of a flow, as its chain sees
only those), the limits where a new flow is about to pick a backend. Every
refusal is counted in a named counter of its own reason, so status and metrics
say why traffic was refused, by service.

    allowed_<svc>  interval set of the allow_clients CIDRs (absent: everyone)
    denied_<svc>   interval set of the deny_clients CIDRs
    climit_<svc>   dynamic set: client address -> token bucket (client_new_flow_rate)
    cflows_<svc>   nat, dynamic set: client address -> its flows (ct count, client_max_flows)
    refuse_<svc>   chain: TCP reset, else ICMP administratively prohibited
                   (only with refuse = "reject"; "drop" drops in place)
    synp_<svc>     nat with syn_proxy: the client rules, then the kernel's SYN proxy
                   (see SynProxy)

The allow set holds the collapsed CIDRs: nft refuses overlapping elements in
an interval set, and users write overlapping lists (a /15 and a host in it).

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from passlb.dataplane.nft.names import ident
from passlb.dataplane.nft.objects import Chain, Counter, Element, Set
from passlb.dataplane.nft.ruleset import Ruleset
from passlb.model import IPNetwork, Mode, Refusal, Service

# Drop reasons of the kernel modes, as status and metrics name them; the counter
# prefix keeps each counter name within nft's 63 characters.
NOT_ALLOWED = "not_allowed"
CLIENT_RATE_LIMITED = "client_rate_limited"
RATE_LIMITED = "rate_limited"
NO_BACKEND = "no_backend"
SYN_PROXY = "syn_proxy"  # SYNs the SYN proxy answered with a cookie itself
CLIENT_MAX_FLOWS = "client_max_flows"
MAX_FLOWS = "max_flows"
BACKEND_FULL = "backend_full"
FLOW_TABLE_FULL = "flow_table_full"  # dsr: forwarded by the ring but not recorded
_COUNTER_PREFIX = {
    NOT_ALLOWED: "deny",
    CLIENT_RATE_LIMITED: "crate",
    RATE_LIMITED: "rate",
    SYN_PROXY: "synp",
    CLIENT_MAX_FLOWS: "cflows",
    MAX_FLOWS: "flows",
    BACKEND_FULL: "bfull",
    FLOW_TABLE_FULL: "full",
}

# A TCP packet with SYN and without ACK: a client's first (or retransmitted) handshake packet.
SYN_ONLY = "tcp flags & (syn | ack) == syn"
# What the SYN proxy offers clients in its SYN-ACK: the MSS only (1460 fits a
# 1500-byte path). A SYN cookie carries window scale and SACK only inside TCP
# timestamps, and with `timestamp` offered this kernel's (6.18) proxy ACK was
# refused by Linux backends, each handshake then waiting 1 s for a SYN-ACK
# retransmission. Offering a window scale without it would leave client and
# backend disagreeing on the scale. docs/protecting.md states the cost.
SYN_PROXY_OPTIONS = "mss 1460"

# A client's token bucket is forgotten after this long without a new flow; the
# set's size bounds the memory a flood of sources can take. When it is full, a
# new source is not limited (the kernel cannot add its bucket): the per-service
# rate still holds.
CLIENT_BUCKET_TIMEOUT = 60.0
CLIENT_BUCKETS = 65536


@dataclass(frozen=True)
class GuardNames:
    ident: str

    @staticmethod
    def of(service: str) -> GuardNames:
        return GuardNames(ident(service))

    @property
    def allowed(self) -> str:
        return f"allowed_{self.ident}"

    @property
    def denied(self) -> str:
        return f"denied_{self.ident}"

    @property
    def client_buckets(self) -> str:
        return f"climit_{self.ident}"

    @property
    def refuse_chain(self) -> str:
        return f"refuse_{self.ident}"

    @property
    def syn_proxy_chain(self) -> str:
        return f"synp_{self.ident}"

    @property
    def client_flows(self) -> str:
        return f"cflows_{self.ident}"

    def counter(self, reason: str) -> str:
        return f"{_COUNTER_PREFIX[reason]}_{self.ident}"


@dataclass(frozen=True)
class Guard:
    """The nft objects of one service's protection, for a driver to place."""

    sets: tuple[tuple[Set, tuple[Element, ...]], ...]
    counters: tuple[Counter, ...]
    chains: tuple[tuple[Chain, tuple[str, ...]], ...]
    client_rules: tuple[str, ...]  # first in the service chain
    new_flow_rules: tuple[str, ...]  # before a new flow picks its backend


def add_guard(rs: Ruleset, guard: Guard) -> None:
    """Put the guard's objects into a driver's table (the rules go in its chains)."""
    for s, elements in guard.sets:
        rs.add_set(s, list(elements))
    for counter in guard.counters:
        rs.add_counter(counter)
    for chain, rules in guard.chains:
        rs.add_chain(chain, list(rules))


def reason_counters(service: Service) -> dict[str, str]:
    """Drop reason -> counter name of every reason `service` counts (the drivers'
    counters() read these)."""
    names = GuardNames.of(service.name)
    reasons = []
    if service.clients.any:
        reasons.append(NOT_ALLOWED)
    if service.limits.client_new_flow_rate is not None:
        reasons.append(CLIENT_RATE_LIMITED)
    if service.limits.new_flow_rate is not None:
        reasons.append(RATE_LIMITED)
    if service.syn_proxy:
        reasons.append(SYN_PROXY)
    if service.limits.client_max_flows is not None:
        reasons.append(CLIENT_MAX_FLOWS)
    if service.limits.max_flows is not None:
        reasons.append(MAX_FLOWS)
    if any(b.max_connections is not None for b in service.backends):
        reasons.append(BACKEND_FULL)
    if service.mode is Mode.DSR:
        reasons.append(FLOW_TABLE_FULL)
    return {reason: names.counter(reason) for reason in reasons}


def collapse(networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    """The fewest CIDRs covering `networks` (overlaps and neighbours merged)."""
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def element_text(network: IPNetwork) -> str:
    """A CIDR as nft lists it in an interval set: a single host as a bare address."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def render_guard(service: Service) -> Guard:
    names = GuardNames.of(service.name)
    family = service.vip.version
    ip = "ip" if family == 4 else "ip6"
    addr_type = "ipv4_addr" if family == 4 else "ipv6_addr"
    sets: list[tuple[Set, tuple[Element, ...]]] = []
    chains: list[tuple[Chain, tuple[str, ...]]] = []
    counters = [
        Counter(counter, comment=f"{service.name}: {reason}")
        for reason, counter in reason_counters(service).items()
    ]
    refuse = "drop"
    if service.clients.refuse is Refusal.REJECT:
        refuse = f"goto {names.refuse_chain}"
        chains.append(
            (
                Chain(names.refuse_chain),
                (
                    "meta l4proto tcp reject with tcp reset",
                    "reject with icmpx type admin-prohibited",
                ),
            )
        )
    client_rules: list[str] = []
    deny_counter = f'counter name "{names.counter(NOT_ALLOWED)}"'
    for set_name, networks, test in (
        (names.denied, service.clients.deny, ""),
        (names.allowed, service.clients.allow, "!= "),
    ):
        if not networks:
            continue
        elements = tuple(Element(set_name, (element_text(n),)) for n in collapse(networks))
        sets.append((Set(set_name, addr_type, typeof=False, flags=("interval",)), elements))
        client_rules.append(f"{ip} saddr {test}@{set_name} {deny_counter} {refuse}")
    new_flow_rules: list[str] = []
    limits = service.limits
    if limits.client_new_flow_rate is not None:
        rate = limits.client_new_flow_rate
        buckets = Set(
            names.client_buckets,
            addr_type,
            typeof=False,
            flags=("dynamic", "timeout"),
            timeout=CLIENT_BUCKET_TIMEOUT,
            size=CLIENT_BUCKETS,
        )
        sets.append((buckets, ()))
        new_flow_rules.append(
            f"update @{names.client_buckets} {{ {ip} saddr {_over(rate)} }} "
            f'counter name "{names.counter(CLIENT_RATE_LIMITED)}" {refuse}'
        )
    if limits.new_flow_rate is not None:
        new_flow_rules.append(
            f'{_over(limits.new_flow_rate)} counter name "{names.counter(RATE_LIMITED)}" {refuse}'
        )
    # Concurrent flows: nft's `ct count` (nf_conncount) keeps the conntrack
    # entries that passed the rule and forgets those conntrack no longer holds.
    if limits.client_max_flows is not None:
        sets.append(
            (Set(names.client_flows, addr_type, typeof=False, flags=("dynamic",),
                 size=CLIENT_BUCKETS), ())
        )  # fmt: skip
        new_flow_rules.append(
            f"add @{names.client_flows} {{ {ip} saddr ct count over {limits.client_max_flows} }} "
            f'counter name "{names.counter(CLIENT_MAX_FLOWS)}" {refuse}'
        )
    if limits.max_flows is not None:
        new_flow_rules.append(
            f'ct count over {limits.max_flows} counter name "{names.counter(MAX_FLOWS)}" {refuse}'
        )
    return Guard(
        sets=tuple(sets),
        counters=tuple(counters),
        chains=tuple(chains),
        client_rules=tuple(client_rules),
        new_flow_rules=tuple(new_flow_rules),
    )


@dataclass(frozen=True)
class SynProxy:
    """A nat service's SYN proxy, in the four hooks it needs (nft wiki, "Synproxy").

    The client's SYN skips conntrack (`notrack` at raw priority), so no entry and
    no DNAT exist yet; the `synproxy` statement in the filter hooks answers it with
    a SYN cookie. The client's ACK, which conntrack cannot place (that needs
    net.netfilter.nf_conntrack_tcp_loose = 0), brings the cookie back: the kernel
    then sends its own SYN for the flow from the output path, where the nat
    output hook sends it into the service chain and its DNAT, and from there the
    flow is an ordinary conntrack entry.
    """

    raw_rule: str  # prerouting, raw priority: the SYN skips conntrack
    chain: tuple[Chain, tuple[str, ...]]  # the client rules, then the proxy
    filter_rule: str  # forward and input: goto the chain
    output_rule: str  # nat output: the kernel's own SYN goes to the service chain


def render_syn_proxy(service: Service, guard: Guard, service_chain: str) -> SynProxy:
    names = GuardNames.of(service.name)
    ip = "ip" if service.vip.version == 4 else "ip6"
    ports = service.ports
    if ports.all_ports:
        dport = ""
    elif ports.is_single:
        dport = f" tcp dport {ports}"
    else:
        dport = " tcp dport { " + ", ".join(str(r) for r in ports.ranges) + " }"
    match = f"{ip} daddr {service.vip} meta l4proto tcp{dport}"
    counter = f'counter name "{names.counter(SYN_PROXY)}"'
    rules = (
        *guard.client_rules,
        f"{SYN_ONLY} ct state untracked {counter} synproxy {SYN_PROXY_OPTIONS}",
        f"ct state invalid,untracked synproxy {SYN_PROXY_OPTIONS}",
        "ct state invalid drop",
    )
    return SynProxy(
        raw_rule=f"{match} {SYN_ONLY} notrack",
        chain=(Chain(names.syn_proxy_chain), rules),
        filter_rule=f"{match} goto {names.syn_proxy_chain}",
        output_rule=f"{match} goto {service_chain}",
    )


def backend_limit_rules(service: Service, ids: dict[str, int], mark: str) -> list[str]:
    """nat: refuse a new flow whose backend (its id in `mark`) holds max_connections.

    `ids` maps backend keys to the ids the driver gave them. One rule per
    limited backend: nf_conncount counts per rule.
    """
    names = GuardNames.of(service.name)
    refuse = f"goto {names.refuse_chain}" if service.clients.refuse is Refusal.REJECT else "drop"
    return [
        f"{mark} {ids[b.key]} ct count over {b.max_connections} "
        f'counter name "{names.counter(BACKEND_FULL)}" {refuse}'
        for b in service.backends
        if b.max_connections is not None and b.key in ids
    ]


def _over(rate: int) -> str:
    # A burst of one second's worth: a client opening its connections at once
    # (a browser, a pool) is not refused for it.
    return f"limit rate over {rate}/second burst {rate} packets"
