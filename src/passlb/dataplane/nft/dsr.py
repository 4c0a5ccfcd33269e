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
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from passlb.dataplane.base import ApplyResult, Flow, ServiceCounters
from passlb.dataplane.nft.counters import service_counters
from passlb.dataplane.nft.names import ServiceNames, check_services, ident
from passlb.dataplane.nft.objects import Chain, Counter, Element, Set, Table
from passlb.dataplane.nft.ruleset import (
    NftBackend,
    Ruleset,
    converge,
    delete_table,
    same_declaration,
)
from passlb.dataplane.nft.transaction import Transaction
from passlb.errors import DataplaneError
from passlb.hashing.flowkey import hash_fields
from passlb.hashing.maglev import Ring
from passlb.model import IPAddress, PortSet
from passlb.state import BackendDesired, DesiredState, ServiceDesired

DEFAULT_TABLE = "passlb"
INGRESS_PRIORITY = -100  # before the default-priority (0) ingress filters of the host
CLIENT_HASH_MOD = 0xFFFFFFFF  # IPv6 flow key: the client address hashed to 32 bits

# Element comments on backends4/6 name the owner of each id: "<service>/<backend key>".
# Backend keys never hold "/", so the last "/" splits them.
_OWNER_SEP = "/"


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


def _backend_rules(bid: int, address: IPAddress) -> list[str]:
    return [f'counter name "pkts_{bid}" fwd {_ip(address.version)} to {address} device iif']


def _service_rules(sd: ServiceDesired, names: ServiceNames) -> list[str]:
    svc = sd.service
    family = _family(svc.vip)
    key = flow_key_expr(family, sd.seed)
    forward = f"meta mark vmap @backends{family}"
    timeouts = {"tcp": svc.conntrack.tcp_timeout, "udp": svc.conntrack.udp_timeout}
    rules = []
    for transport in svc.protocol.transports:
        flows = names.flows(transport)
        update = f"update @{flows} {{ {key} timeout {_seconds(timeouts[transport])} : meta mark }}"
        rules.append(
            f"meta l4proto {transport} meta mark set {key} map @{flows} {update} {forward}"
        )
    if sd.ring is not None:
        rules.append(f"meta mark set {_ring_key_expr(sd)} seed {sd.seed:#x} map @{names.ring}")
        for transport in svc.protocol.transports:
            flows = names.flows(transport)
            rules.append(
                f"meta l4proto {transport} update @{flows} "
                f"{{ {key} timeout {_seconds(timeouts[transport])} : meta mark }}"
            )
        rules.append(f"counter name meta mark map @newflows {forward}")
    rules.append(f'counter name "{names.drop_counter}" drop')
    return rules


def _seconds(value: float) -> str:
    return f"{max(1, round(value))}s"


# ring map name -> (ring, backend ids, elements)
RingCache = dict[str, tuple[Ring, tuple[int, ...], dict[tuple[str, ...], Element]]]


def ring_elements(
    name: str, ring: Ring, backend_ids: Sequence[int], cache: RingCache | None
) -> dict[tuple[str, ...], Element]:
    """slot -> backend id elements of a ring map, reused from `cache` when unchanged.

    When only some slots changed, the unchanged slots keep their Element
    objects, so converge compares them by identity (a ring change after a
    health event rewrites a third of 65,537 slots, not all of them).
    """
    ids = tuple(backend_ids)
    values = [str(bid) for bid in ids]
    previous = cache.get(name) if cache is not None else None
    if previous is not None and previous[1] == ids and len(previous[0]) == len(ring):
        if previous[0] == ring:
            return previous[2]
        elements = dict(previous[2])
        slots = ring.slots
        for slot in ring.diff(previous[0]):
            elements[(str(slot),)] = Element(name, (str(slot),), values[slots[slot]])
    else:
        elements = {
            (str(slot),): Element(name, (str(slot),), values[idx])
            for slot, idx in enumerate(ring.slots)
        }
    if cache is not None:
        cache[name] = (ring, ids, elements)
    return elements


