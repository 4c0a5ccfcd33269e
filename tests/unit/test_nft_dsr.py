"""The dsr driver against the fake: rendered table (golden), traced packets, sync behaviour."""

from __future__ import annotations

import os
from collections import Counter as Tally
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path

import pytest

from passlb.dataplane.nft.dsr import DsrDriver
from passlb.dataplane.nft.fake import FakeNft
from passlb.dataplane.nft.testing import desired, drained, ports, service
from passlb.dataplane.nft.tracer import Packet, trace
from passlb.hashing.flowkey import L4PROTO, ring_slot
from passlb.model import AdminState, Backend, Protocol

GOLDEN = Path(__file__).parent.parent / "golden"
B = ["198.18.2.11", "198.18.2.12", "198.18.2.13"]
B6 = ["2001:2:0:2::11", "2001:2:0:2::12"]


def _driver(fake: FakeNft) -> DsrDriver:
    return DsrDriver(["eth0"], fake, table="passlb_t")


def _send(fake: FakeNft, drv: DsrDriver, pkt: Packet) -> str | None:
    """The backend address the packet is forwarded to (None: not forwarded)."""
    result = trace(fake.ruleset(drv.table), pkt, "ingress_eth0")
    if result.verdict != "fwd":
        return None
    assert result.fwd_device == "eth0"  # one-armed: out of the interface it came in on
    return result.fwd_to


def _tcp(
    sport: int, src: str = "198.18.1.10", dst: str = "198.18.0.10", dport: int = 443
) -> Packet:
    return Packet(src, dst, "tcp", sport, dport)


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PASSLB_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PASSLB_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed: diff it, then PASSLB_UPDATE_GOLDEN=1"


def test_golden_multi_service_ruleset() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    web = service("web", "198.18.0.10", B[:2], protocol=Protocol.TCP_UDP, ring_size=211)
    dns = service(
        "dns", "198.18.0.10", B[2:], protocol=Protocol.UDP, port_set=ports(53), ring_size=101
    )
    six = service("web6", "2001:2:0:ff00::10", B6, port_set=ports((8000, 8010)), ring_size=211)
    drv.sync(desired(web, dns, six))
    _check_golden("dsr_multi_service.nft", fake.dump(drv.table))


def test_new_flows_follow_the_ring_as_the_kernel_twin_predicts() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B)
    state = desired(svc)
    drv.sync(state)
    sd = state.services[0]
    assert sd.ring is not None
    seen: Tally[str] = Tally()
    for sport in range(20000, 20300):
        pkt = _tcp(sport)
        client = ip_address(pkt.src)
        slot = ring_slot(
            svc.affinity, sd.seed, svc.ring_size, client, sport, svc.vip, 443, L4PROTO["tcp"]
        )
        expected = str(sd.backends[sd.ring[slot]].address)
        got = _send(fake, drv, pkt)
        assert got == expected
        seen[got] += 1
    assert set(seen) == set(B)
    counters = drv.counters()["web"]
    assert counters.total.new_flows == 300
    assert counters.total.active_flows == 300
    # The daemon's rate sampler skips the flow-table walk and keeps the rest.
    cheap = drv.counters(active_flows=False)["web"]
    assert cheap.total.active_flows == 0
    assert {k: c.new_flows for k, c in cheap.backends.items()} == dict(seen)
    assert {k: c.new_flows for k, c in counters.backends.items()} == dict(seen)
    for sport in range(20000, 20300):  # the same flows again: established now
        _send(fake, drv, _tcp(sport))
    counters = drv.counters()["web"]
    assert {k: c.packets for k, c in counters.backends.items()} == {
        k: 2 * n for k, n in seen.items()
    }
    assert counters.total.new_flows == 300


