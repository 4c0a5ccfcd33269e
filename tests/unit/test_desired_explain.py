"""explain_flow: which backend a new flow reaches, computed as the data plane does."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from passlb.control.desired import compute_desired
from passlb.control.explain import explain_flow
from passlb.hashing.flowkey import ring_slot
from passlb.model import (
    Affinity,
    AllUnhealthy,
    Backend,
    Config,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import DesiredState, HealthStatus

VIP = IPv4Address("198.18.0.10")
CLIENT = IPv4Address("198.18.1.7")


def quickstart_like() -> Config:
    """examples/quickstart.toml, built directly."""
    web = Service(
        name="web",
        vip=VIP,
        protocol=Protocol.TCP,
        ports=PortSet(ranges=(PortRange(443, 443), PortRange(8000, 8100))),
        mode=Mode.DSR,
        backends=(
            Backend(IPv4Address("198.18.2.11")),
            Backend(IPv4Address("198.18.2.12"), weight=2),
            Backend(IPv4Address("198.18.2.13"), backup=True),
        ),
    )
    return Config(services=(web,))


def all_healthy(config: Config) -> DesiredState:
    view = {
        (s.name, b.key): HealthStatus(healthy=True) for s in config.services for b in s.backends
    }
    return compute_desired(config, view, {}, now=0.0)


def test_explains_a_new_flow_on_the_quickstart_service() -> None:
    state = all_healthy(quickstart_like())
    answer = explain_flow(state, CLIENT, 40000, VIP, 443, "tcp")
    sd = state.services[0]
    expected_slot = ring_slot(sd.service.affinity, sd.seed, 65537, CLIENT, 40000, VIP, 443, 6)
    assert answer.service == "web"
    assert answer.slot == expected_slot
    assert sd.ring is not None
    assert answer.backend == sd.backends[sd.ring[expected_slot]]
    assert answer.backend is not None
    assert answer.backend.key in {"198.18.2.11", "198.18.2.12"}  # never the standby backup
    assert answer.backend_port == 443  # dsr: the port is unchanged
    assert answer.hashed_fields == ("ip saddr", "th sport", "ip daddr", "th dport", "meta l4proto")
    text = str(answer)
    assert "NEW flow" in text and answer.backend.key in text and f"slot     {expected_slot}" in text


def test_flows_spread_by_weight() -> None:
    state = all_healthy(quickstart_like())
    answers = [explain_flow(state, CLIENT, port, VIP, 8042, "tcp") for port in range(1024, 4024)]
    picks = Counter(a.backend.key for a in answers if a.backend is not None)
    assert set(picks) == {"198.18.2.11", "198.18.2.12"}
    assert 0.6 < picks["198.18.2.12"] / 3000 < 0.73  # weight 2 of 3


def test_client_ip_affinity_ignores_ports() -> None:
    config = quickstart_like()
    web = config.services[0]
    state = all_healthy(Config(services=(replace(web, affinity=Affinity.CLIENT_IP),)))
    picks = {explain_flow(state, CLIENT, p, VIP, 443, "tcp").slot for p in range(2000, 2050)}
    assert len(picks) == 1


@pytest.mark.parametrize(
    ("dst", "port", "proto"),
    [("198.18.0.99", 443, "tcp"), ("198.18.0.10", 444, "tcp"), ("198.18.0.10", 443, "udp")],
)
def test_says_when_no_service_matches(dst: str, port: int, proto: str) -> None:
    answer = explain_flow(all_healthy(quickstart_like()), CLIENT, 1234, dst, port, proto)
    assert answer.service is None and answer.backend is None and answer.slot is None
    assert "no service" in str(answer)


def test_nat_maps_the_port_to_the_backend_port_or_target_port() -> None:
    nat = Service(
        name="api",
        vip=VIP,
        protocol=Protocol.TCP,
        ports=PortSet(ranges=(PortRange(80, 80),)),
        mode=Mode.NAT,
        target_port=8080,
        backends=(
            Backend(IPv4Address("198.18.2.21")),
            Backend(IPv4Address("198.18.2.22"), port=9090),
        ),
    )
    state = all_healthy(Config(services=(nat,)))
    answers = [explain_flow(state, CLIENT, p, VIP, 80, "tcp") for p in range(3000, 3100)]
    ports = {(a.backend.key, a.backend_port) for a in answers if a.backend is not None}
    assert ports == {("198.18.2.21", 8080), ("198.18.2.22:9090", 9090)}


def test_dropped_when_there_is_no_ring() -> None:
    config = quickstart_like()
    web = replace(config.services[0], all_unhealthy=AllUnhealthy.DROP)
    down = {(web.name, b.key): HealthStatus(healthy=False) for b in web.backends}
    state = compute_desired(Config(services=(web,)), down, {}, now=0.0)
    answer = explain_flow(state, CLIENT, 1, VIP, 443, "tcp")
    assert answer.service == "web" and answer.backend is None and answer.slot is not None
    assert "dropped" in str(answer)


def test_ipv6_flow() -> None:
    vip6 = IPv6Address("2001:db8::10")
    svc = Service(
        name="v6",
        vip=vip6,
        protocol=Protocol.UDP,
        ports=PortSet(all_ports=True),
        mode=Mode.DSR,
        backends=(Backend(IPv6Address("2001:db8::11")), Backend(IPv6Address("2001:db8::12"))),
    )
    state = all_healthy(Config(services=(svc,)))
    client = IPv6Address("2001:db8::7")
    answer = explain_flow(state, client, 5353, vip6, 53, "udp")
    sd = state.services[0]
    assert answer.slot == ring_slot(sd.service.affinity, sd.seed, 65537, client, 5353, vip6, 53, 17)
    assert answer.hashed_fields[0] == "ip6 saddr"
    assert "[2001:db8::1" in str(answer)


def test_refuses_unknown_protocols() -> None:
    with pytest.raises(ValueError, match="proto"):
        explain_flow(all_healthy(quickstart_like()), CLIENT, 1, VIP, 443, "sctp")


def test_explains_a_flow_on_the_quickstart_example_file() -> None:
    from passlb.config import load_config

    path = Path(__file__).parents[2] / "examples" / "quickstart.toml"
    state = all_healthy(load_config(path))
    answer = explain_flow(state, "198.18.1.7", 40000, "198.18.0.10", 443, "tcp")
    assert answer == explain_flow(all_healthy(quickstart_like()), CLIENT, 40000, VIP, 443, "tcp")