def render(
    desired: DesiredState,
    ids: dict[tuple[str, str], int],
    interfaces: Sequence[str],
    table: Table,
    ring_cache: RingCache | None = None,
) -> Ruleset:
    """The whole dsr table for `desired`; `ids` holds an id for every backend it names.

    `ring_cache` keeps ring elements between calls: a ring that did not change
    comes back as the very same dict, which `converge` skips without comparing
    its (up to 65,537) elements.
    """
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
        rs.add_chain(Chain(names.chain), _service_rules(sd, names))
        rs.add_counter(Counter(names.drop_counter, comment=svc.name))
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
            owner = f"{svc.name}{_OWNER_SEP}{b.key}"
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
            rs.sets[names.ring] = Set(names.ring, _ring_key_expr(sd), "meta mark", comment=svc.name)
            rs.elements[names.ring] = ring_elements(names.ring, sd.ring, backend_ids, ring_cache)
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


@dataclass
class _Owners:
    """Backend ids: who holds which, and which are held back by leftover flow entries."""

    ids: dict[tuple[str, str], int] = field(default_factory=dict)  # (service, key) -> id
    reserved: set[int] = field(default_factory=set)

    def owner(self, bid: int) -> tuple[str, str] | None:
        return next((o for o, i in self.ids.items() if i == bid), None)

    def assign(self, wanted: Iterable[tuple[str, str]]) -> set[int]:
        """Give every wanted owner an id; forget the others. Returns the ids let go."""
        wanted = list(wanted)
        keep = set(wanted)
        released = {i for o, i in self.ids.items() if o not in keep}
        self.ids = {o: i for o, i in self.ids.items() if o in keep}
        taken = set(self.ids.values()) | self.reserved | released
        next_id = 1
        for owner in wanted:
            if owner in self.ids:
                continue
            while next_id in taken:
                next_id += 1
            self.ids[owner] = next_id
            taken.add(next_id)
        return released


