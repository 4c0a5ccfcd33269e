"""Ring.counts is computed once per ring and handed out as a fresh list."""

from __future__ import annotations

from passlb.hashing.maglev import build_ring


def test_counts_are_kept_but_callers_get_their_own_copy() -> None:
    ring = build_ring([("a", 1), ("b", 3), ("c", 0)], 1009)
    counts = ring.counts()
    assert counts == [252, 757, 0]
    counts[0] = 999  # a caller scribbling on its list
    assert ring.counts() == [252, 757, 0]
    assert ring.counts() is not ring.counts()
