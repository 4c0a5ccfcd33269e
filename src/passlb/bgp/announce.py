"""Which VIPs this node announces to its routers, and why: a pure function.

The rules, per VIP (a VIP may carry several services, e.g. tcp/443 and udp/443):

1. A drained node announces nothing (``passlb node drain``): the routers
   move new flows to the other nodes, while this node keeps forwarding what
   still arrives.
2. Otherwise the VIP is announced while at least one of its services keeps it:
   a service with ``announce = "always"`` always does; ``"when-serving"`` (the
   default) does while its ring has a backend for new flows; ``"never"`` never.
3. A ``when-serving`` service has no ring when every backend is unhealthy with
   ``all_unhealthy = "drop"``, or when no backend is enabled (all drained or
   disabled). Withdrawing then lets the routers send the VIP to a node that
   can serve, or nowhere, rather than into a node that drops it.

Every node with the same config and the same health verdicts reaches the same
answer, so a fleet announces and withdraws a VIP together.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from passlb.model import AdminState, Announce, IPAddress
from passlb.state import DesiredState, ServiceDesired


class Reason(enum.StrEnum):
    SERVING = "serving"  # a when-serving service has a ring
    ALWAYS = "policy always"  # an always service keeps it
    NODE_DRAINED = "node drained"
    NO_BACKEND_ENABLED = "no backend enabled"  # every backend drained or disabled
    ALL_UNHEALTHY = "all backends unhealthy"  # with all_unhealthy = "drop"
    POLICY_NEVER = "policy never"  # every service of the VIP says never


@dataclass(frozen=True)
class VipAnnouncement:
    vip: IPAddress
    announced: bool
    reason: Reason
    services: tuple[str, ...]  # every service on this VIP, in config order
    # The services whose state decided the reason (the serving ones when
    # announced, else the ones that would have kept it).
    because_of: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        """The route announced: a host route, /32 or /128."""
        return f"{self.vip}/{self.vip.max_prefixlen}"


def announcements(state: DesiredState, *, drained: bool) -> tuple[VipAnnouncement, ...]:
    """Every VIP of the desired state, announced or withdrawn, in config order."""
    by_vip: dict[IPAddress, list[ServiceDesired]] = {}
    for service in state.services:
        by_vip.setdefault(service.service.vip, []).append(service)
    return tuple(_decide(vip, services, drained) for vip, services in by_vip.items())


def _decide(vip: IPAddress, services: list[ServiceDesired], drained: bool) -> VipAnnouncement:
    names = tuple(s.service.name for s in services)
    always = tuple(s.service.name for s in services if s.service.announce is Announce.ALWAYS)
    candidates = [s for s in services if s.service.announce is Announce.WHEN_SERVING]
    serving = tuple(s.service.name for s in candidates if s.ring is not None)
    if drained:
        return VipAnnouncement(vip, False, Reason.NODE_DRAINED, names, names)
    if serving:
        return VipAnnouncement(vip, True, Reason.SERVING, names, serving)
    if always:
        return VipAnnouncement(vip, True, Reason.ALWAYS, names, always)
    if not candidates:
        return VipAnnouncement(vip, False, Reason.POLICY_NEVER, names, names)
    because = tuple(s.service.name for s in candidates)
    if any(_has_enabled_backend(s) for s in candidates):
        return VipAnnouncement(vip, False, Reason.ALL_UNHEALTHY, names, because)
    return VipAnnouncement(vip, False, Reason.NO_BACKEND_ENABLED, names, because)


def _has_enabled_backend(service: ServiceDesired) -> bool:
    return any(b.admin is AdminState.ENABLED for b in service.service.backends)
