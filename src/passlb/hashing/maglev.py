"""Weighted Maglev ring: which backend owns each slot of a service's lookup table.

Algorithm: Maglev, Eisenbud et al., NSDI 2016, section 3.4. Each backend gets a
permutation of the M slots, ``permutation[j] = (offset + j * skip) mod M`` with
``offset`` and ``skip`` taken from two independent hashes of its key (M prime, so
every skip in 1..M-1 visits every slot once). Backends then take turns; at each
turn a backend claims the first still-empty slot of its permutation.

Weights, as cilium and katran do it, give a backend turns in proportion to its
weight. We first apportion the M slots by weight (largest remainder), so a
backend ends up with exactly ``floor`` or ``ceil`` of its ideal share
``M * weight / sum(weights)``: never more than one slot from it. Then the turns
are spread over rounds: in round r a backend with count c takes a turn when its
claimed slots are behind ``ceil(r * c / max_count)``. With equal weights this is
the paper's plain round robin, slot for slot.

What callers can rely on (tests/unit/test_maglev.py checks each):

* balance: every backend owns floor or ceil of ``M * weight / sum(weights)``
  slots. The ring size must be >= 100 slots per backend (paper, section 3.4),
  so with equal weights every share is within 1 % of the ideal; a weighted
  backend whose ideal share is under 100 slots is still within one slot (and one
  whose ideal share is under one slot may get none);
* disruption: when one of N equal backends leaves, its slots move plus a few of
  the others' — measured at most 0.92 % of M for N <= 300 and up to 0.99 % near
  N = 400 with M = 65537 (Maglev trades minimal disruption for balance);
* cost: ~35-45 ms for M = 65537 (any N up to 655) on a 2-core Xeon, ~70 ms for
  1000 backends in the 100003 slots they need (docs/benchmarks.md).

FROZEN FOREVER — every passlb node and every version must build the same ring
from the same backends, or flows move when a node is replaced:

* the backend key is ``Backend.key`` (see ``passlb.model``), hashed as UTF-8;
* ``offset = H("passlb/offset", key) mod M`` and
  ``skip = H("passlb/skip", key) mod (M - 1) + 1`` where ``H(person, key)``
  is BLAKE2b with an 8-byte digest, the ASCII label as its personalization
  (``person``, zero-padded to 16 bytes, no key, no salt), read as a big-endian
  unsigned integer;
* backends are sorted by key (Python ``str`` order = code point order) before the
  turns are taken, so the caller's order does not matter;
* apportionment ties go to the earlier key; within a round turns go in key order.

``tests/unit/test_maglev_golden.py`` pins the bytes of a reference ring.
"""

from __future__ import annotations

import hashlib
import math
import sys
from array import array
from collections import Counter
from collections.abc import Sequence
from itertools import compress
from operator import ne
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# numpy is imported by build_ring only: a Ring itself is plain arrays, so the
# processes that only use rings (proxy relay workers) do not load numpy (~15 MiB).

# A ring stores backend indexes in 16 bits; with M >= 100 * backends that allows
# rings of up to 6.5 million slots, far beyond what an nft map should hold.
MAX_BACKENDS = 65535

# Maglev paper, section 3.4: with M >= 100 * N no backend's share of the hash
# space differs from another's by more than 1 %.
SLOTS_PER_BACKEND = 100


