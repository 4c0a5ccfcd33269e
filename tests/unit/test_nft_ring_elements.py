"""Ring map elements are rebuilt only where the ring changed."""

from __future__ import annotations

from passlb.dataplane.nft.dsr import RingCache, ring_elements
from passlb.hashing.maglev import build_ring

KEYS = ["198.18.2.11", "198.18.2.12", "198.18.2.13"]


def test_changed_ring_reuses_unchanged_elements_and_equals_a_fresh_render() -> None:
    cache: RingCache = {}
    before = build_ring([(k, 1) for k in KEYS], 1009)
    after = build_ring([(k, 1) for k in [*KEYS[:2], "198.18.2.14"]], 1009)
    first = ring_elements("ring_web", before, [1, 2, 3], cache)
    assert ring_elements("ring_web", before, [1, 2, 3], cache) is first  # unchanged: same dict

    second = ring_elements("ring_web", after, [1, 2, 3], cache)
    assert second == ring_elements("ring_web", after, [1, 2, 3], None)  # as if built anew
    changed = set(after.diff(before))
    assert 0 < len(changed) < len(after)
    for (slot_text,), element in second.items():
        reused = element is first[(slot_text,)]
        assert reused == (int(slot_text) not in changed)
    assert first == ring_elements("ring_web", before, [1, 2, 3], None)  # not mutated


def test_other_backend_ids_rebuild_every_element() -> None:
    cache: RingCache = {}
    ring = build_ring([(k, 1) for k in KEYS], 1009)
    first = ring_elements("ring_web", ring, [1, 2, 3], cache)
    renumbered = ring_elements("ring_web", ring, [4, 5, 6], cache)
    assert {e.value for e in renumbered.values()} == {"4", "5", "6"}
    assert not any(renumbered[k] is first[k] for k in first)
