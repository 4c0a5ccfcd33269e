"""compute_desired: the pool rules (failover, fail-open, drain, persist, weights, slow start)."""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address
from typing import Any

import pytest

from passlb.control.desired import StateDiff, compute_desired, diff_desired, update_drain_starts
from passlb.hashing.flowkey import service_seed
from passlb.model import (
    AdminState,
    AllUnhealthy,
    Backend,
    Config,
    ConnTracking,
    HealthSpec,
    HealthType,
    Mode,
    PersistOnUnhealthy,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import BackendRole, DesiredState, HealthStatus, ServiceDesired

RING_SIZE = 1009  # prime, >= 100 x the backends used here: small rings keep tests fast


def backend(n: int, **fields: Any) -> Backend:
    return Backend(address=IPv4Address(f"198.18.2.{n}"), **fields)


def service(*backends: Backend, name: str = "web", **fields: Any) -> Service:
    settings: dict[str, Any] = {
        "vip": IPv4Address("198.18.0.10"),
        "protocol": Protocol.TCP,
        "ports": PortSet(ranges=(PortRange(443, 443),)),
        "mode": Mode.DSR,
        "ring_size": RING_SIZE,
    }
    settings.update(fields)
    return Service(name=name, backends=tuple(backends), **settings)


def healthy(*keys: str, service_name: str = "web") -> dict[tuple[str, str], HealthStatus]:
    return {(service_name, k): HealthStatus(healthy=True) for k in keys}


def down(*keys: str, service_name: str = "web") -> dict[tuple[str, str], HealthStatus]:
    return {(service_name, k): HealthStatus(healthy=False) for k in keys}


def ring_members(sd: ServiceDesired) -> set[str]:
    """Keys of the backends that own at least one slot."""
    if sd.ring is None:
        return set()
    return {sd.backends[i].key for i, count in enumerate(sd.ring.counts()) if count}


def slot_counts(sd: ServiceDesired) -> dict[str, int]:
    assert sd.ring is not None
    return {sd.backends[i].key: count for i, count in enumerate(sd.ring.counts()) if count}


P1, P2, B1, B2 = "198.18.2.1", "198.18.2.2", "198.18.2.3", "198.18.2.4"
POOL = (backend(1), backend(2), backend(3, backup=True), backend(4, backup=True))


def expected_serving(
    up: set[str], ratio: float, policy: AllUnhealthy
) -> tuple[set[str], set[str]] | None:
    """The rules as the docs state them: (ring members, standby), or None for no ring."""
    primaries, backups = {P1, P2} & up, {B1, B2} & up
    if not up:
        return ({P1, P2, B1, B2}, set()) if policy is AllUnhealthy.FAIL_OPEN else None
    primaries_suffice = primaries and len(primaries) / 2 >= ratio
    if primaries_suffice or not backups:
        return primaries, backups
    return backups, primaries


CASES = [
    (frozenset(up), ratio, policy)
    for n in range(5)
    for up in itertools.combinations((P1, P2, B1, B2), n)
    for ratio in (0.0, 0.5, 0.75, 1.0)
    for policy in AllUnhealthy
]


@pytest.mark.parametrize(("up", "ratio", "policy"), CASES)
def test_failover_and_all_unhealthy_table(
    up: frozenset[str], ratio: float, policy: AllUnhealthy
) -> None:
    svc = service(*POOL, failover_ratio=ratio, all_unhealthy=policy)
    view = healthy(*up) | down(*({P1, P2, B1, B2} - up))
    sd = compute_desired(Config(services=(svc,)), view, {}, now=0.0).services[0]
    expected = expected_serving(set(up), ratio, policy)
    if expected is None:
        assert sd.ring is None
        assert {b.role for b in sd.backends} == {BackendRole.DOWN}
        return
    serving, standby = expected
    assert ring_members(sd) == serving
    for b in sd.backends:
        if b.key in serving:
            assert b.role is BackendRole.ACTIVE and b.weight == 1
        elif b.key in standby:
            assert b.role is BackendRole.STANDBY and b.weight == 0 and b.healthy
        else:
            assert b.role is BackendRole.DOWN and not b.healthy
        assert b.healthy == (b.key in up)


@pytest.mark.parametrize(
    ("up", "ratio", "serving"),
    [
        ({P1, P2, B1, B2}, 0.0, {P1, P2}),  # all fine: primaries
        ({P2, B1, B2}, 0.0, {P2}),  # ratio 0: one primary is enough
        ({P2, B1, B2}, 0.5, {P2}),  # 1/2 is not below 0.5
        ({P2, B1, B2}, 0.75, {B1, B2}),  # 1/2 < 0.75: backups take over
        ({P2, B2}, 1.0, {B2}),  # only healthy backups serve
        ({P2}, 1.0, {P2}),  # failover with no healthy backup: primaries keep serving
        ({B1}, 0.0, {B1}),  # no primary healthy
        (set(), 0.0, {P1, P2, B1, B2}),  # fail-open: every enabled backend
    ],
)
def test_failover_examples(up: set[str], ratio: float, serving: set[str]) -> None:
    svc = service(*POOL, failover_ratio=ratio)
    view = healthy(*up) | down(*({P1, P2, B1, B2} - up))
    sd = compute_desired(Config(services=(svc,)), view, {}, now=0.0).services[0]
    assert ring_members(sd) == serving


def test_fail_open_serves_unhealthy_backends_without_cutting_flows() -> None:
    svc = service(backend(1), backend(2), protocol=Protocol.UDP)
    sd = compute_desired(Config(services=(svc,)), down(P1, P2), {}, now=0.0).services[0]
    assert ring_members(sd) == {P1, P2}
    assert all(
        b.role is BackendRole.ACTIVE and not b.healthy and not b.cut_flows for b in sd.backends
    )


def test_drained_or_disabled_primaries_do_not_trigger_failover() -> None:
    svc = service(
        backend(1),
        backend(2, admin=AdminState.DRAIN),
        backend(5, admin=AdminState.DISABLED),
        backend(3, backup=True),
        failover_ratio=0.75,
    )
    view = healthy(P1, P2, "198.18.2.5", B1)
    sd = compute_desired(Config(services=(svc,)), view, {("web", P2): 0.0}, now=1.0).services[0]
    assert ring_members(sd) == {P1}  # 1 of 1 enabled primaries is healthy


def test_drain_stops_new_flows_and_cuts_at_the_deadline() -> None:
    svc = service(backend(1), backend(2, admin=AdminState.DRAIN), drain_timeout=30.0)
    config = Config(services=(svc,))
    drains = {("web", P2): 100.0}
    for now, cut in ((100.0, False), (129.9, False), (130.0, True), (500.0, True)):
        sd = compute_desired(config, healthy(P1, P2), drains, now=now).services[0]
        drained = sd.backend(P2)
        assert drained is not None
        assert drained.role is BackendRole.DRAINING
        assert drained.weight == 0
        assert drained.drain_deadline == 130.0
        assert drained.cut_flows is cut
        assert ring_members(sd) == {P1}


def test_drain_without_a_recorded_start_has_no_deadline_yet() -> None:
    svc = service(backend(1), backend(2, admin=AdminState.DRAIN))
    sd = compute_desired(Config(services=(svc,)), healthy(P1, P2), {}, now=1e9).services[0]
    drained = sd.backend(P2)
    assert drained is not None and drained.drain_deadline is None and not drained.cut_flows


def test_update_drain_starts_records_new_drains_and_forgets_ended_ones() -> None:
    svc = service(backend(1), backend(2, admin=AdminState.DRAIN))
    config = Config(services=(svc,))
    assert update_drain_starts(config, {}, now=5.0) == {("web", P2): 5.0}
    assert update_drain_starts(config, {("web", P2): 1.0, ("web", P1): 2.0}, now=5.0) == {
        ("web", P2): 1.0
    }


def test_disabled_backend_is_cut_at_once() -> None:
    svc = service(backend(1), backend(2, admin=AdminState.DISABLED))
    sd = compute_desired(Config(services=(svc,)), healthy(P1, P2), {}, now=0.0).services[0]
    disabled = sd.backend(P2)
    assert disabled is not None
    assert (disabled.role, disabled.cut_flows, disabled.weight) == (BackendRole.DISABLED, True, 0)
    assert ring_members(sd) == {P1}


def test_drain_and_disable_never_serve_even_when_nothing_else_is_healthy() -> None:
    svc = service(backend(1, admin=AdminState.DRAIN), backend(2, admin=AdminState.DISABLED))
    sd = compute_desired(Config(services=(svc,)), healthy(P1, P2), {}, now=0.0).services[0]
    assert sd.ring is None  # fail-open covers enabled backends only


@pytest.mark.parametrize(
    ("protocol", "persist", "cut"),
    [
        (Protocol.TCP, PersistOnUnhealthy.DEFAULT, False),
        (Protocol.TCP_UDP, PersistOnUnhealthy.DEFAULT, False),
        (Protocol.UDP, PersistOnUnhealthy.DEFAULT, True),
        (Protocol.TCP, PersistOnUnhealthy.NEVER, True),
        (Protocol.UDP, PersistOnUnhealthy.NEVER, True),
        (Protocol.TCP, PersistOnUnhealthy.ALWAYS, False),
        (Protocol.UDP, PersistOnUnhealthy.ALWAYS, False),
    ],
)
def test_flows_on_unhealthy_backends_follow_persist_on_unhealthy(
    protocol: Protocol, persist: PersistOnUnhealthy, cut: bool
) -> None:
    svc = service(
        backend(1),
        backend(2),
        backend(3, admin=AdminState.DRAIN),
        protocol=protocol,
        conntrack=ConnTracking(persist_on_unhealthy=persist),
    )
    view = healthy(P1) | down(P2, B1)
    sd = compute_desired(Config(services=(svc,)), view, {("web", B1): 0.0}, now=1.0).services[0]
    unhealthy, draining = sd.backend(P2), sd.backend(B1)
    assert unhealthy is not None and draining is not None
    assert unhealthy.role is BackendRole.DOWN and unhealthy.cut_flows is cut
    assert draining.role is BackendRole.DRAINING and draining.cut_flows is cut


@pytest.mark.parametrize(
    ("check", "is_healthy"), [(HealthType.NONE, True), (HealthType.TCP, False)]
)
def test_backend_missing_from_the_view(check: HealthType, is_healthy: bool) -> None:
    svc = service(backend(1), backend(2), health=HealthSpec(type=check))
    sd = compute_desired(Config(services=(svc,)), healthy(P1), {}, now=0.0).services[0]
    missing = sd.backend(P2)
    assert missing is not None and missing.healthy is is_healthy
    assert ring_members(sd) == ({P1, P2} if is_healthy else {P1})


def test_a_backend_check_overrides_the_service_check() -> None:
    svc = service(backend(1), backend(2, health=HealthSpec(type=HealthType.NONE)))
    sd = compute_desired(Config(services=(svc,)), {}, {}, now=0.0).services[0]
    assert ring_members(sd) == {P2}


def reported(**weights: int | None) -> dict[tuple[str, str], HealthStatus]:
    keys = {"p1": P1, "p2": P2, "p3": B1}
    return {("web", keys[k]): HealthStatus(healthy=True, weight=w) for k, w in weights.items()}


THREE = (backend(1, weight=1), backend(2, weight=1), backend(3, weight=1))


def counts_for(view: dict[tuple[str, str], HealthStatus], enabled: bool = True) -> dict[str, int]:
    svc = service(*THREE)
    sd = compute_desired(Config(services=(svc,)), view, {}, 0.0, enabled).services[0]
    return slot_counts(sd)


def test_reported_weights_replace_static_ones_when_all_report() -> None:
    counts = counts_for(reported(p1=100, p2=200, p3=700))
    assert counts == {P1: 101, P2: 202, B1: 706}  # 1009 slots split 1:2:7


def test_reported_weights_are_ignored_unless_every_member_reports() -> None:
    assert counts_for(reported(p1=100, p2=200, p3=None)) == {P1: 337, P2: 336, B1: 336}


def test_reported_weights_can_be_switched_off() -> None:
    assert counts_for(reported(p1=100, p2=200, p3=700), enabled=False) == {
        P1: 337,
        P2: 336,
        B1: 336,
    }


def test_reported_weight_zero_takes_a_backend_out_of_the_ring() -> None:
    svc = service(*THREE)
    sd = compute_desired(Config(services=(svc,)), reported(p1=0, p2=5, p3=5), {}, 0.0).services[0]
    assert ring_members(sd) == {P2, B1}
    zero = sd.backend(P1)
    assert zero is not None and zero.role is BackendRole.STANDBY and zero.weight == 0


def test_all_reported_weights_zero_fall_back_to_static_weights() -> None:
    assert counts_for(reported(p1=0, p2=0, p3=0)) == {P1: 337, P2: 336, B1: 336}


@pytest.mark.parametrize(
    ("elapsed", "weight"),
    [(0.0, 1), (1.0, 1), (5.0, 5), (7.4, 7), (10.0, 10), (60.0, 10)],
)
def test_slow_start_ramps_a_recovered_backend(elapsed: float, weight: int) -> None:
    svc = service(
        backend(1, weight=10),
        backend(2, weight=10),
        health=HealthSpec(slow_start=10.0),
    )
    view = {
        ("web", P1): HealthStatus(healthy=True, since=0.0),
        ("web", P2): HealthStatus(healthy=True, since=1000.0),
    }
    sd = compute_desired(Config(services=(svc,)), view, {}, now=1000.0 + elapsed).services[0]
    ramping, settled = sd.backend(P2), sd.backend(P1)
    assert ramping is not None and settled is not None
    assert (ramping.weight, settled.weight) == (weight, 10)


def test_slow_start_applies_to_reported_weights_too() -> None:
    svc = service(backend(1), backend(2), health=HealthSpec(slow_start=100.0))
    view = {
        ("web", P1): HealthStatus(healthy=True, weight=400, since=0.0),
        ("web", P2): HealthStatus(healthy=True, weight=400, since=1000.0),
    }
    sd = compute_desired(Config(services=(svc,)), view, {}, now=1025.0).services[0]
    assert [b.weight for b in sd.backends] == [400, 100]


def test_ring_indexes_the_configured_backends_and_seed_is_the_services() -> None:
    svc = service(backend(7), backend(1, weight=3), backend(4, admin=AdminState.DISABLED))
    sd = compute_desired(
        Config(services=(svc,)), healthy(*(b.key for b in svc.backends)), {}, 0.0
    ).services[0]
    assert sd.seed == service_seed(svc)
    assert [b.key for b in sd.backends] == [b.key for b in svc.backends]
    assert sd.ring is not None and sd.ring.backend_count == 3
    assert sd.ring.counts() == [252, 757, 0]
    assert all(sd.backends[i].role is BackendRole.ACTIVE for i in set(sd.ring.slots))


def test_every_service_gets_its_own_state() -> None:
    web = service(backend(1))
    dns = service(backend(2), name="dns", protocol=Protocol.UDP, all_unhealthy=AllUnhealthy.DROP)
    state = compute_desired(Config(services=(web, dns)), healthy(P1), {}, 0.0)
    assert [s.service.name for s in state.services] == ["web", "dns"]
    dns_state = state.service("dns")
    assert dns_state is not None and dns_state.ring is None  # not in the view: unknown = down


# -- diff_desired ---------------------------------------------------------------


def state_of(
    *services: Service, view: dict[tuple[str, str], HealthStatus] | None = None
) -> DesiredState:
    everyone = {(s.name, b.key): HealthStatus(healthy=True) for s in services for b in s.backends}
    return compute_desired(Config(services=services), everyone | (view or {}), {}, now=0.0)


def owners(sd: ServiceDesired) -> list[str]:
    assert sd.ring is not None
    return [sd.backends[i].key for i in sd.ring.slots]


def moved_slots(old: ServiceDesired, new: ServiceDesired) -> set[int]:
    pairs = zip(owners(old), owners(new), strict=True)
    return {slot for slot, (before, after) in enumerate(pairs) if before != after}


def test_diff_from_nothing_adds_every_service() -> None:
    new = state_of(service(backend(1)), service(backend(2), name="dns"))
    diff = diff_desired(None, new)
    assert diff.services_added == ("web", "dns")
    assert not diff.services_removed and not diff.services_changed
    assert not diff.empty
    assert str(diff) == "+web +dns"


def test_diff_of_equal_states_is_empty() -> None:
    svc = service(backend(1), backend(2))
    diff = diff_desired(state_of(svc), state_of(svc))
    assert diff.empty
    assert diff == StateDiff()
    assert str(diff) == "no change"


def test_diff_lists_removed_services() -> None:
    web, dns = service(backend(1)), service(backend(2), name="dns")
    diff = diff_desired(state_of(web, dns), state_of(web))
    assert diff.services_removed == ("dns",)
    assert not diff.services_added and not diff.services_changed


def test_backend_going_down_changes_its_slots_and_its_entry() -> None:
    svc = service(backend(1), backend(2), backend(3))
    old = state_of(svc).services[0]
    new = state_of(svc, view=down(P2)).services[0]
    diff = diff_desired(state_of(svc), state_of(svc, view=down(P2)))
    (change,) = diff.services_changed
    moved = {
        slot for slot, (a, b) in enumerate(zip(owners(old), owners(new), strict=True)) if a != b
    }
    assert set(change.ring_slots) == moved
    assert {s for s, key in enumerate(owners(old)) if key == P2} <= moved
    assert change.backends_changed == (P2,)
    assert not change.config_changed and not change.ring_rebuilt
    assert not change.backends_added and not change.backends_removed
    assert str(diff) == f"~web({len(moved)} slots ~{P2})"


def test_ring_slots_compare_backends_by_key_not_by_position() -> None:
    before = service(backend(1), backend(2))
    after = service(backend(9), backend(1), backend(2))  # inserted first: indexes shift
    old, new = state_of(before).services[0], state_of(after).services[0]
    (change,) = diff_desired(state_of(before), state_of(after)).services_changed
    moved = {
        slot for slot, (a, b) in enumerate(zip(owners(old), owners(new), strict=True)) if a != b
    }
    assert set(change.ring_slots) == moved
    assert len(moved) < RING_SIZE / 2  # about a third moves to the newcomer, not every slot
    assert change.backends_added == ("198.18.2.9",)
    assert change.backends_changed == ()  # the others are the same, only re-indexed


def test_weight_change_shows_in_slots_and_backends() -> None:
    (change,) = diff_desired(
        state_of(service(backend(1), backend(2))),
        state_of(service(backend(1), backend(2, weight=3))),
    ).services_changed
    assert change.backends_changed == (P2,)
    assert change.ring_slots
    assert not change.config_changed  # backend settings are not service settings


def test_ring_appearing_disappearing_or_resizing_is_a_rebuild() -> None:
    svc = service(backend(1), all_unhealthy=AllUnhealthy.DROP)
    with_ring, without = state_of(svc), state_of(svc, view=down(P1))
    (gone,) = diff_desired(with_ring, without).services_changed
    assert gone.ring_rebuilt and gone.ring_slots == ()
    (back,) = diff_desired(without, with_ring).services_changed
    assert back.ring_rebuilt and back.ring_slots == tuple(range(RING_SIZE))
    (resized,) = diff_desired(
        with_ring, state_of(service(backend(1), ring_size=1013))
    ).services_changed
    assert resized.ring_rebuilt and resized.config_changed
    assert resized.ring_slots == tuple(range(1013))


def test_service_setting_change_is_a_config_change() -> None:
    (change,) = diff_desired(
        state_of(service(backend(1))), state_of(service(backend(1), drain_timeout=5.0))
    ).services_changed
    assert change.config_changed
    assert not change.ring_slots and not change.backends_changed
    assert str(change) == "web(config)"


def test_removed_backend_is_listed() -> None:
    (change,) = diff_desired(
        state_of(service(backend(1), backend(2))), state_of(service(backend(1)))
    ).services_changed
    assert change.backends_removed == (P2,)