class Ring:
    """An immutable table: slot number -> index into the backend sequence it was built from."""

    __slots__ = ("_backend_count", "_counts", "_slots")

    def __init__(self, slots: array[int], backend_count: int) -> None:
        if slots.typecode != "H":
            raise ValueError("a Ring stores its slots as array('H')")
        self._slots = slots
        self._backend_count = backend_count
        self._counts: tuple[int, ...] | None = None

    @classmethod
    def from_indexes(cls, indexes: Sequence[int], backend_count: int) -> Ring:
        """A ring from explicit slot values (tests, adopting a table read back from the kernel)."""
        if any(not 0 <= i < backend_count for i in indexes):
            raise ValueError(f"ring slot values must be backend indexes in 0..{backend_count - 1}")
        return cls(array("H", indexes), backend_count)

    @property
    def backend_count(self) -> int:
        """How many backends the indexes refer to (the length of the build sequence)."""
        return self._backend_count

    @property
    def slots(self) -> memoryview:
        """The table, read-only, one unsigned 16-bit backend index per slot."""
        return memoryview(self._slots).toreadonly()

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, slot: int) -> int:
        return self._slots[slot]

    def counts(self) -> list[int]:
        """How many slots each backend index owns."""
        if self._counts is None:
            # Kept: rings outlive many applies (they are cached), and each
            # apply asks every service's ring again.
            found = Counter(self._slots)
            self._counts = tuple(found[i] for i in range(self._backend_count))
        return list(self._counts)

    def diff(self, other: Ring) -> list[int]:
        """The slot numbers whose backend index differs between two rings of the same size."""
        if len(self) != len(other):
            raise ValueError(f"cannot diff rings of {len(self)} and {len(other)} slots")
        return list(compress(range(len(self)), map(ne, self._slots, other._slots)))

    def translate(self, mapping: Sequence[int], backend_count: int) -> Ring:
        """The same table with every index i replaced by mapping[i] (re-indexing backends)."""
        table = list(mapping)
        if len(table) != self._backend_count or any(not 0 <= i < backend_count for i in table):
            raise ValueError("mapping must send every backend index into 0..backend_count-1")
        return Ring(array("H", map(table.__getitem__, self._slots)), backend_count)

    def to_bytes(self) -> bytes:
        """The table as little-endian u16 values: the same bytes on every machine."""
        slots = array("H", self._slots)
        if sys.byteorder == "big":
            slots.byteswap()
        return slots.tobytes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._backend_count == other._backend_count and self._slots == other._slots

    def __hash__(self) -> int:
        return hash((self._backend_count, self._slots.tobytes()))

    def __repr__(self) -> str:
        return f"Ring(size={len(self)}, counts={self.counts()})"


def build_ring(backends: Sequence[tuple[str, int]], size: int = 65537) -> Ring:
    """Build the weighted Maglev ring for ``(key, weight)`` items.

    The ring holds indexes into ``backends``. A weight of 0 keeps an item out of
    the ring (its index is never used), which lets callers index their own full
    backend list. Raises ValueError for a non-prime or too small size, duplicate
    keys, negative weights, or no item with a positive weight.
    """
    keys = [key for key, _ in backends]
    weights = [weight for _, weight in backends]
    if len(set(keys)) != len(keys):
        raise ValueError("backend keys must be unique: equal keys get equal permutations")
    if any(w < 0 for w in weights):
        raise ValueError("backend weights must be >= 0")
    members = sorted((i for i, w in enumerate(weights) if w > 0), key=lambda i: keys[i])
    if not members:
        raise ValueError("a ring needs at least one backend with weight > 0")
    if len(members) > MAX_BACKENDS:
        raise ValueError(f"a ring holds at most {MAX_BACKENDS} backends")
    if not _is_prime(size):
        raise ValueError(f"ring size {size} must be prime (Maglev skips must visit every slot)")
    if size < SLOTS_PER_BACKEND * len(members):
        raise ValueError(
            f"ring size {size} is below {SLOTS_PER_BACKEND} slots per backend for "
            f"{len(members)} backends: the Maglev paper's bound for <= 1 % imbalance"
        )
    import numpy as np

    counts = _apportion(size, [weights[i] for i in members])
    offsets, skips = _permutation_params([keys[i] for i in members], size)
    by_member = _fill(size, offsets, skips, _turn_order(counts))
    return _ring_from_numpy(np.asarray(members, dtype=np.int64)[by_member], len(backends))


def permutation_params(key: str, size: int) -> tuple[int, int]:
    """(offset, skip) of one backend key: the frozen hash described in the module docstring."""
    return _hash_to_int("passlb/offset", key) % size, (
        _hash_to_int("passlb/skip", key) % (size - 1) + 1
    )


