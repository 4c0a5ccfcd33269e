"""The dsr driver: nftables netdev ingress forwarding to backends' MACs (direct server return).

The table (docs/dataplane-dsr.md draws it):

    ingress_<if>  base chain per interface: ip/ip6 daddr . l4proto . dport vmap @exact4/6,
                  then the same key vmap @dispatch4/6
    exact4/6      VIP . proto . port -> goto svc_<service>  (hash: cheaper than an interval
                  lookup, and most services name single ports)
    dispatch4/6   VIP . proto . port range or all -> goto svc_<service>  (interval)
    svc_<service> 1. established: flow table hit -> refresh, jump to that backend's chain
                  2. new: mark = ring slot (jhash with the service's seed) -> backend id
                  3. record the flow (own rule: when the table is full only this rule fails)
                  4. count the new flow, jump to the backend's chain
                  5. anything left (no ring: drop policy) is counted and dropped, never
                     delivered to the load balancer itself
    backend_<id>  count, fwd to the backend's address out of the interface the packet
                  came in on (one chain per backend: a verdict lookup replaces a counter
                  map and an address map lookup on every packet)
    ring_<svc>    slot -> backend id;  backends4/6: id -> jump backend_<id>;
                  newflows: id -> counter
    flows_<svc>_<tcp|udp>  dynamic flow table, per transport so each has its own timeout

Backend ids (the mark values) are stable: allocated once per (service, backend
key), recovered from the element comments of backends4/6 when adopting a table,
and not reused while flow entries still name them.

nft 1.0.6 cannot write a map element from the packet path when the key spans
more than 16 bytes (netlink_linearize asserts), so the IPv4 flow key is
`saddr . sport . dport` (the VIP and protocol are fixed per map) and the IPv6
key hashes the client address: `jhash ip6 saddr mod 0xffffffff seed S . sport . dport`.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

from passlb.dataplane.base import Flow
from passlb.dataplane.nft.driver import NftDriver, RingCache, SyncPlan, was_cut
from passlb.dataplane.nft.guard import (
    FLOW_TABLE_FULL,
    SYN_ONLY,
    Guard,
    GuardNames,
    add_guard,
    render_guard,
)
from passlb.dataplane.nft.ids import Owner, owner_comment
from passlb.dataplane.nft.names import ServiceNames, ident
from passlb.dataplane.nft.objects import Chain, Counter, Element, Set, Table
from passlb.dataplane.nft.ruleset import NftBackend, Ruleset, same_declaration
from passlb.errors import DataplaneError
from passlb.hashing.flowkey import hash_fields
from passlb.model import IPAddress, PortSet
from passlb.state import DesiredState, ServiceDesired

DEFAULT_TABLE = "passlb"
INGRESS_PRIORITY = -100  # before the default-priority (0) ingress filters of the host
CLIENT_HASH_MOD = 0xFFFFFFFF  # IPv6 flow key: the client address hashed to 32 bits


def _family(address: IPAddress) -> int:
    return address.version


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def flow_key_expr(family: int, seed: int) -> str:
    """The flow-table key expression of a service of this family."""
    if family == 4:
        return "ip saddr . th sport . th dport"
    return f"jhash ip6 saddr mod {CLIENT_HASH_MOD} seed {seed:#x} . th sport . th dport"


def _dispatch_keys(ports: PortSet, family: int) -> list[tuple[str, str]]:
    """(dispatch map, port key) of each port or range: single ports go to the
    exact-match map, ranges and `all` to the interval map."""
    if ports.all_ports:
        return [(f"dispatch{family}", "0-65535")]
    return [
        (f"exact{family}" if r.first == r.last else f"dispatch{family}", str(r))
        for r in ports.ranges
    ]


def _ring_key_expr(sd: ServiceDesired) -> str:
    fields = " . ".join(hash_fields(sd.service.affinity, _family(sd.service.vip)))
    return f"jhash {fields} mod {sd.service.ring_size}"


def _backend_chain(bid: int) -> str:
    return f"backend_{bid}"


@functools.lru_cache(maxsize=1 << 16)  # every backend of every sync
def _backend_rules(bid: int, address: IPAddress) -> tuple[str, ...]:
    return (f'counter name "pkts_{bid}" fwd {_ip(address.version)} to {address} device iif',)


def _service_rules(sd: ServiceDesired, names: ServiceNames, guard: Guard) -> list[str]:
    svc = sd.service
    family = _family(svc.vip)
    key = flow_key_expr(family, sd.seed)
    forward = f"meta mark vmap @backends{family}"
    ct = svc.conntrack
    timeouts = {"tcp": ct.tcp_timeout, "udp": ct.udp_timeout}
    # SYN protection: a TCP flow is recorded for syn_timeout when it starts and
    # extended to tcp_timeout by its next packet that is not a SYN, so a flood of
    # lone SYNs (or lone packets of any kind) from spoofed sources expires fast.
    syn_guard = _seconds(ct.syn_timeout) != _seconds(ct.tcp_timeout)

    def update(transport: str, timeout: float) -> str:
        return (
            f"update @{names.flows(transport)} {{ {key} timeout {_seconds(timeout)} : meta mark }}"
        )

    rules = list(guard.client_rules)
    for transport in svc.protocol.transports:
        lookup = f"meta mark set {key} map @{names.flows(transport)}"
        if transport == "tcp" and syn_guard:
            rules.append(f"{SYN_ONLY} {lookup} {update('tcp', ct.syn_timeout)} {forward}")
        rules.append(
            f"meta l4proto {transport} {lookup} {update(transport, timeouts[transport])} {forward}"
        )
    if sd.ring is not None:
        rules.extend(guard.new_flow_rules)
        rules.append(f"meta mark set {_ring_key_expr(sd)} seed {sd.seed:#x} map @{names.ring}")
        count = "counter name meta mark map @newflows"
        for transport in svc.protocol.transports:
            first = ct.syn_timeout if transport == "tcp" and syn_guard else timeouts[transport]
            rules.append(f"meta l4proto {transport} {update(transport, first)} {count} {forward}")
        # Only when the record failed (a full flow table): forwarded, not recorded.
        full = GuardNames.of(svc.name).counter(FLOW_TABLE_FULL)
        rules.append(f'counter name "{full}" {count} {forward}')
    rules.append(f'counter name "{names.drop_counter}" drop')
    return rules


def _seconds(value: float) -> str:
    return f"{max(1, round(value))}s"


def render(
    desired: DesiredState,
    ids: dict[Owner, int],
    interfaces: Sequence[str],
    table: Table,
    rings: RingCache | None = None,
) -> Ruleset:
    """The whole dsr table for `desired`; `ids` holds an id for every backend it names.

    `rings` keeps ring contents between calls (see RingCache).
    """
    rings = rings if rings is not None else RingCache()
    rs = Ruleset(table)
    for family in (4, 6):
        ip = _ip(family)
        rs.add_set(Set(f"backends{family}", "meta mark", "verdict"))
        dispatch_key = f"{ip} daddr . meta l4proto . th dport"
        rs.add_set(Set(f"exact{family}", dispatch_key, "verdict"))
        rs.add_set(Set(f"dispatch{family}", dispatch_key, "verdict", flags=("interval",)))
    new: list[Element] = []
    for sd in desired.services:
        svc = sd.service
        names = ServiceNames.of(svc.name)
        family = _family(svc.vip)
        guard = render_guard(svc)
        rs.add_chain(Chain(names.chain), _service_rules(sd, names, guard))
        rs.add_counter(Counter(names.drop_counter, comment=svc.name))
        add_guard(rs, guard)
        for transport in svc.protocol.transports:
            for dispatch, port in _dispatch_keys(svc.ports, family):
                key = (str(svc.vip), transport, port)
                rs.elements[dispatch][key] = Element(dispatch, key, f"goto {names.chain}")
            rs.add_set(
                Set(
                    names.flows(transport),
                    flow_key_expr(family, sd.seed),
                    "meta mark",
                    flags=("dynamic", "timeout"),
                    size=svc.conntrack.flow_table_size,
                    comment=svc.name,
                )
            )
        backend_ids = [ids[(svc.name, b.key)] for b in sd.backends]
        for b, bid in zip(sd.backends, backend_ids, strict=True):
            owner = owner_comment((svc.name, b.key))
            # `jump`, not `goto`: should a backend chain not forward (it always does), the
            # packet returns to the service chain's next rule, never to the base chain's
            # accept (delivery to the load balancer itself).
            rs.elements[f"backends{family}"][(str(bid),)] = Element(
                f"backends{family}", (str(bid),), f"jump {_backend_chain(bid)}", comment=owner
            )
            rs.add_chain(Chain(_backend_chain(bid)), _backend_rules(bid, b.address))
            rs.add_counter(Counter(f"pkts_{bid}", comment=owner))
            rs.add_counter(Counter(f"new_{bid}", comment=owner))
            new.append(Element("newflows", (str(bid),), f'"new_{bid}"'))
        if sd.ring is not None:
            rs.add_ring(
                Set(names.ring, _ring_key_expr(sd), "meta mark", comment=svc.name),
                rings.values(names.ring, sd.ring, backend_ids),
            )
    rs.add_set(Set("newflows", "mark", "counter", typeof=False), new)
    for interface in interfaces:
        rs.add_chain(
            Chain(
                f"ingress_{ident(interface)}",
                type="filter",
                hook="ingress",
                priority=INGRESS_PRIORITY,
                device=interface,
                policy="accept",
            ),
            [
                f"meta protocol {_ip(f)} meta l4proto {{ tcp, udp }} "
                f"{_ip(f)} daddr . meta l4proto . th dport vmap @{dispatch}{f}"
                for f in (4, 6)
                for dispatch in ("exact", "dispatch")
            ],
        )
    return rs


class DsrDriver(NftDriver):
    """Driver "dsr": see the module docstring for the table it keeps."""

    name = "dsr"
    owner_maps = ("backends4", "backends6")

    def __init__(
        self,
        interfaces: Sequence[str],
        nft: NftBackend | None = None,
        *,
        table: str = DEFAULT_TABLE,
    ) -> None:
        if not interfaces:
            raise DataplaneError("the dsr driver needs at least one interface")
        super().__init__(nft, Table("netdev", table, comment="passlb dsr"))
        self.interfaces = tuple(interfaces)

    def render(self, desired: DesiredState) -> Ruleset:
        return render(desired, self.ids.ids, self.interfaces, self.table, self.rings)

    def adopted(self, current: Ruleset | None) -> None:
        # Ids that flow entries of the previous run still name, for backends no longer
        # in the table, stay held: a new backend must not inherit those flows.
        if current is None:
            return
        for name, s in current.sets.items():
            if s.is_dynamic:
                self.ids.held |= set(self.nft.count_marks(self.table, name))
        self.ids.held -= set(self.ids.ids.values())

    # -- flow cuts --------------------------------------------------------------------

    def write(self, plan: SyncPlan) -> tuple[int, bool]:
        """Apply the transaction with the flow cuts in it, or without them if that
        fails. Returns the operations written and whether the cuts were made."""
        tx = plan.tx
        cuts = self._flow_cuts(plan)
        if not cuts:
            self.nft.apply(tx)
            return len(tx), True
        with_cuts = tx.copy()
        for elem in cuts:
            with_cuts.add(elem)  # add first: an entry that expired meanwhile must not fail
            with_cuts.delete(elem)
        try:
            self.nft.apply(with_cuts)
            return len(with_cuts), True
        except DataplaneError:
            # A flow table at its size limit refuses the add half of an add+delete
            # pair; apply the state without the cuts, the next (full) sync retries them.
            self.ids.held |= {int(e.value or 0) for e in cuts}
            self.nft.apply(tx)
            return len(tx), False

    def _flow_cuts(self, plan: SyncPlan) -> list[Element]:
        """Flow entries to delete: of cut backends, of backends gone, of unknown ids.
        Ids that entries still name stay held; the others are free again."""
        previous, current, full = self._desired, plan.current, plan.full
        ids = self.ids.ids
        cuts: list[Element] = []
        still_held: set[int] = set()
        for sd in plan.desired.services:
            names = ServiceNames.of(sd.service.name)
            cut_ids = {
                transport: {
                    ids[(sd.service.name, b.key)]
                    for b in sd.backends
                    if b.cuts(transport)
                    and (full or not was_cut(previous, sd.service.name, b, transport))
                }
                for transport in sd.service.protocol.transports
            }
            if not (any(cut_ids.values()) or plan.released or full or self.ids.held):
                continue
            for transport in sd.service.protocol.transports:
                flows = names.flows(transport)
                if current is None or flows not in current.sets:
                    continue
                if not same_declaration(current.sets[flows], plan.rendered.sets[flows]):
                    continue  # a new or re-declared flow table holds nothing to cut
                for elem in self.nft.read_elements(self.table, flows):
                    bid = int(elem.value or 0)
                    live = self.ids.owner(bid) is not None
                    if bid in cut_ids[transport] or not live:
                        cuts.append(Element(flows, elem.key, elem.value))
                        if not live:
                            still_held.add(bid)
        self.ids.held = still_held
        return cuts

    # -- reads ----------------------------------------------------------------------

    def active_flows(self, services: Sequence[ServiceDesired]) -> dict[int, int]:
        counts: collections.Counter[int] = collections.Counter()
        for sd in services:
            for transport in sd.service.protocol.transports:
                counts.update(
                    self.nft.count_marks(
                        self.table, ServiceNames.of(sd.service.name).flows(transport)
                    )
                )
        return dict(counts)

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        found: list[Flow] = []
        for sd in self.known_services():
            svc = sd.service
            if service is not None and svc.name != service:
                continue
            names = ServiceNames.of(svc.name)
            for transport in svc.protocol.transports:
                for elem in self._flow_entries(names.flows(transport)):
                    owner = self.ids.owner(int(elem.value or 0))
                    if owner is None or owner[0] != svc.name:
                        continue  # an entry of a backend already gone
                    if backend is not None and owner[1] != backend:
                        continue
                    found.append(_decode_flow(svc.name, owner[1], transport, svc.vip, elem))
        return found

    def _flow_entries(self, flows: str) -> list[Element]:
        if self._applied is not None and flows not in self._applied.sets:
            return []
        return self.nft.read_elements(self.table, flows)


def _decode_flow(service: str, backend: str, transport: str, vip: IPAddress, elem: Element) -> Flow:
    client, sport, dport = elem.key
    src: IPAddress
    src_hash: int | None = None
    if vip.version == 4:
        src = IPv4Address(client)
    else:
        src, src_hash = IPv6Address(0), int(client)
    return Flow(
        service=service,
        backend=backend,
        protocol=transport,
        src=src,
        src_port=int(sport),
        dst=ip_address(str(vip)),
        dst_port=int(dport),
        expires_in=elem.expires,
        src_hash=src_hash,
    )
