"""The nat driver: nftables DNAT with conntrack; the client address reaches the backend.

One `inet` table holds both families, so a change to IPv4 and IPv6 services is
still one nft transaction (docs/dataplane-nat.md draws the table):

    prerouting    nat hook, dstnat: ip/ip6 daddr . l4proto . dport vmap @dispatch4/6
    dispatch4/6   VIP . proto . port(range) -> goto svc_<service>
    svc_<service> ct mark = backend id from the ring slot (jhash with the service's seed);
                  count the new flow; dnat to the id's address (and port);
                  no ring: count and drop
    ring_<svc>    slot -> backend id
    backends4/6   id -> address (services over port ranges or all ports: port kept)
    endpoints4/6  id -> address . port (single-port services: target_port or backend port)
    postrouting   nat hook, srcnat: masquerade flows of `snat` services (by id) and
                  hairpin flows (a backend reaching a VIP, by source address)
    forward       filter hook: per-backend packet/byte counters, client -> backend

The nat chains see only the first packet of a connection; conntrack carries the
rest, so established flows stay on their backend whatever the ring becomes. The
ct mark stamped on each flow names its (service, backend), which lets the
driver count and cut a backend's flows through ctnetlink by mark.

Backend ids are stable: allocated once per (service, backend key), recovered
from the element comments of backends4/6 and endpoints4/6 when adopting a
table, and never reused while this driver runs (flows of a removed backend may
still carry its mark).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from passlb.dataplane.base import Flow
from passlb.dataplane.nft.conntrack import (
    ConntrackTable,
    CtEntry,
    CtFilter,
    NetlinkConntrack,
)
from passlb.dataplane.nft.driver import NftDriver, RingCache, SyncPlan, was_cut
from passlb.dataplane.nft.guard import (
    Guard,
    SynProxy,
    add_guard,
    backend_limit_rules,
    render_guard,
    render_syn_proxy,
)
from passlb.dataplane.nft.ids import Owner, owner_comment
from passlb.dataplane.nft.names import ServiceNames
from passlb.dataplane.nft.objects import Chain, Counter, Element, Set, Table
from passlb.dataplane.nft.ruleset import NftBackend, Ruleset
from passlb.errors import DataplaneError
from passlb.hashing.flowkey import hash_fields
from passlb.model import PortSet
from passlb.state import BackendDesired, DesiredState, ServiceDesired

log = logging.getLogger(__name__)

DEFAULT_TABLE = "passlb_nat"
DSTNAT_PRIORITY = -100  # nft's "dstnat": after conntrack (-200), before routing
SRCNAT_PRIORITY = 100  # nft's "srcnat"
FORWARD_PRIORITY = 0
RAW_PRIORITY = -300  # nft's "raw": before conntrack (-200)

_TARGET_MAPS = ("backends4", "backends6", "endpoints4", "endpoints6")


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def maps_port(sd: ServiceDesired) -> bool:
    """Single-port services map the port (target_port or a backend's port); others keep it."""
    return sd.service.ports.is_single


def backend_port(sd: ServiceDesired, b: BackendDesired) -> int | None:
    """The port a backend receives on; None: the client's destination port, unchanged."""
    if not maps_port(sd):
        return None
    return b.port or sd.service.target_port or sd.service.ports.ranges[0].first


def _targets(sd: ServiceDesired) -> str:
    kind = "endpoints" if maps_port(sd) else "backends"
    return f"{kind}{sd.service.vip.version}"


def _port_keys(ports: PortSet) -> list[str]:
    return ["0-65535"] if ports.all_ports else [str(r) for r in ports.ranges]


def _ring_key_expr(sd: ServiceDesired) -> str:
    fields = " . ".join(hash_fields(sd.service.affinity, sd.service.vip.version))
    return f"jhash {fields} mod {sd.service.ring_size}"


def _service_rules(
    sd: ServiceDesired, names: ServiceNames, guard: Guard, ids: dict[str, int]
) -> list[str]:
    # This chain sees the first packet of each flow only: the guard decides per flow.
    rules = list(guard.client_rules)
    if sd.ring is not None:
        rules.extend(guard.new_flow_rules)
        ip = _ip(sd.service.vip.version)
        pick = f"ct mark set {_ring_key_expr(sd)} seed {sd.seed:#x} map @{names.ring}"
        # The l4proto match lets nft accept a port in the dnat map value; the
        # dispatch map already admitted only this service's transports.
        head = "meta l4proto { tcp, udp }"
        tail = f"counter name ct mark map @newflows dnat {ip} to ct mark map @{_targets(sd)}"
        limited = backend_limit_rules(sd.service, ids, "ct mark")
        if limited:  # the backend must be known before its count is checked
            rules += [pick, *limited, f"{head} {tail}"]
        else:
            rules.append(f"{head} {pick} {tail}")
    rules.append(f'counter name "{names.drop_counter}" drop')
    return rules


def render(
    desired: DesiredState, ids: dict[Owner, int], table: Table, rings: RingCache | None = None
) -> Ruleset:
    """The whole nat table for `desired`; `ids` holds an id for every backend it names.

    `rings` keeps ring contents between calls (see RingCache).
    """
    rings = rings if rings is not None else RingCache()
    rs = Ruleset(table)
    vips: dict[int, set[str]] = {4: set(), 6: set()}
    hairpin: dict[int, set[str]] = {4: set(), 6: set()}
    targets: dict[str, list[Element]] = {name: [] for name in _TARGET_MAPS}
    dispatch: dict[int, list[Element]] = {4: [], 6: []}
    snat_ids: list[Element] = []
    syn_proxies: list[SynProxy] = []
    pkts: list[Element] = []
    new: list[Element] = []
    for sd in desired.services:
        svc = sd.service
        family = svc.vip.version
        names = ServiceNames.of(svc.name)
        guard = render_guard(svc)
        own_ids = {b.key: ids[(svc.name, b.key)] for b in sd.backends}
        rs.add_chain(Chain(names.chain), _service_rules(sd, names, guard, own_ids))
        rs.add_counter(Counter(names.drop_counter, comment=svc.name))
        add_guard(rs, guard)
        if svc.syn_proxy:
            syn_proxies.append(render_syn_proxy(svc, guard, names.chain))
        vips[family].add(str(svc.vip))
        for transport in svc.protocol.transports:
            for port in _port_keys(svc.ports):
                key = (str(svc.vip), transport, port)
                dispatch[family].append(Element(f"dispatch{family}", key, f"goto {names.chain}"))
        target_map = _targets(sd)
        for b in sd.backends:
            bid = ids[(svc.name, b.key)]
            owner = owner_comment((svc.name, b.key))
            mapped = backend_port(sd, b)
            value = str(b.address) if mapped is None else f"{b.address} . {mapped}"
            targets[target_map].append(Element(target_map, (str(bid),), value, comment=owner))
            hairpin[family].add(str(b.address))
            rs.add_counter(Counter(f"pkts_{bid}", comment=owner))
            rs.add_counter(Counter(f"new_{bid}", comment=owner))
            pkts.append(Element("pkts", (str(bid),), f'"pkts_{bid}"'))
            new.append(Element("newflows", (str(bid),), f'"new_{bid}"'))
            if svc.snat:
                snat_ids.append(Element("snat_ids", (str(bid),)))
        if sd.ring is not None:
            rs.add_ring(
                Set(names.ring, _ring_key_expr(sd), "ct mark", comment=svc.name),
                rings.values(names.ring, sd.ring, [ids[(svc.name, b.key)] for b in sd.backends]),
            )
    for family in (4, 6):
        addr = _addr_type(family)
        rs.add_set(
            Set(f"backends{family}", "mark", addr, typeof=False), targets[f"backends{family}"]
        )
        # `type`, not `typeof ... th dport`: nft 1.0.6 then rejects `dnat ... map` rules
        # added to a table where the map already exists ("conflicting protocols").
        rs.add_set(
            Set(f"endpoints{family}", "mark", f"{addr} . inet_service", typeof=False),
            targets[f"endpoints{family}"],
        )
        rs.add_set(
            Set(
                f"dispatch{family}",
                f"{addr} . inet_proto . inet_service",
                "verdict",
                typeof=False,
                flags=("interval",),
            ),
            dispatch[family],
        )
        rs.add_set(
            Set(f"vips{family}", addr, typeof=False),
            [Element(f"vips{family}", (a,)) for a in sorted(vips[family])],
        )
        rs.add_set(
            Set(f"hairpin{family}", addr, typeof=False),
            [Element(f"hairpin{family}", (a,)) for a in sorted(hairpin[family])],
        )
    rs.add_set(Set("snat_ids", "mark", typeof=False), snat_ids)
    rs.add_set(Set("pkts", "mark", "counter", typeof=False), pkts)
    rs.add_set(Set("newflows", "mark", "counter", typeof=False), new)
    rs.add_chain(
        Chain(
            "prerouting", type="nat", hook="prerouting", priority=DSTNAT_PRIORITY, policy="accept"
        ),
        [
            f"meta nfproto ipv{f} meta l4proto {{ tcp, udp }} "
            f"{_ip(f)} daddr . meta l4proto . th dport vmap @dispatch{f}"
            for f in (4, 6)
        ],
    )
    rs.add_chain(
        Chain(
            "postrouting", type="nat", hook="postrouting", priority=SRCNAT_PRIORITY, policy="accept"
        ),
        [
            "ct status dnat ct mark @snat_ids masquerade",
            *(
                # Hairpin: a backend reaching a VIP may be sent to itself or a neighbour,
                # whose reply would go straight back, past the un-DNAT: make it answer us.
                f"meta nfproto ipv{f} ct status dnat ct original {_ip(f)} daddr @vips{f} "
                f"{_ip(f)} saddr @hairpin{f} masquerade"
                for f in (4, 6)
            ),
        ],
    )
    rs.add_chain(
        Chain("forward", type="filter", hook="forward", priority=FORWARD_PRIORITY, policy="accept"),
        ["ct direction original counter name ct mark map @pkts"],
    )
    if syn_proxies:
        _add_syn_proxy_hooks(rs, syn_proxies)
    return rs


def _add_syn_proxy_hooks(rs: Ruleset, proxies: list[SynProxy]) -> None:
    """The base chains the SYN proxies need (guard.SynProxy says why each)."""
    for proxy in proxies:
        rs.add_chain(proxy.chain[0], list(proxy.chain[1]))
    raw = [p.raw_rule for p in proxies]
    synproxy = [p.filter_rule for p in proxies]
    hooks = (
        ("synproxy_raw", "filter", "prerouting", RAW_PRIORITY, raw),
        ("synproxy_forward", "filter", "forward", FORWARD_PRIORITY, synproxy),
        ("synproxy_input", "filter", "input", FORWARD_PRIORITY, synproxy),
        ("output", "nat", "output", DSTNAT_PRIORITY, [p.output_rule for p in proxies]),
    )
    for name, kind, hook, priority, rules in hooks:
        rs.add_chain(Chain(name, type=kind, hook=hook, priority=priority, policy="accept"), rules)


# -- conntrack cuts (pure planning) -----------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Conntrack entries to delete after the nft transaction, and why (for the log)."""

    where: CtFilter
    reason: str


def plan_cuts(
    previous: DesiredState | None,
    desired: DesiredState,
    ids: dict[Owner, int],
    released: dict[Owner, int],
    rings_before: set[str],
    full: bool,
) -> list[Cut]:
    """The conntrack cuts that make the data plane honour `desired`.

    - A backend with cut_flows loses every flow of its service (by its mark) when
      it becomes cut, and again on a full sync (idempotent); one with cut_udp
      (removed, draining) its UDP flows.
    - A backend that left the state (`released`: a removed backend whose drain
      ended in a cut, its service gone, or one a restarted daemon does not know)
      loses its UDP flows: with no connection to end them, conntrack would pin
      the client to it until idle expiry. Its TCP flows run until they end.
    - A UDP service whose ring appears (new service, or 0 -> N backends) loses its
      UDP entries: made while nothing was DNATed, they would send every further
      datagram of those clients past the load balancer (kube-proxy's black hole).
    """
    cuts: list[Cut] = []
    for sd in desired.services:
        svc = sd.service
        family = svc.vip.version
        for b in sd.backends:
            if b.cut_flows and (full or not was_cut(previous, svc.name, b, "tcp")):
                cuts.append(
                    Cut(
                        CtFilter(family, mark=ids[(svc.name, b.key)], dst=svc.vip),
                        f"{svc.name}/{b.key}: {b.role}, flows cut",
                    )
                )
            elif b.cut_udp and (full or not was_cut(previous, svc.name, b, "udp")):
                cuts.append(
                    Cut(
                        CtFilter(family, mark=ids[(svc.name, b.key)], dst=svc.vip, protos=("udp",)),
                        f"{svc.name}/{b.key}: removed, UDP flows cut",
                    )
                )
        if (
            sd.ring is not None
            and svc.name not in rings_before
            and "udp" in svc.protocol.transports
        ):
            cuts.append(
                Cut(
                    CtFilter(family, dst=svc.vip, ports=svc.ports, protos=("udp",)),
                    f"{svc.name}: ring appeared, stale UDP entries removed",
                )
            )
    for (service, key), bid in sorted(released.items()):
        for family in (4, 6):
            cuts.append(
                Cut(
                    CtFilter(family, mark=bid, protos=("udp",)),
                    f"{service}/{key}: removed, UDP flows cut",
                )
            )
    return cuts


class NatDriver(NftDriver):
    """Driver "nat": see the module docstring for the table it keeps."""

    name = "nat"
    owner_maps = _TARGET_MAPS

    def __init__(
        self,
        nft: NftBackend | None = None,
        conntrack: ConntrackTable | None = None,
        *,
        table: str = DEFAULT_TABLE,
    ) -> None:
        super().__init__(nft, Table("inet", table, comment="passlb nat"))
        self.conntrack: ConntrackTable = conntrack if conntrack is not None else NetlinkConntrack()
        self._pending: list[Cut] = []  # cuts that failed: retried on the next sync

    def render(self, desired: DesiredState) -> Ruleset:
        return render(desired, self.ids.ids, self.table, self.rings)

    def write(self, plan: SyncPlan) -> tuple[int, bool]:
        rings_before = _services_with_ring(plan.current, plan.desired)
        cuts = self._pending + plan_cuts(
            self._desired, plan.desired, self.ids.ids, plan.released, rings_before, plan.full
        )
        try:
            if any(sd.service.syn_proxy for sd in plan.desired.services):
                self.conntrack.require_handshakes()  # before the SYN proxy takes a flow
            self.nft.apply(plan.tx)
        except DataplaneError:
            self._pending = cuts
            raise
        self._desired = plan.desired
        # After the transaction: the ring no longer sends new flows where the cut
        # entries pointed, so the next packet of a cut flow is balanced afresh.
        self._pending = []
        self._cut(cuts)
        return len(plan.tx), True

    def _cut(self, cuts: list[Cut]) -> None:
        for index, cut in enumerate(cuts):
            try:
                gone = self.conntrack.delete(self.conntrack.entries(cut.where))
            except DataplaneError:
                self._pending = cuts[index:]
                raise
            if gone:
                log.info("conntrack: %s (%d entries)", cut.reason, gone)

    def adopted(self, current: Ruleset | None) -> None:
        # Marks of live flows stay held: a new backend must not inherit the flows
        # (and counters) of one removed before the restart. Within a run every id
        # let go stays held too (nothing tells when its TCP flows end).
        for family in (4, 6):
            self.ids.held |= {e.mark for e in self.conntrack.entries(CtFilter(family))}
        self.ids.held -= set(self.ids.ids.values())

    # -- reads ----------------------------------------------------------------------

    def active_flows(self, services: Sequence[ServiceDesired]) -> dict[int, int]:
        """Conntrack entries per backend id, of flows to a VIP this driver serves.
        Counted, not listed: a connection-rate burst leaves tens of thousands of
        TIME_WAIT entries behind."""
        vips = {sd.service.vip for sd in services}
        counts: dict[int, int] = {}
        for family in sorted({v.version for v in vips}):
            for (mark, dst), n in self.conntrack.count(family).items():
                if self.ids.owner(mark) is not None and dst in vips:
                    counts[mark] = counts.get(mark, 0) + n
        return counts

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        found: list[Flow] = []
        for entry in self._our_entries():
            owner = self.ids.owner(entry.mark)
            if owner is None:
                continue
            if (service is not None and owner[0] != service) or (
                backend is not None and owner[1] != backend
            ):
                continue
            found.append(
                Flow(
                    service=owner[0],
                    backend=owner[1],
                    protocol=entry.proto,
                    src=entry.src,
                    src_port=entry.sport,
                    dst=entry.dst,
                    dst_port=entry.dport,
                    expires_in=entry.timeout,
                )
            )
        return found

    def _our_entries(self) -> list[CtEntry]:
        """Conntrack entries of the flows this driver balanced (to a VIP it serves)."""
        vips = {sd.service.vip for sd in self.known_services()}
        families = sorted({v.version for v in vips})
        return [
            e
            for family in families
            for e in self.conntrack.entries(CtFilter(family))
            if self.ids.owner(e.mark) is not None and e.dst in vips
        ]


def _services_with_ring(current: Ruleset | None, desired: DesiredState) -> set[str]:
    """Services of `desired` whose ring map already exists in `current`."""
    if current is None:
        return set()
    return {
        sd.service.name
        for sd in desired.services
        if ServiceNames.of(sd.service.name).ring in current.sets
    }
