"""The nat driver against the fakes: rendered table (golden), new-flow choice, deltas, cuts."""

from __future__ import annotations

import os
from collections import Counter as Tally
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path
from typing import NoReturn

import pytest

from passlb.control.desired import compute_desired
from passlb.control.explain import explain_flow
from passlb.dataplane.nft.conntrack import CtEntry, CtFilter, FakeConntrack
from passlb.dataplane.nft.fake import FakeNft
from passlb.dataplane.nft.nat import NatDriver, backend_port
from passlb.dataplane.nft.objects import Element, RingWrite
from passlb.dataplane.nft.ruleset import Ruleset
from passlb.dataplane.nft.testing import ports, service
from passlb.dataplane.nft.transaction import Transaction
from passlb.errors import DataplaneError
from passlb.hashing.flowkey import L4PROTO, ring_slot
from passlb.model import (
    AdminState,
    AllUnhealthy,
    Backend,
    Config,
    HealthSpec,
    HealthType,
    Mode,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import DesiredState, HealthStatus, ServiceDesired

GOLDEN = Path(__file__).parent.parent / "golden"
B = ["198.18.2.11", "198.18.2.12", "198.18.2.13"]
B6 = ["2001:2:0:2::11", "2001:2:0:2::12"]
VIP = "198.18.0.10"
CLIENT = "198.18.1.10"


class RecordingNft(FakeNft):
    """The fake, keeping the last transaction applied (to count what a sync wrote)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: Transaction | None = None
        self.refuse = False

    def apply(self, tx: Transaction) -> None:
        if self.refuse:
            raise DataplaneError("nft rejected the transaction: refused by the test")
        super().apply(tx)
        self.last = tx


class FailingConntrack(FakeConntrack):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def delete(self, entries: object) -> int:
        if self.fail:
            raise DataplaneError("conntrack delete failed: refused by the test")
        return super().delete(entries)  # type: ignore[arg-type]


def nat(
    name: str,
    backends: list[str] | list[Backend],
    *,
    vip: str = VIP,
    protocol: Protocol = Protocol.TCP,
    port_set: PortSet | None = None,
    target_port: int | None = None,
    snat: bool = False,
    ring_size: int = 307,
) -> Service:
    svc = service(name, vip, backends, protocol=protocol, port_set=port_set, ring_size=ring_size)
    return replace(svc, mode=Mode.NAT, target_port=target_port, snat=snat, drain_timeout=5.0)


def state(*services: Service, health: dict[tuple[str, str], bool] | None = None) -> DesiredState:
    view = {k: HealthStatus(healthy=v) for k, v in (health or {}).items()}
    return compute_desired(Config(services=services), view, {}, now=0.0)


def driver(nft: FakeNft, ct: FakeConntrack | None = None) -> NatDriver:
    return NatDriver(nft, ct if ct is not None else FakeConntrack(), table="passlb_nat_t")


def resolve(rs: Ruleset, sd: ServiceDesired, src: str, sport: int, dport: int, proto: str) -> str:
    """Where the rendered maps send a new flow: ring slot -> id -> "address[ . port]"."""
    svc = sd.service
    slot = ring_slot(
        svc.affinity,
        sd.seed,
        svc.ring_size,
        ip_address(src),
        sport,
        svc.vip,
        dport,
        L4PROTO[proto],
    )
    bid = str(rs.rings[f"ring_{svc.name}"][slot])
    family = svc.vip.version
    for kind in ("endpoints", "backends"):
        found = rs.elements[f"{kind}{family}"].get((bid,))
        if found is not None:
            assert found.value is not None
            return found.value
    raise AssertionError(f"id {bid} has no address")


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PASSLB_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PASSLB_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed: diff it, then PASSLB_UPDATE_GOLDEN=1"


def golden_state() -> DesiredState:
    web = nat("web", B[:2], protocol=Protocol.TCP_UDP, port_set=ports(80), target_port=8080)
    web = replace(web, backends=(*web.backends[:1], Backend(ip_address(B[1]), port=9090)))
    dns = nat("dns", B[2:], protocol=Protocol.UDP, port_set=ports(53), ring_size=101)
    games = nat("games", B, protocol=Protocol.UDP, port_set=ports((7000, 7010)))
    six = nat("all6", B6, vip="2001:2:0:ff00::10", port_set=PortSet(all_ports=True), ring_size=211)
    legacy = nat("legacy", B[:1], vip="198.18.0.11", port_set=ports(8080), snat=True, ring_size=101)
    return state(web, dns, games, six, legacy)


def test_golden_multi_service_ruleset() -> None:
    fake = FakeNft()
    drv = driver(fake)
    drv.sync(golden_state())
    _check_golden("nat_multi_service.nft", fake.dump(drv.table))


def test_new_flows_land_where_explain_predicts_with_the_mapped_port() -> None:
    fake = FakeNft()
    drv = driver(fake)
    desired = golden_state()
    drv.sync(desired)
    rs = fake.ruleset(drv.table)
    checked = 0
    for name, dport, proto in (("web", 80, "tcp"), ("web", 80, "udp"), ("games", 7005, "udp")):
        sd = desired.service(name)
        assert sd is not None
        for sport in range(30000, 30100):
            target = resolve(rs, sd, CLIENT, sport, dport, proto)
            why = explain_flow(desired, CLIENT, sport, VIP, dport, proto)
            assert why.backend is not None and why.backend_port is not None
            expected_port = backend_port(sd, why.backend)
            want = (
                str(why.backend.address)
                if expected_port is None
                else f"{why.backend.address} . {why.backend_port}"
            )
            assert target == want
            checked += 1
    assert checked == 300


def test_port_mapping_target_port_backend_port_and_kept_ports() -> None:
    desired = golden_state()
    web, games, six = (desired.service(n) for n in ("web", "games", "all6"))
    assert web is not None and games is not None and six is not None
    assert [backend_port(web, b) for b in web.backends] == [8080, 9090]
    assert [backend_port(games, b) for b in games.backends] == [None, None, None]
    assert [backend_port(six, b) for b in six.backends] == [None, None]
    plain = state(nat("plain", B[:1], port_set=ports(443))).services[0]
    assert backend_port(plain, plain.backends[0]) == 443


def test_distribution_follows_the_ring_shares() -> None:
    fake = FakeNft()
    drv = driver(fake)
    desired = state(nat("web", B, port_set=ports(80), ring_size=1009))
    drv.sync(desired)
    rs = fake.ruleset(drv.table)
    sd = desired.services[0]
    seen = Tally(resolve(rs, sd, CLIENT, sport, 80, "tcp") for sport in range(20000, 23000))
    assert set(seen) == {f"{b} . 80" for b in B}
    assert all(800 < n < 1200 for n in seen.values()), seen


def test_a_removed_backend_rewrites_only_its_ring_slots() -> None:
    fake = RecordingNft()
    drv = driver(fake)
    before = state(nat("web", B, port_set=ports(80), ring_size=1009))
    drv.sync(before)
    after = state(nat("web", B[:2], port_set=ports(80), ring_size=1009))
    drv.sync(after)
    assert fake.last is not None and before.services[0].ring and after.services[0].ring
    ring_writes = [
        op.obj for op in fake.last if isinstance(op.obj, RingWrite) and op.obj.set == "ring_web"
    ]
    moved = sum(
        1
        for slot in range(1009)
        if before.services[0].backends[before.services[0].ring[slot]].key
        != after.services[0].backends[after.services[0].ring[slot]].key
    )
    # Every slot that moved is one delete (old id) and one add (new id); nothing else.
    assert sum(len(w) for w in ring_writes) == 2 * moved
    assert 250 < moved < 420  # about a third: the removed backend's share
    # Slots that stayed keep their id: established mapping of the others is untouched.
    rs = fake.ruleset(drv.table)
    sd = after.services[0]
    for sport in range(40000, 40200):
        assert resolve(rs, sd, CLIENT, sport, 80, "tcp") != f"{B[2]} . 80"


def test_a_sync_without_change_writes_nothing_but_the_table_add() -> None:
    fake = RecordingNft()
    drv = driver(fake)
    desired = golden_state()
    drv.sync(desired)
    result = drv.sync(desired)
    assert result.operations == 1 and not result.full


def test_adopt_keeps_ids_and_does_not_flush_the_ring() -> None:
    fake = RecordingNft()
    desired = golden_state()
    first = driver(fake)
    first.sync(desired)
    before = fake.dump(first.table)
    second = driver(fake)
    result = second.sync(desired)
    assert result.full
    assert fake.dump(second.table) == before
    assert fake.last is not None
    deleted = [op for op in fake.last if op.verb == "delete"]
    assert deleted == []
    assert not any(isinstance(op.obj, Element | RingWrite) for op in fake.last)


def test_an_unknown_mark_in_conntrack_is_not_reused_after_adoption() -> None:
    fake = FakeNft()
    ct = FakeConntrack([_udp_entry(5555, B[0], mark=7)])
    drv = driver(fake, ct)
    drv.sync(state(nat("dns", B[:1], protocol=Protocol.UDP, port_set=ports(53))))
    values = set(fake.ruleset(drv.table).rings["ring_dns"])
    assert values and 7 not in values


# -- conntrack semantics ------------------------------------------------------------


def _udp_entry(sport: int, backend: str, mark: int, dport: int = 53) -> CtEntry:
    return CtEntry(
        "udp", ip_address(CLIENT), sport, ip_address(VIP), dport, ip_address(backend), dport, mark
    )


def _tcp_entry(sport: int, backend: str, mark: int, dport: int = 80) -> CtEntry:
    return replace(_udp_entry(sport, backend, mark, dport), proto="tcp", state="ESTABLISHED")


def _ids(fake: FakeNft, drv: NatDriver) -> dict[str, int]:
    rs = fake.ruleset(drv.table)
    out = {}
    for name in ("backends4", "endpoints4"):
        for e in rs.elements[name].values():
            assert e.comment is not None and e.value is not None
            out[e.value.split(" . ")[0]] = int(e.key[0])
    return out


def test_drain_keeps_flows_until_the_deadline_then_cuts_only_that_backend() -> None:
    fake, ct = FakeNft(), FakeConntrack()
    drv = driver(fake, ct)
    web = nat("web", B, protocol=Protocol.TCP_UDP, port_set=ports(80))
    drv.sync(state(web))
    ids = _ids(fake, drv)
    for i, b in enumerate(B):
        ct.add(_tcp_entry(1000 + i, b, ids[b]))
        ct.add(_udp_entry(2000 + i, b, ids[b], dport=80))
    drained = replace(
        web,
        backends=tuple(
            replace(b, admin=AdminState.DRAIN) if str(b.address) == B[0] else b
            for b in web.backends
        ),
    )
    config = Config(services=(drained,))
    drains = {("web", B[0]): 100.0}
    drv.sync(compute_desired(config, {}, drains, now=102.0))
    assert len(ct.table) == 6  # draining: flows live on
    sd = compute_desired(config, {}, drains, now=105.0)
    assert sd.services[0].backends[0].cut_flows
    drv.sync(sd)
    assert sorted(e.reply_src for e in ct.deleted) == [ip_address(B[0])] * 2
    assert len(ct.table) == 4
    ring_ids = set(fake.ruleset(drv.table).rings["ring_web"])
    assert ids[B[0]] not in ring_ids  # no new flow from the moment of the drain


def test_a_removed_backend_loses_its_udp_flows_at_once_but_not_its_tcp_flows() -> None:
    fake, ct = FakeNft(), FakeConntrack()
    drv = driver(fake, ct)
    drv.sync(state(nat("web", B, protocol=Protocol.TCP_UDP, port_set=ports(80))))
    ids = _ids(fake, drv)
    ct.add(_tcp_entry(1000, B[2], ids[B[2]]))
    ct.add(_udp_entry(2000, B[2], ids[B[2]], dport=80))
    ct.add(_udp_entry(2001, B[1], ids[B[1]], dport=80))
    drv.sync(state(nat("web", B[:2], protocol=Protocol.TCP_UDP, port_set=ports(80))))
    assert [(e.proto, e.sport) for e in ct.deleted] == [("udp", 2000)]
    assert {e.sport for e in ct.table.values()} == {1000, 2001}


def test_unhealthy_udp_backend_is_cut_and_ring_zero_to_n_clears_stale_udp_entries() -> None:
    fake, ct = FakeNft(), FakeConntrack()
    drv = driver(fake, ct)
    checked = replace(HealthSpec(), type=HealthType.UDP)
    dns = replace(
        nat("dns", B[:2], protocol=Protocol.UDP, port_set=ports(53)),
        health=checked,
        all_unhealthy=AllUnhealthy.DROP,
    )
    up = {("dns", b): True for b in B[:2]}
    drv.sync(state(dns, health=up))
    ids = _ids(fake, drv)
    ct.add(_udp_entry(3000, B[0], ids[B[0]]))
    ct.add(_udp_entry(3001, B[1], ids[B[1]]))
    drv.sync(state(dns, health={**up, ("dns", B[0]): False}))
    assert [e.sport for e in ct.deleted] == [3000]  # UDP-only: default persist cuts
    drv.sync(state(dns, health={k: False for k in up}))
    assert {e.sport for e in ct.deleted} == {3000, 3001}
    assert "ring_dns" not in fake.ruleset(drv.table).sets
    # While nothing was DNATed, a client's datagrams made an entry of their own.
    ct.add(_udp_entry(3002, VIP, mark=0))
    ct.add(_tcp_entry(3003, VIP, mark=0, dport=53))
    drv.sync(state(dns, health=up))
    assert {e.sport for e in ct.deleted} == {3000, 3001, 3002}
    assert [e.sport for e in ct.table.values()] == [3003]


def test_adoption_does_not_cut_udp_flows_of_an_existing_ring() -> None:
    fake, ct = FakeNft(), FakeConntrack()
    dns = nat("dns", B[:2], protocol=Protocol.UDP, port_set=ports(53))
    first = driver(fake, ct)
    first.sync(state(dns))
    ids = _ids(fake, first)
    ct.add(_udp_entry(3000, B[0], ids[B[0]]))
    driver(fake, ct).sync(state(dns))
    assert ct.deleted == []


def test_counters_and_flows_read_marks_from_conntrack(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, ct = FakeNft(), FakeConntrack()
    drv = driver(fake, ct)
    drv.sync(state(nat("web", B[:2], port_set=ports(80))))
    ids = _ids(fake, drv)
    ct.add(_tcp_entry(1000, B[0], ids[B[0]]))
    ct.add(_tcp_entry(1001, B[0], ids[B[0]]))
    ct.add(_tcp_entry(1002, B[1], ids[B[1]]))
    ct.add(_tcp_entry(1003, "198.18.9.9", mark=99))  # not ours
    counters = drv.counters()["web"]
    assert counters.backends[B[0]].active_flows == 2
    assert counters.backends[B[1]].active_flows == 1
    flows = drv.flows(backend=B[0])
    assert sorted(f.src_port for f in flows) == [1000, 1001]
    assert {f.dst_port for f in drv.flows("web")} == {80}
    # The daemon's rate sampler skips the conntrack walk and keeps the rest.
    monkeypatch.setattr(ct, "entries", _no_walk)
    monkeypatch.setattr(ct, "count", _no_walk)
    assert drv.counters(active_flows=False)["web"].total.active_flows == 0


def _no_walk(*args: object) -> NoReturn:
    raise AssertionError("the conntrack table was walked")


def test_a_failed_cut_is_retried_on_the_next_sync() -> None:
    fake, ct = FakeNft(), FailingConntrack()
    drv = driver(fake, ct)
    drv.sync(state(nat("web", B, protocol=Protocol.UDP, port_set=ports(53))))
    ids = _ids(fake, drv)
    ct.add(_udp_entry(4000, B[2], ids[B[2]]))
    ct.fail = True
    smaller = state(nat("web", B[:2], protocol=Protocol.UDP, port_set=ports(53)))
    with pytest.raises(DataplaneError):
        drv.sync(smaller)
    ct.fail = False
    result = drv.sync(smaller)
    assert result.full
    assert [e.sport for e in ct.deleted] == [4000]


def test_a_refused_transaction_makes_the_next_sync_full() -> None:
    fake = RecordingNft()
    drv = driver(fake)
    drv.sync(state(nat("web", B, port_set=ports(80))))
    fake.refuse = True
    with pytest.raises(DataplaneError):
        drv.sync(state(nat("web", B[:2], port_set=ports(80))))
    fake.refuse = False
    assert drv.sync(state(nat("web", B[:2], port_set=ports(80)))).full


def test_ct_filter_selects_by_every_field() -> None:
    entry = _udp_entry(5000, B[0], mark=3)
    assert CtFilter(4, mark=3, dst=ip_address(VIP), ports=ports(53), protos=("udp",)).matches(entry)
    assert not CtFilter(6).matches(entry)
    assert not CtFilter(4, mark=4).matches(entry)
    assert not CtFilter(4, dst=ip_address("198.18.0.11")).matches(entry)
    assert not CtFilter(4, ports=ports(54)).matches(entry)
    assert not CtFilter(4, protos=("tcp",)).matches(entry)
