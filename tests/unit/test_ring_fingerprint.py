"""Ring fingerprints: equal exactly when two nodes send new flows alike."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

from passlb.control.desired import compute_desired
from passlb.control.fingerprint import NO_RING, ring_fingerprint
from passlb.model import (
    AllUnhealthy,
    Backend,
    Config,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import HealthStatus

BACKENDS = tuple(Backend(IPv4Address(f"198.18.2.{n}")) for n in (11, 12, 13))


def fingerprint(service: Service, down: tuple[str, ...] = ()) -> str:
    health = {(service.name, b.key): HealthStatus(b.key not in down) for b in service.backends}
    state = compute_desired(Config(services=(service,)), health, {}, 0.0)
    desired = state.service(service.name)
    assert desired is not None
    return ring_fingerprint(desired)


WEB = Service(
    name="web",
    vip=IPv4Address("198.18.0.10"),
    protocol=Protocol.TCP,
    ports=PortSet(ranges=(PortRange(443, 443),)),
    mode=Mode.DSR,
    backends=BACKENDS,
    ring_size=1009,
    all_unhealthy=AllUnhealthy.DROP,
)


def test_the_same_config_gives_the_same_fingerprint_in_any_backend_order() -> None:
    reordered = dataclasses.replace(WEB, backends=tuple(reversed(BACKENDS)))
    assert fingerprint(WEB) == fingerprint(reordered)
    assert len(fingerprint(WEB)) == 16 and int(fingerprint(WEB), 16) >= 0


def test_what_moves_flows_changes_it() -> None:
    base = fingerprint(WEB)
    assert fingerprint(WEB, down=(BACKENDS[0].key,)) != base
    assert fingerprint(dataclasses.replace(WEB, hash_seed=7)) != base
    assert fingerprint(dataclasses.replace(WEB, ring_size=1013)) != base
    heavier = (dataclasses.replace(BACKENDS[0], weight=2), *BACKENDS[1:])
    assert fingerprint(dataclasses.replace(WEB, backends=heavier)) != base


def test_a_backend_that_owns_no_slot_does_not_count() -> None:
    down = BACKENDS[2].key
    two = dataclasses.replace(WEB, backends=BACKENDS[:2])
    assert fingerprint(WEB, down=(down,)) == fingerprint(two)


def test_no_ring_says_none() -> None:
    assert fingerprint(WEB, down=tuple(b.key for b in BACKENDS)) == NO_RING
