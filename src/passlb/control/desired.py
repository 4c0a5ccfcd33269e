"""The desired state: which backends of each service take new flows, and how.

Pure: a function of the config, a health view and the clock value it is given.
Drivers render a DesiredState into the data plane; the reconciler diffs two of
them to know what to write.

The pool rules, per service (``compute_desired`` applies them in this order):

1. Admin state first. ``disabled``: role DISABLED, flows cut at once. ``drain``:
   role DRAINING, no new flows; its flows are cut once ``now >= drain start +
   drain_timeout`` (no recorded start: no deadline yet, see
   ``update_drain_starts``) or at once when it is also unhealthy and the service
   does not let flows persist on unhealthy backends (rule 5).
2. Health. A backend missing from the health view is healthy only when its
   check type is ``none``; any other check is unknown until its first verdict and
   counts as not healthy. (The daemon seeds the view with "healthy" at start so a
   restart never empties the ring it adopts: that is its choice, not a rule here.)
3. Failover. Only enabled backends count: drained or disabled primaries are an
   operator's decision, not a failure, so they never trigger failover. With P
   enabled primaries of which H are healthy, failover happens when H == 0 or
   H / P < failover_ratio (ratio 0: only when no primary is healthy). Then the
   healthy backups serve instead; the healthy primaries become STANDBY. When no
   backup is healthy the healthy primaries keep serving (better than nothing).
4. Nobody healthy (no enabled backend, primary or backup, is healthy):
   ``fail-open`` puts every enabled backend in the ring with its static weight
   (role ACTIVE, healthy False), as cloud load balancers do; ``drop`` leaves the
   service without a ring (new flows dropped), every backend DOWN.
5. Unhealthy backends that do not serve are DOWN. Whether their established
   flows are cut follows ``conntrack.persist_on_unhealthy``: ``never`` cuts,
   ``always`` keeps, ``default`` keeps TCP flows (the backend may still finish
   them) and cuts them for UDP-only services (connectionless: the next datagram
   should reach a healthy backend).
6. Weights. Health-reported weights replace the static ones only when every
   serving backend reports one; a mix would compare numbers on two scales. A
   reported 0 keeps that backend out of the ring (role STANDBY); when all report
   0 the static weights apply instead, so healthy backends still get the traffic
   (Google's weighted NLB: weight-0 backends serve only when all are 0).
7. Slow start. A healthy serving backend whose check has ``slow_start`` > 0 and
   which turned healthy at ``since`` gets
   ``max(1, round(weight * min(1, (now - since) / slow_start)))``.

8. Removal. A backend that left the config (remembered by the caller with
   ``update_removed``) is drained as by rule 1, from its removal (or from the
   admin drain it was already in): role DRAINING, no new flows, flows cut at
   drain start + drain_timeout, or at once when rule 5 says so. Its UDP flows
   follow rule 5's UDP rule instead of the deadline: with no connection to
   finish they move at once (``cut_udp``; a UDP-only service cuts the whole
   backend), unless ``persist_on_unhealthy = "always"``. The caller forgets it
   once its cut is applied (``cut_removals``); a reload that lists it again
   cancels the drain and its flows simply continue.

The ring is built over every configured backend (weight 0 for those not
serving), then the removed ones (weight 0), so ring values index
``ServiceDesired.backends`` directly and the ring is the one the config alone
gives: a weight-0 backend takes no part in Maglev's fill.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from passlb.hashing.flowkey import service_seed
from passlb.hashing.maglev import Ring, build_ring
from passlb.model import (
    AdminState,
    AllUnhealthy,
    Backend,
    Config,
    HealthSpec,
    HealthType,
    PersistOnUnhealthy,
    Protocol,
    Service,
)
from passlb.state import (
    BackendDesired,
    BackendRole,
    DesiredState,
    DrainStarts,
    HealthStatus,
    HealthView,
    RemovedBackend,
    RemovedBackends,
    ServiceDesired,
)


def compute_desired(
    config: Config,
    health: HealthView,
    drains: DrainStarts,
    now: float,
    reported_weights_enabled: bool = True,
    removed: RemovedBackends | None = None,
) -> DesiredState:
    """The desired state of every service under the pool rules of this module's docstring.

    ``removed``: backends gone from the config that still drain (rule 8).
    """
    removed = removed or {}
    return DesiredState(
        services=tuple(
            _service_desired(
                service,
                health,
                drains,
                now,
                reported_weights_enabled,
                [r for (name, _), r in removed.items() if name == service.name],
            )
            for service in config.services
        )
    )


@functools.lru_cache(maxsize=1024)  # at most ~128 MiB of 65537-slot rings
def _cached_ring(backends: tuple[tuple[str, int], ...], size: int) -> Ring:
    """Rings are immutable and costly (tens of ms): every apply recomputes the
    whole desired state, but only a changed pool needs a new ring."""
    return build_ring(backends, size)


def update_drain_starts(
    config: Config, drains: DrainStarts, now: float
) -> dict[tuple[str, str], float]:
    """Drain starts for the backends now in admin drain: known starts kept, new ones at ``now``.

    Backends no longer draining are dropped, so a later drain starts afresh.
    """
    return {
        (service.name, backend.key): drains.get((service.name, backend.key), now)
        for service in config.services
        for backend in service.backends
        if backend.admin is AdminState.DRAIN
    }


def update_removed(
    before: Config,
    after: Config,
    removed: RemovedBackends,
    drains: DrainStarts,
    now: float,
) -> dict[tuple[str, str], RemovedBackend]:
    """The removed backends still draining once the config changes from ``before`` to ``after``.

    A backend of ``before`` that ``after`` no longer lists starts draining at
    ``now``, or keeps the start of the admin drain it was in; a disabled one
    has no flows left to drain. One listed again is forgotten: its drain is
    cancelled. So is one whose service is gone, or now of the other address
    family (its flows cannot be the new VIP's).
    """
    kept: dict[tuple[str, str], RemovedBackend] = {}
    for service in after.services:
        listed = {b.key for b in service.backends}
        previous = before.service(service.name)
        for backend in previous.backends if previous else ():
            if backend.key not in listed and backend.admin is not AdminState.DISABLED:
                start = drains.get((service.name, backend.key), now)
                kept[(service.name, backend.key)] = RemovedBackend(backend, start)
        for (name, key), entry in removed.items():
            if name == service.name and key not in listed:
                kept.setdefault((name, key), entry)
        for owner in [o for o in kept if o[0] == service.name]:
            if kept[owner].backend.address.version != service.vip.version:
                del kept[owner]
    return kept


def cut_removals(state: DesiredState) -> Iterator[tuple[str, str]]:
    """(service, backend key) of the removed backends whose flows ``state`` cuts:
    once it is applied they have nothing left to drain."""
    for sd in state.services:
        for b in sd.backends:
            if b.removed and b.cut_flows:
                yield sd.service.name, b.key


def _service_desired(
    service: Service,
    health: HealthView,
    drains: DrainStarts,
    now: float,
    reported_weights_enabled: bool,
    removed: Sequence[RemovedBackend] = (),
) -> ServiceDesired:
    configured = len(service.backends)
    # Rule 8: removed backends follow the configured ones, drained as by rule 1
    # from the start remembered.
    backends = service.backends + tuple(
        dataclasses.replace(r.backend, admin=AdminState.DRAIN) for r in removed
    )
    if removed:
        drains = {**drains, **{(service.name, r.backend.key): r.at for r in removed}}
    status = [_health_status(service, b, health) for b in backends]
    enabled = [i for i, b in enumerate(backends) if b.admin is AdminState.ENABLED]
    healthy = [i for i in enabled if status[i].healthy]
    if healthy:
        serving = _serving_pool(service, enabled, healthy)
        weights = _serving_weights(service, serving, status, now, reported_weights_enabled)
    elif service.all_unhealthy is AllUnhealthy.FAIL_OPEN:
        weights = {i: backends[i].weight for i in enabled}
    else:
        weights = {}
    in_ring = [weights.get(i, 0) for i in range(len(backends))]
    ring = (
        _cached_ring(
            tuple((b.key, w) for b, w in zip(backends, in_ring, strict=True)), service.ring_size
        )
        if any(in_ring)
        else None
    )
    return ServiceDesired(
        service=service,
        seed=service_seed(service),
        backends=tuple(
            _backend_desired(service, b, status[i], in_ring[i], drains, now)
            if i < configured
            else _removed_desired(service, _backend_desired(service, b, status[i], 0, drains, now))
            for i, b in enumerate(backends)
        ),
        ring=ring,
    )


def _removed_desired(service: Service, drained: BackendDesired) -> BackendDesired:
    """Rule 8: a removed backend drains as by rule 1, but its UDP flows move at once
    unless the service lets flows persist."""
    cut_udp = (
        "udp" in service.protocol.transports
        and service.conntrack.persist_on_unhealthy is not PersistOnUnhealthy.ALWAYS
    )
    if cut_udp and service.protocol is Protocol.UDP:
        return dataclasses.replace(drained, removed=True, cut_flows=True)
    return dataclasses.replace(drained, removed=True, cut_udp=cut_udp and not drained.cut_flows)


def _serving_pool(service: Service, enabled: Sequence[int], healthy: Sequence[int]) -> list[int]:
    """The healthy backends that take new flows: primaries, or backups on failover."""
    primaries = [i for i in enabled if not service.backends[i].backup]
    healthy_primaries = [i for i in healthy if not service.backends[i].backup]
    healthy_backups = [i for i in healthy if service.backends[i].backup]
    failover = not healthy_primaries or (
        len(healthy_primaries) < service.failover_ratio * len(primaries)
    )
    return healthy_backups if failover and healthy_backups else healthy_primaries


def _serving_weights(
    service: Service,
    serving: Sequence[int],
    status: Sequence[HealthStatus],
    now: float,
    reported_weights_enabled: bool,
) -> dict[int, int]:
    """Ring weight of each serving backend: static or reported, then slow start."""
    weights = {i: service.backends[i].weight for i in serving}
    reported = [status[i].weight for i in serving]
    if reported_weights_enabled and all(w is not None for w in reported) and any(reported):
        weights = {i: w for i, w in zip(serving, reported, strict=True) if w}
    return {
        i: _slow_start_weight(_health_spec(service, service.backends[i]), w, status[i].since, now)
        for i, w in weights.items()
    }


def _slow_start_weight(spec: HealthSpec, weight: int, since: float, now: float) -> int:
    if spec.slow_start <= 0 or weight <= 0:
        return weight
    return max(1, round(weight * min(1.0, (now - since) / spec.slow_start)))


def _backend_desired(
    service: Service,
    backend: Backend,
    status: HealthStatus,
    weight: int,
    drains: DrainStarts,
    now: float,
) -> BackendDesired:
    desired = BackendDesired(
        key=backend.key,
        address=backend.address,
        port=backend.port,
        weight=weight,
        role=BackendRole.ACTIVE,
        healthy=status.healthy,
    )
    cut_when_unhealthy = not status.healthy and _cuts_flows_of_unhealthy(service)
    if backend.admin is AdminState.DISABLED:
        return dataclasses.replace(desired, role=BackendRole.DISABLED, cut_flows=True)
    if backend.admin is AdminState.DRAIN:
        start = drains.get((service.name, backend.key))
        deadline = None if start is None else start + service.drain_timeout
        expired = deadline is not None and now >= deadline
        return dataclasses.replace(
            desired,
            role=BackendRole.DRAINING,
            drain_deadline=deadline,
            cut_flows=expired or cut_when_unhealthy,
        )
    if weight > 0:
        return desired
    if status.healthy:
        return dataclasses.replace(desired, role=BackendRole.STANDBY)
    return dataclasses.replace(desired, role=BackendRole.DOWN, cut_flows=cut_when_unhealthy)


def _health_spec(service: Service, backend: Backend) -> HealthSpec:
    return backend.health if backend.health is not None else service.health


def _health_status(service: Service, backend: Backend, health: HealthView) -> HealthStatus:
    known = health.get((service.name, backend.key))
    if known is not None:
        return known
    return HealthStatus(healthy=_health_spec(service, backend).type is HealthType.NONE)


def _cuts_flows_of_unhealthy(service: Service) -> bool:
    """Rule 5: whether flows on an unhealthy backend are cut."""
    persist = service.conntrack.persist_on_unhealthy
    if persist is PersistOnUnhealthy.DEFAULT:
        return service.protocol is Protocol.UDP
    return persist is PersistOnUnhealthy.NEVER


@dataclass(frozen=True)
class ServiceDiff:
    """What changed in one service present in both states."""

    name: str
    config_changed: bool  # a service setting other than its backend list changed
    ring_rebuilt: bool  # the ring appeared, disappeared or changed size
    ring_slots: tuple[int, ...]  # slots whose backend changed; every slot when rebuilt
    backends_added: tuple[str, ...] = ()
    backends_removed: tuple[str, ...] = ()
    backends_changed: tuple[str, ...] = ()  # role, weight, health, deadline or cut_flows

    @property
    def empty(self) -> bool:
        return not (
            self.config_changed
            or self.ring_rebuilt
            or self.ring_slots
            or self.backends_added
            or self.backends_removed
            or self.backends_changed
        )

    def __str__(self) -> str:
        parts = []
        if self.config_changed:
            parts.append("config")
        if self.ring_rebuilt:
            parts.append("ring rebuilt")
        elif self.ring_slots:
            parts.append(f"{len(self.ring_slots)} slots")
        for label, keys in (
            ("+", self.backends_added),
            ("-", self.backends_removed),
            ("~", self.backends_changed),
        ):
            if keys:
                parts.append(label + ",".join(keys))
        return f"{self.name}({' '.join(parts)})"


@dataclass(frozen=True)
class StateDiff:
    services_added: tuple[str, ...] = ()
    services_removed: tuple[str, ...] = ()
    services_changed: tuple[ServiceDiff, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.services_added or self.services_removed or self.services_changed)

    def __str__(self) -> str:
        """One line for logs: "+web -dns ~api(12 slots ~198.18.2.11)", or "no change"."""
        if self.empty:
            return "no change"
        return " ".join(
            [f"+{name}" for name in self.services_added]
            + [f"-{name}" for name in self.services_removed]
            + [f"~{change}" for change in self.services_changed]
        )


def diff_desired(old: DesiredState | None, new: DesiredState) -> StateDiff:
    """What differs from ``old`` (None: nothing applied yet) to ``new``."""
    before = {s.service.name: s for s in old.services} if old is not None else {}
    after = {s.service.name: s for s in new.services}
    changed = []
    for name, now_service in after.items():
        if name in before:
            change = _diff_service(before[name], now_service)
            if not change.empty:
                changed.append(change)
    return StateDiff(
        services_added=tuple(n for n in after if n not in before),
        services_removed=tuple(n for n in before if n not in after),
        services_changed=tuple(changed),
    )


def _diff_service(old: ServiceDesired, new: ServiceDesired) -> ServiceDiff:
    old_backends = {b.key: b for b in old.backends}
    new_backends = {b.key: b for b in new.backends}
    rebuilt, slots = _diff_rings(old, new)
    return ServiceDiff(
        name=new.service.name,
        config_changed=(
            old.service is not new.service  # the same config object: nothing to compare
            and dataclasses.replace(old.service, backends=())
            != dataclasses.replace(new.service, backends=())
        )
        or old.seed != new.seed,
        ring_rebuilt=rebuilt,
        ring_slots=slots,
        backends_added=tuple(k for k in new_backends if k not in old_backends),
        backends_removed=tuple(k for k in old_backends if k not in new_backends),
        backends_changed=tuple(
            k for k, b in new_backends.items() if k in old_backends and old_backends[k] != b
        ),
    )


def _diff_rings(old: ServiceDesired, new: ServiceDesired) -> tuple[bool, tuple[int, ...]]:
    """(rebuilt, changed slots). Slots compare by backend key, not index, so a
    backend inserted into the config list does not make every slot look changed."""
    if old.ring is None and new.ring is None:
        return False, ()
    if new.ring is None:
        return True, ()
    if old.ring is None or len(old.ring) != len(new.ring):
        return True, tuple(range(len(new.ring)))
    if old.ring is new.ring and [b.key for b in old.backends] == [b.key for b in new.backends]:
        # The ring cache hands back the same table for an unchanged pool: the
        # common case on every apply, and translating 65537 slots costs ~1 ms.
        return False, ()
    universe = list(dict.fromkeys([b.key for b in old.backends] + [b.key for b in new.backends]))
    key_id = {key: n for n, key in enumerate(universe)}
    old_ring = old.ring.translate([key_id[b.key] for b in old.backends], len(universe))
    new_ring = new.ring.translate([key_id[b.key] for b in new.backends], len(universe))
    return False, tuple(old_ring.diff(new_ring))
