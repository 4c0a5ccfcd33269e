"""The guard rules of one service, traced packet by packet through a fake table."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network

from passlb.dataplane.nft.guard import (
    CLIENT_RATE_LIMITED,
    NOT_ALLOWED,
    RATE_LIMITED,
    collapse,
    element_text,
    reason_counters,
    render_guard,
)
from passlb.dataplane.nft.objects import Chain, Table
from passlb.dataplane.nft.ruleset import Ruleset
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


def service(vip: str = "198.18.0.10", **changes: object) -> Service:
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
    guard = render_guard(service())
    assert (guard.sets, guard.counters, guard.client_rules, guard.new_flow_rules) == ((),) * 4
    assert reason_counters(service()) == {}


def test_allow_list_admits_its_clients_and_drops_the_rest_counted() -> None:
    svc = service(clients=ClientRules(allow=(ip_network("198.18.1.0/24"),)))
    rs = table_of(svc)
    counter = reason_counters(svc)[NOT_ALLOWED]
    assert send(rs, "198.18.1.7").verdict == "accept"
    assert send(rs, "198.18.9.7").verdict == "drop"
    assert send(rs, "198.18.9.8", "udp").verdict == "drop"
    assert packets(rs, counter) == 2


def test_deny_wins_over_allow() -> None:
    svc = service(
        clients=ClientRules(
            allow=(ip_network("198.18.0.0/15"),), deny=(ip_network("198.18.1.128/25"),)
        )
    )
    rs = table_of(svc)
    assert send(rs, "198.18.1.1").verdict == "accept"
    assert send(rs, "198.18.1.200").verdict == "drop"
    assert send(rs, "198.18.1.200", "udp").verdict == "drop"


def test_reject_resets_tcp_and_answers_udp_with_admin_prohibited() -> None:
    svc = service(clients=ClientRules(deny=(ip_network("198.18.1.0/24"),), refuse=Refusal.REJECT))
    rs = table_of(svc)
    tcp, udp = send(rs, "198.18.1.1"), send(rs, "198.18.1.1", "udp")
    assert (tcp.verdict, tcp.reject_with) == ("reject", "tcp reset")
    assert (udp.verdict, udp.reject_with) == ("reject", "icmpx admin-prohibited")
    assert packets(rs, reason_counters(svc)[NOT_ALLOWED]) == 2
    assert send(rs, "198.18.2.1").verdict == "accept"


def test_ipv6_lists_match_ipv6_clients() -> None:
    svc = service("2001:2::10", clients=ClientRules(allow=(ip_network("2001:2:0:1::/64"),)))
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
    svc = service(limits=Limits(client_new_flow_rate=3))
    rs = table_of(svc)
    buckets: Buckets = {}
    noisy = [send(rs, "198.18.1.1", buckets=buckets).verdict for _ in range(5)]
    assert noisy == ["accept"] * 3 + ["drop"] * 2
    assert send(rs, "198.18.1.2", buckets=buckets).verdict == "accept"
    assert packets(rs, reason_counters(svc)[CLIENT_RATE_LIMITED]) == 2


def test_service_rate_limits_every_client_together() -> None:
    svc = service(limits=Limits(new_flow_rate=2), clients=ClientRules(refuse=Refusal.REJECT))
    rs = table_of(svc)
    buckets: Buckets = {}
    verdicts = [send(rs, f"198.18.1.{n}", buckets=buckets).verdict for n in range(1, 5)]
    assert verdicts == ["accept", "accept", "reject", "reject"]
    assert reason_counters(svc) == {RATE_LIMITED: "rate_web"}
    assert packets(rs, "rate_web") == 2
