"""Which VIPs a node announces: the pure rules of passlb.bgp.announce."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from passlb.bgp.announce import Reason, announcements
from passlb.control.desired import compute_desired
from passlb.model import (
    AdminState,
    AllUnhealthy,
    Announce,
    Backend,
    Config,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import HealthStatus

VIP = IPv4Address("198.18.0.10")
B1, B2 = Backend(IPv4Address("198.18.2.11")), Backend(IPv4Address("198.18.2.12"))


def service(name: str, *backends: Backend, port: int = 443, **fields: Any) -> Service:
    settings: dict[str, Any] = {
        "vip": VIP,
        "protocol": Protocol.TCP,
        "ports": PortSet(ranges=(PortRange(port, port),)),
        "mode": Mode.DSR,
        "ring_size": 1009,
        "all_unhealthy": AllUnhealthy.DROP,
    }
    settings.update(fields)
    return Service(name=name, backends=backends or (B1, B2), **settings)


def decide(
    *services: Service, down: tuple[tuple[str, str], ...] = (), drained: bool = False
) -> list[tuple[str, bool, Reason, tuple[str, ...]]]:
    health = {
        (s.name, b.key): HealthStatus(healthy=(s.name, b.key) not in down)
        for s in services
        for b in s.backends
    }
    state = compute_desired(Config(services=services), health, {}, 0.0)
    return [
        (a.prefix, a.announced, a.reason, a.because_of)
        for a in announcements(state, drained=drained)
    ]


def test_a_serving_service_announces_its_vip_as_a_host_route() -> None:
    assert decide(service("web")) == [("198.18.0.10/32", True, Reason.SERVING, ("web",))]


def test_an_ipv6_vip_is_announced_as_a_128() -> None:
    v6 = Backend(IPv6Address("2001:2:0:2::11"))
    web6 = service("web6", v6, vip=IPv6Address("2001:2:0:ff00::10"))
    assert decide(web6)[0][:2] == ("2001:2:0:ff00::10/128", True)


def test_every_backend_down_with_drop_withdraws() -> None:
    down = (("web", B1.key), ("web", B2.key))
    assert decide(service("web"), down=down) == [
        ("198.18.0.10/32", False, Reason.ALL_UNHEALTHY, ("web",))
    ]


def test_one_healthy_backend_keeps_it_announced() -> None:
    assert decide(service("web"), down=(("web", B1.key),))[0][1:3] == (True, Reason.SERVING)


def test_fail_open_keeps_serving_and_so_announced() -> None:
    web = service("web", all_unhealthy=AllUnhealthy.FAIL_OPEN)
    down = (("web", B1.key), ("web", B2.key))
    assert decide(web, down=down)[0][1:3] == (True, Reason.SERVING)


@pytest.mark.parametrize("admin", [AdminState.DISABLED, AdminState.DRAIN])
def test_no_enabled_backend_withdraws_even_with_fail_open(admin: AdminState) -> None:
    off = (Backend(B1.address, admin=admin), Backend(B2.address, admin=admin))
    web = service("web", *off, all_unhealthy=AllUnhealthy.FAIL_OPEN)
    assert decide(web)[0][1:3] == (False, Reason.NO_BACKEND_ENABLED)


def test_a_drained_node_withdraws_every_vip_and_says_so() -> None:
    other = service("dns", vip=IPv4Address("198.18.0.11"))
    assert decide(service("web"), other, drained=True) == [
        ("198.18.0.10/32", False, Reason.NODE_DRAINED, ("web",)),
        ("198.18.0.11/32", False, Reason.NODE_DRAINED, ("dns",)),
    ]


def test_a_vip_stays_while_any_of_its_services_serves() -> None:
    web, alt = service("web"), service("alt", port=8443)
    down = (("web", B1.key), ("web", B2.key))
    assert decide(web, alt, down=down) == [("198.18.0.10/32", True, Reason.SERVING, ("alt",))]
    both_down = (*down, ("alt", B1.key), ("alt", B2.key))
    assert decide(web, alt, down=both_down) == [
        ("198.18.0.10/32", False, Reason.ALL_UNHEALTHY, ("web", "alt"))
    ]


def test_policy_always_announces_without_backends_and_never_never() -> None:
    down = (("web", B1.key), ("web", B2.key))
    always = service("web", announce=Announce.ALWAYS)
    assert decide(always, down=down)[0][1:3] == (True, Reason.ALWAYS)
    never = service("web", announce=Announce.NEVER)
    assert decide(never)[0][1:3] == (False, Reason.POLICY_NEVER)


def test_a_never_service_does_not_hold_a_shared_vip() -> None:
    never, web = service("never", announce=Announce.NEVER), service("web", port=8443)
    down = (("web", B1.key), ("web", B2.key))
    assert decide(never, web, down=down)[0][1:4] == (False, Reason.ALL_UNHEALTHY, ("web",))
