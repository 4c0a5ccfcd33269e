"""The skeleton both kernel drivers (dsr, nat) share: sync, adopt, ids, ring cache, teardown.

A sync reads the table (full sync) or takes what it last wrote, adopts the
backend ids a previous run left in element comments, gives every backend an
id, renders the whole table (the mode's part), and converges the kernel to it
in one transaction; the mode adds its own flow cuts. Ring maps travel as
arrays of backend ids (`RingCache`), so a ring that did not change costs
nothing and a changed one only its changed slots.
"""

from __future__ import annotations

import contextlib
import gc
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from passlb.dataplane.base import ApplyResult, Flow, ServiceCounters
from passlb.dataplane.nft.counters import service_counters
from passlb.dataplane.nft.drift import repairs
from passlb.dataplane.nft.ids import BackendIds, Owner, parse_owner
from passlb.dataplane.nft.names import ServiceNames, check_services
from passlb.dataplane.nft.objects import RingValues, Table
from passlb.dataplane.nft.ruleset import NftBackend, Ruleset, converge, delete_table
from passlb.dataplane.nft.transaction import Transaction
from passlb.errors import DataplaneError
from passlb.hashing.maglev import Ring
from passlb.state import BackendDesired, DesiredState, ServiceDesired


class RingCache:
    """Ring map contents (slot -> backend id) kept between syncs.

    A ring whose slots and backend ids did not change comes back as the very
    same array, which `converge` skips without looking at its slots.
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Ring, tuple[int, ...], RingValues]] = {}

    def values(self, name: str, ring: Ring, backend_ids: Sequence[int]) -> RingValues:
        ids = tuple(backend_ids)
        kept = self._kept.get(name)
        if kept is not None and kept[1] == ids and (kept[0] is ring or kept[0] == ring):
            return kept[2]
        values = array("I", map(ids.__getitem__, ring.slots))
        self._kept[name] = (ring, ids, values)
        return values

    def keep_only(self, names: set[str]) -> None:
        for name in set(self._kept) - names:
            del self._kept[name]


@dataclass(frozen=True)
class SyncPlan:
    """One sync, as the mode's `write` gets it."""

    desired: DesiredState
    current: Ruleset | None  # what the kernel holds (read, or last written)
    rendered: Ruleset  # what it will hold
    tx: Transaction  # the difference
    released: dict[Owner, int]  # backend ids let go
    full: bool


class NftDriver:
    """The template: a mode supplies `render`, `owner_maps` and its cuts (`write`)."""

    name: str
    blocking = True  # kernel I/O: the daemon calls sync, counters and flows in worker threads
    owner_maps: tuple[str, ...]  # maps whose element comments name each id's owner

    def __init__(self, nft: NftBackend | None, table: Table) -> None:
        if nft is None:
            from passlb.dataplane.nft.runner import NftRunner  # the real kernel by default

            nft = NftRunner()
        self.nft = nft
        self.table = table
        self.ids = BackendIds()
        self.rings = RingCache()
        self._adopted = False
        self._applied: Ruleset | None = None  # what the kernel holds, when we are sure
        self._desired: DesiredState | None = None

    # -- the mode's part ------------------------------------------------------------

    def render(self, desired: DesiredState) -> Ruleset:
        """The whole table for `desired`; every backend it names has an id."""
        raise NotImplementedError

    def write(self, plan: SyncPlan) -> tuple[int, bool]:
        """Apply `plan.tx` with the mode's flow cuts. Returns the operations written and
        whether the kernel now holds exactly `plan.rendered` (False: the next sync is full)."""
        raise NotImplementedError

    def adopted(self, current: Ruleset | None) -> None:
        """After ids were recovered from `current`: what else the mode holds back."""

    def active_flows(self, services: Sequence[ServiceDesired]) -> dict[int, int]:
        """Active flows by backend id."""
        raise NotImplementedError

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        """The current flows, read from the flow table (dsr) or conntrack (nat)."""
        raise NotImplementedError

    # -- sync -----------------------------------------------------------------------

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        with _collection_paused():
            return self._sync(desired, full)

    def _sync(self, desired: DesiredState, full: bool) -> ApplyResult:
        started = time.monotonic()
        check_services(desired)
        believed = self._applied  # what the kernel held after the last sync, as far as we know
        full = full or believed is None
        current = self.nft.read(self.table) if full else believed
        found = repairs(believed, current, self._owner_of) if full and believed else {}
        if not self._adopted:
            self._adopt(current)
        released = self.ids.assign(
            (sd.service.name, b.key) for sd in desired.services for b in sd.backends
        )
        rendered = self.render(desired)
        self.rings.keep_only(set(rendered.rings))
        tx = converge(current, rendered, rewrite_rules=full)
        try:
            written, exact = self.write(SyncPlan(desired, current, rendered, tx, released, full))
        except DataplaneError:
            self._applied = None  # the next sync re-reads the kernel and rewrites everything
            raise
        self._applied = rendered if exact else None
        self._desired = desired
        return ApplyResult(
            full=full, operations=written, duration=time.monotonic() - started, repairs=found
        )

    def _owner_of(self, name: str, comment: str | None) -> str:
        """The service an object belongs to (drift.OwnerOf): by its comment (sets and
        counters name their service, elements "<service>/<backend>"), by its name, or
        by the backend id in it (backend_<id>); "" for the table's shared objects."""
        if comment:
            owner = parse_owner(comment)
            return owner[0] if owner is not None else comment
        for sd in self.known_services():
            names = ServiceNames.of(sd.service.name)
            if name in (names.chain, names.ring, names.drop_counter):
                return sd.service.name
        _, _, number = name.rpartition("_")
        holder = self.ids.owner(int(number)) if number.isdigit() else None
        return holder[0] if holder is not None else ""

    def _adopt(self, current: Ruleset | None) -> None:
        """Recover backend ids from a table a previous run left (kept forwarding meanwhile)."""
        self._adopted = True
        if current is not None:
            for name in self.owner_maps:
                for elem in current.elements.get(name, {}).values():
                    owner = parse_owner(elem.comment)
                    if owner is not None:
                        self.ids.adopt(owner, int(elem.key[0]))
        self.adopted(current)

    # -- reads ----------------------------------------------------------------------

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        services = self.known_services()
        active = self.active_flows(services) if active_flows else {}
        return service_counters(services, self.ids.ids, self.nft.read_counters(self.table), active)

    def known_services(self) -> tuple[ServiceDesired, ...]:
        return self._desired.services if self._desired is not None else ()

    # -- teardown -------------------------------------------------------------------

    def close(self, *, cleanup: bool = False) -> None:
        if cleanup:
            self.cleanup()
        self._applied = None

    def cleanup(self) -> None:
        """Delete the whole table: new flows are no longer balanced (nat: established
        ones keep their DNAT binding in conntrack until they end)."""
        delete_table(self.nft, self.table)
        self._applied = None
        self._desired = None


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while a sync builds its table.

    A sync allocates an object per chain, rule, counter and element (hundreds
    of thousands at 1,000 services) and frees them together; the collector
    would walk every live object several times meanwhile: half of a no-change
    sync's time at 1,000 services (0.98 -> 0.45 s). It runs after the sync.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def was_cut(previous: DesiredState | None, service: str, b: BackendDesired, transport: str) -> bool:
    """Whether the backend's flows of `transport` were already cut by the previous sync."""
    if previous is None:
        return False
    sd = previous.service(service)
    before = sd.backend(b.key) if sd is not None else None
    return before is not None and before.cuts(transport)
