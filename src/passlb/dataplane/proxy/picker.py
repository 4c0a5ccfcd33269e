"""Which backend takes a new flow (pure: no sockets, no clock).

Maglev uses the service's ring: the flow's slot names a backend; when SNI
routing restricts the flow to a pool, or that backend is at its connection
limit, the walk goes on to the following slots until one fits. The walk is a
function of the flow and the ring alone, so a flow keeps landing on the same
backend while the ring stands, and every pool gets its backends' ring shares.
Round-robin is the smooth weighted kind (each backend's turn comes in
proportion to its weight, interleaved); least-conn picks the lowest
connections/weight, ties broken by rotation. Both choose among ACTIVE backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from passlb.model import DEFAULT_POOL, Balance
from passlb.state import BackendDesired, BackendRole, ServiceDesired

# backend key -> connections it holds now
LoadOf = Callable[[str], int]


class BackendPicker:
    def __init__(self, desired: ServiceDesired, balance: Balance, *, limit: int | None) -> None:
        self._backends = desired.backends
        self._balance = balance
        self._limit = limit
        self._slots: Sequence[int] = desired.ring.slots if desired.ring is not None else ()
        self._pools = [_pool_of(desired, b) for b in self._backends]
        # Slot counts come from numpy; a set of 65537 slots cost ~3 ms per
        # service on every apply, most of the daemon's CPU at 100 services.
        counts = desired.ring.counts() if desired.ring is not None else []
        self._ring_members = [i for i, count in enumerate(counts) if count]
        self._active = [
            i
            for i, b in enumerate(self._backends)
            if b.role is BackendRole.ACTIVE and b.weight > 0 and desired.ring is not None
        ]
        self._current_weight: dict[int, int] = {}  # smooth weighted round-robin state
        self._rotation = 0

    @property
    def uses_ring(self) -> bool:
        return self._balance is Balance.MAGLEV

    @property
    def ring_size(self) -> int:
        return len(self._slots)

    def pick(self, pool: str | None, slot: int | None, load: LoadOf) -> BackendDesired | None:
        """The backend for a new flow, or None when no backend may take it.

        pool None: any pool. slot: the flow's ring slot (Maglev only).
        """
        if self._balance is Balance.MAGLEV:
            if slot is None:
                raise ValueError("Maglev needs the flow's ring slot")
            return self._pick_maglev(pool, slot, load)
        candidates = [i for i in self._active if self._fits(i, pool, load)]
        if not candidates:
            return None
        if self._balance is Balance.ROUND_ROBIN:
            return self._backends[self._pick_weighted_round_robin(candidates)]
        return self._backends[self._pick_least_conn(candidates, load)]

    def _fits(self, index: int, pool: str | None, load: LoadOf) -> bool:
        backend = self._backends[index]
        if pool is not None and self._pools[index] != pool:
            return False
        return self._limit is None or load(backend.key) < self._limit

    def _pick_maglev(self, pool: str | None, slot: int, load: LoadOf) -> BackendDesired | None:
        if pool is None and self._limit is None:
            return self._backends[self._slots[slot]]  # every ring member fits: no walk
        # Fast refusal keeps a saturated pool from costing a whole-ring walk.
        if not any(self._fits(i, pool, load) for i in self._ring_members):
            return None
        size = len(self._slots)
        for step in range(size):
            index = self._slots[(slot + step) % size]
            if self._fits(index, pool, load):
                return self._backends[index]
        return None

    def _pick_weighted_round_robin(self, candidates: list[int]) -> int:
        # nginx's smooth weighted round-robin: raise each by its weight, take
        # the largest, lower it by the total.
        total = 0
        best = candidates[0]
        for i in candidates:
            weight = self._backends[i].weight
            self._current_weight[i] = self._current_weight.get(i, 0) + weight
            total += weight
            if self._current_weight[i] > self._current_weight[best]:
                best = i
        self._current_weight[best] -= total
        return best

    def _pick_least_conn(self, candidates: list[int], load: LoadOf) -> int:
        self._rotation += 1
        count = len(candidates)
        rotated = [candidates[(self._rotation + k) % count] for k in range(count)]
        return min(rotated, key=lambda i: load(self._backends[i].key) / self._backends[i].weight)


def _pool_of(desired: ServiceDesired, backend: BackendDesired) -> str:
    configured = desired.service.backend(backend.key)
    return configured.pool if configured is not None else DEFAULT_POOL
