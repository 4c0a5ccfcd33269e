"""Weighted Maglev ring: the paper's loop, balance, weights, disruption, determinism."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passlb.hashing.maglev import Ring, build_ring, permutation_params

M = 65537
BIG_M = 100003  # the smallest prime >= 100 * 1000: the ring size 1000 backends need


def keys(n: int, prefix: str = "198.18.") -> list[str]:
    return [f"{prefix}{i // 250}.{i % 250 + 1}" for i in range(n)]


def textbook_ring(backends: Sequence[tuple[str, int]], size: int) -> list[int]:
    """The paper's sequential loop (NSDI 2016, section 3.4, Pseudocode 1), weighted by
    rounds as maglev.py documents, written the plain way to check the fast one."""
    positive = (i for i, (_, w) in enumerate(backends) if w > 0)
    members = sorted(positive, key=lambda i: backends[i][0])
    weights = [backends[i][1] for i in members]
    total = sum(weights)
    counts = [size * w // total for w in weights]
    leftover = size - sum(counts)
    by_remainder = sorted(range(len(members)), key=lambda j: (-(size * weights[j] % total), j))
    for j in by_remainder[:leftover]:
        counts[j] += 1
    most = max(counts)
    params = [permutation_params(backends[i][0], size) for i in members]
    next_position = [0] * len(members)
    taken = [0] * len(members)
    table = [-1] * size
    filled = 0
    round_ = 0
    while filled < size:
        round_ += 1
        for j, (offset, skip) in enumerate(params):
            if taken[j] >= -(-round_ * counts[j] // most):  # behind ceil(r * c / max)?
                continue
            while True:
                slot = (offset + next_position[j] * skip) % size
                next_position[j] += 1
                if table[slot] < 0:
                    break
            table[slot] = members[j]
            taken[j] += 1
            filled += 1
            if filled == size:
                break
    return table


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 120),
    size=st.sampled_from([12007, 65537]),
    weights=st.lists(st.integers(0, 6), min_size=120, max_size=120),
)
def test_fast_fill_equals_the_textbook_loop(n: int, size: int, weights: list[int]) -> None:
    n = min(n, size // 100)
    backends = list(zip(keys(n), [1, *weights[1:n]], strict=True))
    assert list(build_ring(backends, size).slots) == textbook_ring(backends, size)


@pytest.mark.parametrize(("n", "size"), [(2, M), (37, M), (655, M), (1000, BIG_M)])
def test_equal_backends_get_their_share_within_one_percent(n: int, size: int) -> None:
    counts = build_ring([(k, 1) for k in keys(n)], size).counts()
    ideal = size / n
    # Each count is floor or ceil of the ideal: one slot off at most, and one
    # slot is <= 1 % of the share because size >= 100 * n (Maglev paper, 3.4).
    assert max(counts) - min(counts) <= 1
    assert all(abs(c - ideal) <= 0.01 * ideal for c in counts)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=60))
def test_weighted_counts_are_within_one_slot_of_the_ideal(weights: list[int]) -> None:
    counts = build_ring(list(zip(keys(len(weights)), weights, strict=True)), M).counts()
    total = sum(weights)
    for count, weight in zip(counts, weights, strict=True):
        ideal = M * weight / total
        assert abs(count - ideal) < 1
        if ideal >= 100:  # then one slot is within the 1 % bound too
            assert abs(count - ideal) <= 0.01 * ideal


def test_weight_zero_items_keep_their_index_but_get_no_slot() -> None:
    backends = [("a", 1), ("b", 0), ("c", 2)]
    ring = build_ring(backends, M)
    assert ring.backend_count == 3
    assert ring.counts()[1] == 0
    # The same members without the weight-0 item give the same table, re-indexed.
    alone = build_ring([("a", 1), ("c", 2)], M)
    assert ring == alone.translate([0, 2], 3)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(3, 300), removed=st.integers(0, 299))  # see the peak test below
def test_removing_a_backend_moves_its_slots_and_under_one_percent_more(
    n: int, removed: int
) -> None:
    everyone = keys(n)
    gone = everyone[removed % n]
    before = build_ring([(k, 1) for k in everyone], M)
    remaining = [k for k in everyone if k != gone]
    after = build_ring([(k, 1) for k in remaining], M)
    owner_before = [everyone[i] for i in before.slots]
    owner_after = [remaining[i] for i in after.slots]
    assert gone not in owner_after
    moved_others = sum(
        1 for b, a in zip(owner_before, owner_after, strict=True) if b != gone and b != a
    )
    assert moved_others <= 0.01 * M
    # Adding it back restores the table exactly.
    assert build_ring([(k, 1) for k in everyone], M) == before


def test_extra_disruption_near_its_peak_stays_close_to_one_percent() -> None:
    # Maglev does not promise minimal disruption: with M = 65537 the share of
    # other backends' slots that move peaks around N = 350..450 at 0.9-0.99 %
    # (measured), so this point gets a looser, documented bound.
    everyone = keys(400)
    before = build_ring([(k, 1) for k in everyone], M)
    for gone in (0, 133, 399):
        remaining = everyone[:gone] + everyone[gone + 1 :]
        after = build_ring([(k, 1) for k in remaining], M)
        moved_others = sum(
            1
            for b, a in zip(before.slots, after.slots, strict=True)
            if b != gone and everyone[b] != remaining[a]
        )
        assert moved_others <= 0.012 * M


@settings(max_examples=10, deadline=None)
@given(st.permutations(list(zip(keys(12), [1, 2, 3, 1, 1, 5, 1, 2, 1, 1, 4, 1], strict=True))))
def test_input_order_does_not_matter(shuffled: list[tuple[str, int]]) -> None:
    reference = sorted(shuffled)
    ring = build_ring(shuffled, M)
    by_key = [shuffled[i][0] for i in ring.slots]
    reference_ring = build_ring(reference, M)
    assert by_key == [reference[i][0] for i in reference_ring.slots]


SNIPPET = (
    "import hashlib; from passlb.hashing.maglev import build_ring; "
    "print(hashlib.sha256(build_ring([('198.18.2.11', 1), ('198.18.2.12', 2), "
    "('[2001:db8::1]:80', 3)]).to_bytes()).hexdigest())"
)


@pytest.mark.parametrize("hash_seed", ["0", "1", "4242"])
def test_same_ring_whatever_pythonhashseed(hash_seed: str) -> None:
    here = build_ring([("198.18.2.11", 1), ("198.18.2.12", 2), ("[2001:db8::1]:80", 3)])
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET],
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == hashlib.sha256(here.to_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("backends", "size", "message"),
    [
        ([], M, "at least one backend"),
        ([("a", 0), ("b", 0)], M, "at least one backend"),
        ([("a", 1), ("a", 2)], M, "unique"),
        ([("a", -1), ("b", 1)], M, ">= 0"),
        ([("a", 1)], 65536, "prime"),
        ([("a", 1)], 1, "prime"),
        ([(k, 1) for k in keys(656)], M, "1 % imbalance"),
        ([("a", 1), ("b", 1)], 197, "1 % imbalance"),
    ],
)
def test_invalid_input_is_refused(backends: list[tuple[str, int]], size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_ring(backends, size)


def test_ring_value_semantics() -> None:
    ring = build_ring([("a", 1), ("b", 1), ("c", 1)], 307)
    assert len(ring) == 307
    assert sorted(set(ring.slots)) == [0, 1, 2]
    assert ring[5] == ring.slots[5]
    assert sum(ring.counts()) == 307
    assert ring == build_ring([("c", 1), ("a", 1), ("b", 1)], 307).translate([2, 0, 1], 3)
    assert hash(ring) == hash(Ring.from_indexes(list(ring.slots), 3))
    with pytest.raises(TypeError):
        ring.slots[0] = 1


def test_diff_lists_exactly_the_changed_slots() -> None:
    ring = Ring.from_indexes([0, 1, 2, 0, 1], 3)
    other = Ring.from_indexes([0, 2, 2, 1, 1], 3)
    assert ring.diff(other) == [1, 3]
    assert ring.diff(ring) == []
    with pytest.raises(ValueError, match="slots"):
        ring.diff(Ring.from_indexes([0], 3))
    with pytest.raises(ValueError, match="backend indexes"):
        Ring.from_indexes([3], 3)


def test_a_thousand_rings_stay_small() -> None:
    ring = build_ring([(k, 1) for k in keys(10)], M)
    assert ring.slots.nbytes == 2 * M  # two bytes per slot: 1000 services ~ 131 MB