def test_dispatch_by_vip_protocol_and_port() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    web = service("web", "198.18.0.10", B[:1], port_set=ports(443, (8000, 8100)))
    dns = service("dns", "198.18.0.10", B[1:2], protocol=Protocol.UDP, port_set=ports(53))
    everything = service("all", "198.18.0.20", B[2:], protocol=Protocol.TCP_UDP)
    everything = replace(everything, ports=replace(everything.ports, all_ports=True))
    six = service("six", "2001:2:0:ff00::10", B6[:1])
    drv.sync(desired(web, dns, everything, six))
    assert _send(fake, drv, _tcp(1000)) == B[0]
    assert _send(fake, drv, _tcp(1000, dport=8050)) == B[0]
    assert _send(fake, drv, _tcp(1000, dport=8101)) is None  # accepted: not ours
    assert _send(fake, drv, Packet("198.18.1.10", "198.18.0.10", "udp", 1000, 53)) == B[1]
    assert _send(fake, drv, Packet("198.18.1.10", "198.18.0.10", "tcp", 1000, 53)) is None
    for proto in ("tcp", "udp"):
        for port in (1, 80, 65535):
            assert _send(fake, drv, Packet("198.18.1.10", "198.18.0.20", proto, 9, port)) == B[2]
    six_pkt = Packet("2001:2:0:1::10", "2001:2:0:ff00::10", "tcp", 1000, 443)
    assert _send(fake, drv, six_pkt) == B6[0]
    flow = drv.flows("six")[0]
    assert flow.src_hash is not None and flow.backend == B6[0] and flow.dst_port == 443


def test_established_flows_stay_when_the_pool_changes_and_only_changed_slots_are_written() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B[:2], ring_size=1009)
    drv.sync(desired(svc))
    pinned = {sport: _send(fake, drv, _tcp(sport)) for sport in range(30000, 30200)}
    grown = replace(svc, backends=(*svc.backends, Backend(ip_address(B[2]))))
    result = drv.sync(desired(grown))
    assert not result.full
    # Maglev moves about a third of the slots to the new backend, nothing else.
    assert 300 < result.operations < 2 * 1009 // 2 + 50
    assert {sport: _send(fake, drv, _tcp(sport)) for sport in pinned} == pinned
    fresh = {_send(fake, drv, _tcp(sport)) for sport in range(40000, 40200)}
    assert B[2] in fresh
    assert drv.sync(desired(grown)).operations == 1  # nothing changed: only "add table"


def test_backend_ids_are_stable_and_recovered_on_adopt() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B)
    drv.sync(desired(svc))
    for sport in range(100):
        _send(fake, drv, _tcp(sport))
    ids_before = dict(fake.ruleset(drv.table).elements["backends4"])
    flows_before = dict(fake.ruleset(drv.table).elements["flows_web_tcp"])
    applied = fake.transactions

    # A new process adopts the table: same ids, flow table untouched, no full rewrite.
    again = _driver(fake)
    result = again.sync(desired(svc))
    assert result.full
    assert dict(fake.ruleset(drv.table).elements["backends4"]) == ids_before
    assert dict(fake.ruleset(drv.table).elements["flows_web_tcp"]) == flows_before
    assert fake.transactions == applied + 1
    # Removing the middle backend keeps the ids of the others.
    smaller = replace(svc, backends=(svc.backends[0], svc.backends[2]))
    again.sync(desired(smaller))
    after = fake.ruleset(drv.table).elements["backends4"]
    assert {k: e.comment for k, e in after.items()} == {
        k: e.comment for k, e in ids_before.items() if e.comment != f"web/{B[1]}"
    }


def test_an_id_leftover_flow_entries_name_is_not_given_to_a_new_backend_after_adopt() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B)
    drv.sync(desired(svc))
    for sport in range(300):
        _send(fake, drv, _tcp(sport))
    gone = drv.ids.ids[("web", B[2])]
    assert gone in {
        int(e.value or 0) for e in fake.ruleset(drv.table).elements["flows_web_tcp"].values()
    }
    # The previous run's table no longer names that backend; its flow entries remain.
    del fake.ruleset(drv.table).elements["backends4"][(str(gone),)]

    again = _driver(fake)
    grown = replace(svc, backends=(*svc.backends[:2], Backend(ip_address("198.18.2.14"))))
    again.sync(desired(grown))
    assert again.ids.ids[("web", "198.18.2.14")] != gone
    left = fake.ruleset(drv.table).elements["flows_web_tcp"].values()
    assert gone not in {int(e.value or 0) for e in left}  # cut as entries of an unknown id


