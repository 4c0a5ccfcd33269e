"""The guard rules of one service, traced packet by packet through a fake table."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network

from passlb.dataplane.nft.conntrack import FakeConntrack
from passlb.dataplane.nft.dsr import DsrDriver
from passlb.dataplane.nft.fake import FakeNft
from passlb.dataplane.nft.guard import (
    CLIENT_RATE_LIMITED,
    FLOW_TABLE_FULL,
    NOT_ALLOWED,
    RATE_LIMITED,
    SYN_ONLY,
    collapse,
    element_text,
    reason_counters,
    render_guard,
)
from passlb.dataplane.nft.nat import NatDriver
from passlb.dataplane.nft.objects import Chain, Table
from passlb.dataplane.nft.ruleset import Ruleset
from passlb.dataplane.nft.testing import desired, ports, service
from passlb.dataplane.nft.tracer import Buckets, Packet, Trace, trace
from passlb.model import (
    Backend,
    ClientRules,
    Limits,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Refusal,
    Service,
)


def guarded(vip: str = "198.18.0.10", **changes: object) -> Service:
    svc = Service(
        name="web",
        vip=ip_address(vip),
        protocol=Protocol.TCP_UDP,
        ports=PortSet((PortRange(443, 443),)),
        mode=Mode.DSR,
        backends=(Backend(ip_address("198.18.2.11" if ":" not in vip else "2001:2::11")),),
    )
    return replace(svc, **changes)  # type: ignore[arg-type]


def table_of(svc: Service) -> Ruleset:
    """The guard in a service chain that accepts whatever it lets through."""
    guard = render_guard(svc)
    rs = Ruleset(Table("netdev", "t"))
    for s, elements in guard.sets:
        rs.add_set(s, list(elements))
    for counter in guard.counters:
        rs.add_counter(counter)
    for chain, rules in guard.chains:
        rs.add_chain(chain, list(rules))
    rs.add_chain(Chain("svc"), [*guard.client_rules, *guard.new_flow_rules, "accept"])
    return rs


def send(rs: Ruleset, src: str, proto: str = "tcp", buckets: Buckets | None = None) -> Trace:
    dst = "2001:2::10" if ":" in src else "198.18.0.10"
    return trace(rs, Packet(src, dst, proto, 40000, 443), "svc", buckets=buckets)


def packets(rs: Ruleset, counter: str) -> int:
    value = rs.counter_values.get(counter)
    return value.packets if value is not None else 0


def test_no_rules_and_no_objects_without_protection() -> None:
    guard = render_guard(guarded(mode=Mode.NAT))
    assert (guard.sets, guard.counters, guard.client_rules, guard.new_flow_rules) == ((),) * 4
    assert reason_counters(guarded(mode=Mode.NAT)) == {}
    # dsr counts the new flows its full flow table could not record, always.
    assert reason_counters(guarded()) == {FLOW_TABLE_FULL: "full_web"}


def test_allow_list_admits_its_clients_and_drops_the_rest_counted() -> None:
    svc = guarded(clients=ClientRules(allow=(ip_network("198.18.1.0/24"),)))
    rs = table_of(svc)
    counter = reason_counters(svc)[NOT_ALLOWED]
    assert send(rs, "198.18.1.7").verdict == "accept"
    assert send(rs, "198.18.9.7").verdict == "drop"
    assert send(rs, "198.18.9.8", "udp").verdict == "drop"
    assert packets(rs, counter) == 2


def test_deny_wins_over_allow() -> None:
    svc = guarded(
        clients=ClientRules(
            allow=(ip_network("198.18.0.0/15"),), deny=(ip_network("198.18.1.128/25"),)
        )
    )
    rs = table_of(svc)
    assert send(rs, "198.18.1.1").verdict == "accept"
    assert send(rs, "198.18.1.200").verdict == "drop"
    assert send(rs, "198.18.1.200", "udp").verdict == "drop"


def test_reject_resets_tcp_and_answers_udp_with_admin_prohibited() -> None:
    svc = guarded(clients=ClientRules(deny=(ip_network("198.18.1.0/24"),), refuse=Refusal.REJECT))
    rs = table_of(svc)
    tcp, udp = send(rs, "198.18.1.1"), send(rs, "198.18.1.1", "udp")
    assert (tcp.verdict, tcp.reject_with) == ("reject", "tcp reset")
    assert (udp.verdict, udp.reject_with) == ("reject", "icmpx admin-prohibited")
    assert packets(rs, reason_counters(svc)[NOT_ALLOWED]) == 2
    assert send(rs, "198.18.2.1").verdict == "accept"


def test_ipv6_lists_match_ipv6_clients() -> None:
    svc = guarded("2001:2::10", clients=ClientRules(allow=(ip_network("2001:2:0:1::/64"),)))
    rs = table_of(svc)
    assert send(rs, "2001:2:0:1::5").verdict == "accept"
    assert send(rs, "2001:2:0:2::5").verdict == "drop"


def test_overlapping_cidrs_collapse_as_an_interval_set_needs() -> None:
    networks = [ip_network("198.18.0.0/15"), ip_network("198.18.7.7/32"), ip_network("10.0.0.0/25")]
    networks.append(ip_network("10.0.0.128/25"))
    assert collapse(networks) == [ip_network("10.0.0.0/24"), ip_network("198.18.0.0/15")]
    assert element_text(ip_network("198.18.7.7/32")) == "198.18.7.7"
    assert element_text(ip_network("2001:2::/48")) == "2001:2::/48"


def test_client_rate_limits_that_client_only() -> None:
    svc = guarded(limits=Limits(client_new_flow_rate=3))
    rs = table_of(svc)
    buckets: Buckets = {}
    noisy = [send(rs, "198.18.1.1", buckets=buckets).verdict for _ in range(5)]
    assert noisy == ["accept"] * 3 + ["drop"] * 2
    assert send(rs, "198.18.1.2", buckets=buckets).verdict == "accept"
    assert packets(rs, reason_counters(svc)[CLIENT_RATE_LIMITED]) == 2


def test_service_rate_limits_every_client_together() -> None:
    svc = guarded(limits=Limits(new_flow_rate=2), clients=ClientRules(refuse=Refusal.REJECT))
    rs = table_of(svc)
    buckets: Buckets = {}
    verdicts = [send(rs, f"198.18.1.{n}", buckets=buckets).verdict for n in range(1, 5)]
    assert verdicts == ["accept", "accept", "reject", "reject"]
    assert reason_counters(svc) == {RATE_LIMITED: "rate_web", FLOW_TABLE_FULL: "full_web"}
    assert packets(rs, "rate_web") == 2


# -- in the drivers' tables ----------------------------------------------------------


def dsr_table(svc: Service) -> tuple[FakeNft, DsrDriver]:
    fake = FakeNft()
    drv = DsrDriver(["eth0"], fake, table="passlb_t")
    drv.sync(desired(svc))
    return fake, drv


def dsr_send(fake: FakeNft, drv: DsrDriver, pkt: Packet) -> Trace:
    return trace(fake.ruleset(drv.table), pkt, "ingress_eth0")


def flow_expiry(fake: FakeNft, drv: DsrDriver, sport: int) -> float | None:
    flows = fake.ruleset(drv.table).elements["flows_web_tcp"]
    return flows[("198.18.1.10", str(sport), "443")].expires


def test_dsr_keeps_a_lone_syn_briefly_and_extends_the_flow_after_the_handshake() -> None:
    svc = service("web", "198.18.0.10", ["198.18.2.11", "198.18.2.12"])
    svc = replace(svc, conntrack=replace(svc.conntrack, tcp_timeout=300, syn_timeout=3))
    fake, drv = dsr_table(svc)
    syn = Packet("198.18.1.10", "198.18.0.10", "tcp", 40000, 443, tcp_flags=frozenset({"syn"}))
    assert dsr_send(fake, drv, syn).verdict == "fwd"
    assert flow_expiry(fake, drv, 40000) == 3
    assert dsr_send(fake, drv, syn).verdict == "fwd"  # a retransmitted SYN stays brief
    assert flow_expiry(fake, drv, 40000) == 3
    ack = replace(syn, tcp_flags=frozenset({"ack"}))
    assert dsr_send(fake, drv, ack).verdict == "fwd"
    assert flow_expiry(fake, drv, 40000) == 300
    # A lone packet of any kind (a spoofed ACK) is recorded briefly too.
    assert dsr_send(fake, drv, replace(ack, sport=40001)).verdict == "fwd"
    assert flow_expiry(fake, drv, 40001) == 3


def test_dsr_without_syn_protection_records_every_flow_for_tcp_timeout() -> None:
    svc = service("web", "198.18.0.10", ["198.18.2.11"])
    svc = replace(svc, conntrack=replace(svc.conntrack, tcp_timeout=300, syn_timeout=300))
    fake, drv = dsr_table(svc)
    syn = Packet("198.18.1.10", "198.18.0.10", "tcp", 40000, 443, tcp_flags=frozenset({"syn"}))
    assert dsr_send(fake, drv, syn).verdict == "fwd"
    assert flow_expiry(fake, drv, 40000) == 300


def test_dsr_refuses_a_newly_denied_client_even_on_its_recorded_flow() -> None:
    svc = service("web", "198.18.0.10", ["198.18.2.11"])
    fake, drv = dsr_table(svc)
    pkt = Packet("198.18.1.10", "198.18.0.10", "tcp", 40000, 443)
    assert dsr_send(fake, drv, pkt).verdict == "fwd"
    denied = replace(svc, clients=ClientRules(deny=(ip_network("198.18.1.0/24"),)))
    drv.sync(desired(denied))
    assert dsr_send(fake, drv, pkt).verdict == "drop"
    assert drv.counters()["web"].drops == {
        "no_backend": 0,
        "not_allowed": 1,
        "flow_table_full": 0,
    }


def test_nat_syn_proxy_hooks_take_the_services_tcp_ports_only() -> None:
    svc = replace(
        service("web", "198.18.0.10", ["198.18.2.11"], port_set=ports(80, (8000, 8010))),
        mode=Mode.NAT,
        syn_proxy=True,
        clients=ClientRules(deny=(ip_network("198.18.66.0/24"),)),
    )
    fake, conntrack = FakeNft(), FakeConntrack()
    drv = NatDriver(fake, conntrack, table="nat_t")
    drv.sync(desired(svc))
    rs = fake.ruleset(drv.table)
    match = "ip daddr 198.18.0.10 meta l4proto tcp tcp dport { 80, 8000-8010 }"
    assert [r.rule for r in rs.rules["synproxy_raw"]] == [f"{match} {SYN_ONLY} notrack"]
    assert [r.rule for r in rs.rules["synproxy_forward"]] == [f"{match} goto synp_web"]
    assert [r.rule for r in rs.rules["output"]] == [f"{match} goto svc_web"]
    synp = [r.rule for r in rs.rules["synp_web"]]
    assert synp[0].startswith("ip saddr @denied_web")  # refused before the proxy answers
    assert any("synproxy" in rule for rule in synp[1:])
    assert not conntrack.loose
    # Without a SYN proxy the hooks go (one transaction) and conntrack is left as it was.
    drv.sync(desired(replace(svc, syn_proxy=False)))
    assert "synproxy_raw" not in fake.ruleset(drv.table).chains


def test_dsr_forwards_new_flows_a_full_flow_table_cannot_record_and_counts_them() -> None:
    svc = replace(service("web", "198.18.0.10", ["198.18.2.11"], flow_table_size=2))
    fake, drv = dsr_table(svc)
    sent = [Packet("198.18.1.10", "198.18.0.10", "tcp", 40000 + n, 443) for n in range(5)]
    assert [dsr_send(fake, drv, pkt).verdict for pkt in sent] == ["fwd"] * 5
    assert len(fake.ruleset(drv.table).elements["flows_web_tcp"]) == 2
    counters = drv.counters()["web"]
    assert counters.drops["flow_table_full"] == 3
    assert counters.total.new_flows == 5