def _hash_to_int(person: str, key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=person.encode()).digest()
    return int.from_bytes(digest, "big")


def _permutation_params(keys: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    params = [permutation_params(key, size) for key in keys]
    return (
        np.fromiter((o for o, _ in params), dtype=np.int64, count=len(params)),
        np.fromiter((s for _, s in params), dtype=np.int64, count=len(params)),
    )


def _ring_from_numpy(indexes: np.ndarray, backend_count: int) -> Ring:
    import numpy as np

    slots = array("H")
    slots.frombytes(indexes.astype(np.uint16).tobytes())
    return Ring(slots, backend_count)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _apportion(size: int, weights: Sequence[int]) -> list[int]:
    """Split ``size`` slots by weight, largest remainder first (ties: earlier item)."""
    total = sum(weights)
    counts = [size * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: -(size * weights[i] % total))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return counts


def _turn_order(counts: Sequence[int]) -> np.ndarray:
    """Member of every turn, in time order: by round, then by member order.

    Member j with count c takes its t-th turn (t = 1..c) in the first round r
    where ceil(r * c / max_count) >= t, i.e. r = (t - 1) * max_count // c + 1.
    """
    import numpy as np

    count = np.asarray(counts, dtype=np.int64)
    most = int(count.max())
    member = np.repeat(np.arange(len(count), dtype=np.int64), count)
    turn = np.arange(len(member), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    round_ = turn * most // count[member] + 1
    return member[np.argsort(round_ * len(count) + member, kind="stable")]


def _fill(size: int, offsets: np.ndarray, skips: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Play the Maglev turns: slot -> member, exactly as the paper's loop does.

    Most of the loop's probes land in its last few hundred turns, when each turn
    scans past ~size/empty taken slots. So once the empty slots x the members
    still to play fit a small matrix, the tail switches to precomputed lists:
    every remaining member's empty slots in its own permutation order.
    """
    import numpy as np

    table = [0] * size  # member + 1; 0 marks an empty slot
    current = offsets.tolist()  # slot at each member's next permutation position
    skip = skips.tolist()
    order = turns.tolist()
    tail_start = _tail_start(order, size)
    for j in order[:tail_start]:
        slot, step = current[j], skip[j]
        while table[slot]:
            slot += step
            if slot >= size:
                slot -= size
        table[slot] = j + 1
        slot += step
        current[j] = slot - size if slot >= size else slot
    _fill_tail(table, current, skip, order[tail_start:])
    return np.asarray(table, dtype=np.int64) - 1


# Members x empty slots in the tail's precomputed preference lists.
_TAIL_CELLS = 1 << 18


def _tail_start(order: Sequence[int], size: int) -> int:
    """The first turn from which (empty slots) x (members still to play) <= _TAIL_CELLS."""
    seen: set[int] = set()
    for start in range(size - 1, -1, -1):
        seen.add(order[start])
        if (size - start) * len(seen) > _TAIL_CELLS:
            return start + 1
    return 0


def _fill_tail(table: list[int], current: list[int], skip: list[int], order: list[int]) -> None:
    import numpy as np

    if not order:
        return
    size = len(table)
    empty = np.flatnonzero(np.asarray(table) == 0)
    members = sorted(set(order))
    start = np.asarray([current[j] for j in members], dtype=np.int64)
    inverse = np.asarray([pow(skip[j], -1, size) for j in members], dtype=np.int64)
    # Slot s sits (s - current) * skip^-1 mod size positions ahead in a permutation.
    ahead = (empty[None, :] - start[:, None]) % size * inverse[:, None] % size
    preference = np.take_along_axis(
        np.broadcast_to(empty, ahead.shape), np.argsort(ahead, axis=1), axis=1
    ).tolist()
    row = {j: preference[i] for i, j in enumerate(members)}
    cursor = dict.fromkeys(members, 0)
    for j in order:
        slots, k = row[j], cursor[j]
        while table[slots[k]]:
            k += 1
        table[slots[k]] = j + 1
        cursor[j] = k + 1
