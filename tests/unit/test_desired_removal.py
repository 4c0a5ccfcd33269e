"""Rule 8 of the desired state: a backend removed from the config drains (issue 17)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passlb.control.desired import compute_desired, cut_removals, update_removed
from passlb.model import AdminState, Config, ConnTracking, PersistOnUnhealthy, Protocol
from passlb.state import BackendDesired, BackendRole, RemovedBackend, ServiceDesired

from .test_desired import backend, down, healthy, service

KEYS = [f"198.18.2.{n}" for n in range(1, 9)]


def only(sd: ServiceDesired | None, key: str) -> BackendDesired:
    assert sd is not None
    found = sd.backend(key)
    assert found is not None
    return found


def slot_keys(sd: ServiceDesired | None) -> list[str]:
    assert sd is not None and sd.ring is not None
    return [sd.backends[i].key for i in sd.ring.slots]


@given(
    weights=st.lists(st.integers(1, 5), min_size=2, max_size=8),
    data=st.data(),
)
def test_removed_backends_never_change_the_ring_of_the_configured_ones(
    weights: list[int], data: st.DataObject
) -> None:
    # Nodes of a fleet and `passlb explain --config` compute the ring from the
    # config alone: a node draining a removed backend must give the same one.
    pool = [backend(n + 1, weight=w) for n, w in enumerate(weights)]
    gone = data.draw(st.sets(st.sampled_from(range(len(pool))), max_size=len(pool) - 1))
    before = Config(services=(service(*pool),))
    after = Config(services=(service(*(b for i, b in enumerate(pool) if i not in gone)),))
    removed = update_removed(before, after, {}, {}, now=10.0)
    view = healthy(*(b.key for b in pool))
    alone = compute_desired(after, view, {}, 10.0).service("web")
    draining = compute_desired(after, view, {}, 10.0, removed=removed).service("web")
    assert slot_keys(draining) == slot_keys(alone)
    assert draining is not None and alone is not None
    assert draining.backends[: len(alone.backends)] == alone.backends
    for b in draining.backends[len(alone.backends) :]:
        assert (b.role, b.weight, b.removed, b.drain_deadline) == (
            BackendRole.DRAINING,
            0,
            True,
            10.0 + draining.service.drain_timeout,
        )
    assert {b.key for b in draining.backends[len(alone.backends) :]} == {pool[i].key for i in gone}


def test_a_removed_backend_drains_until_its_deadline_then_is_cut_like_a_drain() -> None:
    b1, b2 = backend(1), backend(2)
    before = Config(services=(service(b1, b2, drain_timeout=3.0),))
    after = Config(services=(service(b1, drain_timeout=3.0),))
    removed = update_removed(before, after, {}, {}, now=100.0)
    assert removed == {("web", b2.key): RemovedBackend(b2, 100.0)}
    view = healthy(b1.key, b2.key)
    during = compute_desired(after, view, {}, 102.9, removed=removed)
    gone = only(during.service("web"), b2.key)
    assert (gone.role, gone.cut_flows, gone.drain_deadline) == (BackendRole.DRAINING, False, 103.0)
    assert list(cut_removals(during)) == []
    at_deadline = compute_desired(after, view, {}, 103.0, removed=removed)
    assert only(at_deadline.service("web"), b2.key).cut_flows
    assert list(cut_removals(at_deadline)) == [("web", b2.key)]
    # The same backend drained by the admin instead: the same values, but `removed`.
    drained = compute_desired(
        Config(
            services=(
                service(b1, dataclasses.replace(b2, admin=AdminState.DRAIN), drain_timeout=3.0),
            )
        ),
        view,
        {("web", b2.key): 100.0},
        103.0,
    )
    assert dataclasses.replace(only(at_deadline.service("web"), b2.key), removed=False) == only(
        drained.service("web"), b2.key
    )


@pytest.mark.parametrize(
    ("protocol", "persist", "cut_udp", "cut_flows"),
    [
        (Protocol.TCP, PersistOnUnhealthy.DEFAULT, False, False),
        (Protocol.TCP_UDP, PersistOnUnhealthy.DEFAULT, True, False),
        (Protocol.TCP_UDP, PersistOnUnhealthy.NEVER, True, False),
        (Protocol.TCP_UDP, PersistOnUnhealthy.ALWAYS, False, False),
        (Protocol.UDP, PersistOnUnhealthy.DEFAULT, False, True),
        (Protocol.UDP, PersistOnUnhealthy.ALWAYS, False, False),
    ],
)
def test_udp_flows_of_a_removed_backend_move_at_once_unless_they_persist(
    protocol: Protocol, persist: PersistOnUnhealthy, cut_udp: bool, cut_flows: bool
) -> None:
    b1, b2 = backend(1), backend(2)
    conntrack = ConnTracking(persist_on_unhealthy=persist)
    before = Config(services=(service(b1, b2, protocol=protocol, conntrack=conntrack),))
    after = Config(services=(service(b1, protocol=protocol, conntrack=conntrack),))
    removed = update_removed(before, after, {}, {}, now=0.0)
    gone = only(
        compute_desired(after, healthy(b1.key, b2.key), {}, 0.0, removed=removed).service("web"),
        b2.key,
    )
    assert (gone.cut_udp, gone.cut_flows) == (cut_udp, cut_flows)
    assert gone.cuts("udp") == (cut_udp or cut_flows)
    assert gone.cuts("tcp") == cut_flows


def test_update_removed_remembers_cancels_and_forgets() -> None:
    b1, b2, b3 = backend(1), backend(2), backend(3, admin=AdminState.DISABLED)
    b4 = backend(4, admin=AdminState.DRAIN)
    full = Config(services=(service(b1, b2, b3, b4),))
    alone = Config(services=(service(b1),))
    removed = update_removed(full, alone, {}, {("web", b4.key): 5.0}, now=50.0)
    # A disabled backend has no flows left; an admin drain keeps its start.
    assert removed == {
        ("web", b2.key): RemovedBackend(b2, 50.0),
        ("web", b4.key): RemovedBackend(b4, 5.0),
    }
    # Unrelated reloads keep the memory; listing a backend again cancels its drain.
    assert update_removed(alone, alone, removed, {}, now=60.0) == removed
    back = Config(services=(service(b1, b2),))
    assert update_removed(alone, back, removed, {}, now=60.0) == {
        ("web", b4.key): RemovedBackend(b4, 5.0)
    }
    # A service gone, or now of the other family, takes its removed backends along.
    other = Config(services=(service(b1, name="api"),))
    assert update_removed(alone, other, removed, {}, now=60.0) == {}
    six = Config(
        services=(
            service(
                dataclasses.replace(b1, address=IPv6Address("2001:2::11")),
                vip=IPv6Address("2001:2::10"),
            ),
        )
    )
    assert update_removed(alone, six, removed, {}, now=60.0) == {}


def test_a_removed_backend_keeps_its_last_health_verdict() -> None:
    b1, b2 = backend(1), backend(2)
    before = Config(services=(service(b1, b2, protocol=Protocol.TCP),))
    after = Config(services=(service(b1, protocol=Protocol.TCP),))
    never = ConnTracking(persist_on_unhealthy=PersistOnUnhealthy.NEVER)
    after_never = Config(services=(dataclasses.replace(after.services[0], conntrack=never),))
    removed = update_removed(before, after, {}, {}, now=0.0)
    view = {**healthy(b1.key), **down(b2.key)}
    # Rule 1 for a drained backend that is down: cut at once where flows do not persist.
    state = compute_desired(after_never, view, {}, 0.0, removed=removed)
    assert only(state.service("web"), b2.key).cut_flows
    state = compute_desired(after, view, {}, 0.0, removed=removed)
    assert not only(state.service("web"), b2.key).cut_flows
