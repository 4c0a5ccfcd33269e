"""The one small interface every data plane driver (dsr, nat, proxy) offers.

The reconciler hands a driver the whole desired state of the services in its
mode; the driver makes the data plane match it in one atomic step (kernel
drivers: one nft transaction) and keeps what it last applied so the next sync
writes only what changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from passlb.model import IPAddress
from passlb.state import DesiredState


@dataclass(frozen=True)
class BackendCounters:
    packets: int = 0  # client -> backend packets forwarded (dsr: the only direction we see)
    bytes: int = 0
    new_flows: int = 0
    active_flows: int = 0  # entries in the flow table / conntrack / open proxy sessions


@dataclass(frozen=True)
class ServiceCounters:
    backends: dict[str, BackendCounters] = field(default_factory=dict)  # by Backend.key
    dropped: int = 0  # packets of new flows dropped (no backend to take them)
    # Refused or dropped traffic by reason: packets in the kernel modes, flows or
    # datagrams in the proxy (docs/protecting.md lists the reasons).
    drops: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> BackendCounters:
        vals = self.backends.values()
        return BackendCounters(
            packets=sum(b.packets for b in vals),
            bytes=sum(b.bytes for b in vals),
            new_flows=sum(b.new_flows for b in vals),
            active_flows=sum(b.active_flows for b in vals),
        )


@dataclass(frozen=True)
class Flow:
    service: str
    backend: str  # Backend.key
    protocol: str  # "tcp" | "udp"
    src: IPAddress
    src_port: int
    dst: IPAddress
    dst_port: int
    expires_in: float | None = None  # seconds until idle expiry, when the data plane knows
    # dsr IPv6 flow tables keep a 32-bit hash of the client address, not the address:
    # then src is "::" and this holds the hash.
    src_hash: int | None = None


# What a full resync found changed behind passlb's back and put back:
# (service, or "" for objects the services share, kind) -> objects repaired.
Repairs = dict[tuple[str, str], int]


def describe_repairs(repairs: Repairs) -> str:
    """'web: ring_slots 21845; (shared): elements 1', for a log line or an event."""
    by_service: dict[str, list[str]] = {}
    for (service, kind), count in sorted(repairs.items()):
        by_service.setdefault(service or "(shared)", []).append(f"{kind} {count}")
    return "; ".join(f"{service}: {', '.join(kinds)}" for service, kinds in by_service.items())


@dataclass(frozen=True)
class ApplyResult:
    full: bool  # a full resync (first sync, after a failure, or periodic) rather than a delta
    operations: int  # objects/elements written
    duration: float  # seconds
    repairs: Repairs = field(default_factory=dict)  # by a full resync (see Repairs)


class Driver(Protocol):
    """A data plane. Every method may raise passlb.errors.DataplaneError.

    Threads: ``blocking`` says where the daemon calls the methods.

    - ``blocking = True`` (dsr, nat): sync, counters, flows and close do kernel
      I/O and may take from milliseconds to seconds (a full sync of a 65,537-slot
      ring, a walk over a million flow entries). The daemon calls them in worker
      threads, never on the event loop. A sync runs in one thread at a time;
      counters and flows may run in other threads meanwhile, and must then
      see either the state before that sync or the one after it.
    - ``blocking = False`` (proxy, proxy workers): every method returns within
      a millisecond or so (a proxy worker pool waits one socketpair round trip
      per worker) and touches the event loop's own objects, so the daemon calls
      it on the event loop thread only.
    """

    name: str
    blocking: bool

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        """Make the data plane forward as `desired` says, in one atomic step.

        Services absent from `desired` are removed. Established flows to backends
        that stay are never disturbed. Backends whose BackendDesired.cut_flows is
        set lose their existing flows. After any failure the next sync is full.
        """
        ...

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        """Counters by service name, read from the data plane itself.

        `active_flows=False` lets a driver skip counting the active flows
        (BackendCounters.active_flows is then 0) where that is what a read
        costs: the kernel drivers walk every flow-table or conntrack entry
        for it (seconds for a million), while the other counters are a few
        objects. The daemon counts a blocking driver's active flows in the
        background (status says how old the count is).
        """
        ...

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        """The current flows, read from the data plane's flow table."""
        ...

    def close(self, *, cleanup: bool = False) -> None:
        """Stop managing. Kernel drivers leave forwarding in place unless cleanup."""
        ...
