"""Ring map contents: kept while unchanged, written only where they changed."""

from __future__ import annotations

from array import array

from passlb.dataplane.nft.driver import RingCache
from passlb.dataplane.nft.ruleset import ring_write
from passlb.hashing.maglev import build_ring

KEYS = ["198.18.2.11", "198.18.2.12", "198.18.2.13"]


def test_an_unchanged_ring_comes_back_as_the_same_array() -> None:
    cache = RingCache()
    ring = build_ring([(k, 1) for k in KEYS], 1009)
    first = cache.values("ring_web", ring, [1, 2, 3])
    assert list(first) == [[1, 2, 3][i] for i in ring.slots]
    assert cache.values("ring_web", build_ring([(k, 1) for k in KEYS], 1009), [1, 2, 3]) is first
    renumbered = cache.values("ring_web", ring, [4, 5, 6])
    assert set(renumbered) == {4, 5, 6}
    assert set(first) == {1, 2, 3}  # not mutated


def test_a_ring_write_holds_exactly_the_changed_slots() -> None:
    before = build_ring([(k, 1) for k in KEYS], 1009)
    after = build_ring([(k, 1) for k in [*KEYS[:2], "198.18.2.14"]], 1009)
    have = RingCache().values("r", before, [1, 2, 3])
    want = RingCache().values("r", after, [1, 2, 4])
    write = ring_write("r", have, want)
    assert write is not None
    changed = set(after.diff(before)) | {s for s, i in enumerate(after.slots) if i == 2}
    assert set(write.added) == changed == set(write.deleted)
    assert all(want[s] == v for s, v in zip(write.added, write.values, strict=True))
    assert ring_write("r", have, array("I", have)) is None


def test_missing_and_extra_slots_are_added_and_deleted() -> None:
    have = array("I", [1, 0, 2, 2, 3])  # slot 1 missing, slots 3-4 beyond the new size
    write = ring_write("r", have, array("I", [1, 1, 1]))
    assert write is not None
    assert list(write.deleted) == [2, 3, 4]
    assert list(write.added) == [1, 2]
    assert list(write.values) == [1, 1]
    full = ring_write("r", None, array("I", [5, 6]))
    assert full is not None and list(full.added) == [0, 1] and not full.deleted