class DsrDriver:
    """Driver "dsr": see the module docstring for the table it keeps."""

    name = "dsr"

    def __init__(
        self,
        interfaces: Sequence[str],
        nft: NftBackend | None = None,
        *,
        table: str = DEFAULT_TABLE,
    ) -> None:
        if not interfaces:
            raise DataplaneError("the dsr driver needs at least one interface")
        if nft is None:
            from passlb.dataplane.nft.runner import NftRunner  # the real kernel by default

            nft = NftRunner()
        self.interfaces = tuple(interfaces)
        self.nft = nft
        self.table = Table("netdev", table, comment="passlb dsr")
        self._owners = _Owners()
        self._adopted = False
        self._applied: Ruleset | None = None  # what the kernel holds, when we are sure
        self._desired: DesiredState | None = None
        self._ring_cache: RingCache = {}

    # -- sync -----------------------------------------------------------------------

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        started = time.monotonic()
        check_services(desired)
        full = full or self._applied is None
        current = self.nft.read(self.table) if full else self._applied
        if not self._adopted:
            self._adopt(current)
        released = self._owners.assign(
            (sd.service.name, b.key) for sd in desired.services for b in sd.backends
        )
        rendered = render(desired, self._owners.ids, self.interfaces, self.table, self._ring_cache)
        tx = converge(current, rendered, rewrite_rules=full)
        cuts = self._flow_cuts(desired, current, rendered, released, full)
        try:
            written, cut = self._apply(tx, cuts)
        except DataplaneError:
            self._applied = None  # the next sync re-reads the kernel and rewrites everything
            raise
        self._applied = rendered if cut else None
        self._desired = desired
        return ApplyResult(full=full, operations=written, duration=time.monotonic() - started)

    def _apply(self, tx: Transaction, cuts: list[Element]) -> tuple[int, bool]:
        """Apply `tx` with the flow cuts in the same transaction, or without them if that
        fails. Returns the operations written and whether the cuts were made."""
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
            self._owners.reserved |= {int(e.value or 0) for e in cuts}
            self.nft.apply(tx)
            return len(tx), False

    def _adopt(self, current: Ruleset | None) -> None:
        """Recover backend ids from a table a previous run left (kept forwarding meanwhile)."""
        self._adopted = True
        if current is None:
            return
        for family in (4, 6):
            for elem in current.elements.get(f"backends{family}", {}).values():
                if elem.comment and _OWNER_SEP in elem.comment:
                    svc, key = elem.comment.rsplit(_OWNER_SEP, 1)
                    self._owners.ids[(svc, key)] = int(elem.key[0])

    def _flow_cuts(
        self,
        desired: DesiredState,
        current: Ruleset | None,
        rendered: Ruleset,
        released: set[int],
        full: bool,
    ) -> list[Element]:
        """Flow entries to delete: of cut backends, of backends gone, of unknown ids."""
        previous = self._desired
        cuts: list[Element] = []
        live = set(self._owners.ids.values())
        still_reserved: set[int] = set()
        for sd in desired.services:
            names = ServiceNames.of(sd.service.name)
            cut_ids = {
                self._owners.ids[(sd.service.name, b.key)]
                for b in sd.backends
                if b.cut_flows and (full or not _was_cut(previous, sd.service.name, b))
            }
            if not (cut_ids or released or full or self._owners.reserved):
                continue
            for transport in sd.service.protocol.transports:
                flows = names.flows(transport)
                if current is None or flows not in current.sets:
                    continue
                if not same_declaration(current.sets[flows], rendered.sets[flows]):
                    continue  # a new or re-declared flow table holds nothing to cut
                for elem in self.nft.read_elements(self.table, flows):
                    bid = int(elem.value or 0)
                    if bid in cut_ids or bid not in live:
                        cuts.append(Element(flows, elem.key, elem.value))
                        if bid not in live:
                            still_reserved.add(bid)
        self._owners.reserved = still_reserved
        return cuts

    # -- reads ----------------------------------------------------------------------

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        services = self._known_services()
        active: dict[int, int] = {}
        for sd in services if active_flows else ():
            active.update(self._active_flows(sd))
        return service_counters(
            services, self._owners.ids, self.nft.read_counters(self.table), active
        )

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        found: list[Flow] = []
        for sd in self._known_services():
            svc = sd.service
            if service is not None and svc.name != service:
                continue
            names = ServiceNames.of(svc.name)
            for transport in svc.protocol.transports:
                for elem in self._flow_entries(names.flows(transport)):
                    owner = self._owners.owner(int(elem.value or 0))
                    if owner is None or owner[0] != svc.name:
                        continue  # an entry of a backend already gone
                    if backend is not None and owner[1] != backend:
                        continue
                    found.append(_decode_flow(svc.name, owner[1], transport, svc.vip, elem))
        return found

    def _known_services(self) -> tuple[ServiceDesired, ...]:
        return self._desired.services if self._desired is not None else ()

    def _active_flows(self, sd: ServiceDesired) -> dict[int, int]:
        counts: collections.Counter[int] = collections.Counter()
        for transport in sd.service.protocol.transports:
            counts.update(
                self.nft.count_marks(self.table, ServiceNames.of(sd.service.name).flows(transport))
            )
        return dict(counts)

    def _flow_entries(self, flows: str) -> list[Element]:
        if self._applied is not None and flows not in self._applied.sets:
            return []
        return self.nft.read_elements(self.table, flows)

    # -- teardown -------------------------------------------------------------------

    def close(self, *, cleanup: bool = False) -> None:
        if cleanup:
            self.cleanup()
        self._applied = None

    def cleanup(self) -> None:
        """Delete the whole table (forwarding stops; flow tables are gone)."""
        delete_table(self.nft, self.table)
        self._applied = None
        self._desired = None


def _was_cut(previous: DesiredState | None, service: str, b: BackendDesired) -> bool:
    if previous is None:
        return False
    sd = previous.service(service)
    before = sd.backend(b.key) if sd is not None else None
    return before is not None and before.cut_flows


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