def test_flow_hit_of_a_removed_backend_falls_back_to_the_ring() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B[:2])
    drv.sync(desired(svc))
    on_second = next(s for s in range(1000) if _send(fake, drv, _tcp(s)) == B[1])
    only_first = replace(svc, backends=svc.backends[:1])
    drv.sync(desired(only_first))
    assert _send(fake, drv, _tcp(on_second)) == B[0]
    assert all(f.backend == B[0] for f in drv.flows("web"))


def test_full_flow_table_still_forwards_by_the_ring() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B, flow_table_size=4)
    drv.sync(desired(svc))
    targets = [_send(fake, drv, _tcp(sport)) for sport in range(20)]
    assert all(t in B for t in targets)
    assert len(fake.ruleset(drv.table).elements["flows_web_tcp"]) == 4
    assert drv.counters()["web"].dropped == 0


def test_drain_then_disable_cuts_only_that_backends_flows() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B)
    drv.sync(desired(svc))
    before = {s: _send(fake, drv, _tcp(s)) for s in range(300)}
    drv.sync(desired(drained(svc, B[0])))
    assert {s: _send(fake, drv, _tcp(s)) for s in before} == before  # established stay
    assert B[0] not in {_send(fake, drv, _tcp(s)) for s in range(5000, 5300)}
    drv.sync(desired(drained(svc, B[0], AdminState.DISABLED)))
    left = {f.backend for f in drv.flows("web")}
    assert B[0] not in left and left == {B[1], B[2]}
    assert drv.counters()["web"].backends[B[0]].active_flows == 0


def test_no_ring_drops_new_flows_and_counts_them() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    svc = service("web", "198.18.0.10", B[:1])
    state = desired(svc)
    drv.sync(replace(state, services=(replace(state.services[0], ring=None),)))
    result = trace(fake.ruleset(drv.table), _tcp(1), "ingress_eth0")
    assert result.verdict == "drop"
    assert drv.counters()["web"].dropped == 1


def test_removed_service_is_removed_and_cleanup_deletes_the_table() -> None:
    fake = FakeNft()
    drv = _driver(fake)
    web = service("web", "198.18.0.10", B[:1])
    api = service("api", "198.18.0.11", B[1:2])
    drv.sync(desired(web, api))
    drv.sync(desired(web))
    rs = fake.ruleset(drv.table)
    assert not any("api" in name for name in [*rs.chains, *rs.sets, *rs.counters])
    assert _send(fake, drv, _tcp(1, dst="198.18.0.11")) is None
    drv.close(cleanup=True)
    assert fake.read(drv.table) is None


@pytest.mark.parametrize("name", ["web-1", "a.b", "x" * 60])
def test_odd_service_names_get_safe_nft_names(name: str) -> None:
    fake = FakeNft()
    drv = _driver(fake)
    drv.sync(desired(service(name, "198.18.0.10", B[:1])))
    assert _send(fake, drv, _tcp(7)) == B[0]


def test_every_ingress_interface_balances_and_forwards_out_of_itself() -> None:
    fake = FakeNft()
    drv = DsrDriver(["eth0", "eth1"], fake, table="passlb_t")
    drv.sync(desired(service("web", "198.18.0.10", B)))
    for device in ("eth0", "eth1"):
        pkt = replace(_tcp(40000), iif=device)
        result = trace(fake.ruleset(drv.table), pkt, f"ingress_{device}")
        assert result.verdict == "fwd"
        assert result.fwd_to in B
        assert result.fwd_device == device
