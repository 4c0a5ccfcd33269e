"""The vocabulary shared by every layer: what the health checker knows of a
backend, and the desired state the control plane hands to data plane drivers.

Plain frozen values with no logic beyond lookups. ``control.desired`` computes
them; ``dataplane`` renders them; ``health`` and ``api`` read them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from passlb.hashing.maglev import Ring
from passlb.model import Backend, IPAddress, Service


class BackendRole(enum.StrEnum):
    ACTIVE = "active"  # in the ring: takes new flows
    STANDBY = "standby"  # healthy, not needed now: backup without failover, primary
    # during failover, or a reported weight of 0
    DRAINING = "draining"  # admin drain: no new flows, existing ones until the deadline
    DOWN = "down"  # unhealthy and not serving (not even by fail-open)
    DISABLED = "disabled"  # admin disabled: no new flows, existing ones removed


@dataclass(frozen=True)
class HealthStatus:
    """What the health checker knows of one backend."""

    healthy: bool
    weight: int | None = None  # health-reported weight (0..1000), None when not reported
    since: float = 0.0  # clock value of the last transition (for slow start)


# (service name, backend key) -> status; a backend missing from the view counts
# as healthy only when its check type is "none", else as unknown = not healthy
# until its first verdict (rule 2 in the module docstring).
HealthView = Mapping[tuple[str, str], HealthStatus]

# (service name, backend key) -> clock value at which the drain began
DrainStarts = Mapping[tuple[str, str], float]


@dataclass(frozen=True)
class RemovedBackend:
    """A backend gone from the config whose flows still drain (issue 17)."""

    backend: Backend  # as last configured
    at: float  # clock value at which its drain began: the removal, or an earlier admin drain


# (service name, backend key) -> the removed backend, while it drains
RemovedBackends = Mapping[tuple[str, str], RemovedBackend]


@dataclass(frozen=True)
class BackendDesired:
    key: str  # Backend.key
    address: IPAddress
    port: int | None
    weight: int  # the weight the ring was built with (0 when not in the ring)
    role: BackendRole
    healthy: bool
    drain_deadline: float | None = None  # clock value after which its flows are cut
    cut_flows: bool = False  # its existing flows must be removed now
    cut_udp: bool = False  # its existing UDP flows must be removed now (TCP ones stay)
    removed: bool = False  # gone from the config; kept, draining, until its flows are cut

    def cuts(self, transport: str) -> bool:
        """Whether its existing flows of this transport ("tcp" | "udp") must be removed now."""
        return self.cut_flows or (self.cut_udp and transport == "udp")


@dataclass(frozen=True)
class ServiceDesired:
    service: Service
    seed: int  # jhash seed for this service's ring lookup
    # every configured backend in config order, then the removed ones still draining
    backends: tuple[BackendDesired, ...]
    ring: Ring | None  # slot -> index into `backends`; None: drop new flows

    def backend(self, key: str) -> BackendDesired | None:
        return next((b for b in self.backends if b.key == key), None)


@dataclass(frozen=True)
class DesiredState:
    services: tuple[ServiceDesired, ...]

    def service(self, name: str) -> ServiceDesired | None:
        return next((s for s in self.services if s.service.name == name), None)
