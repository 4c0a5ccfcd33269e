"""Golden values: the Maglev hash and fill are frozen forever (multi-node agreement).

If one of these fails, a change moved flows for every deployed ring: a node
running the new code and one running the old would send the same flow to
different backends. Do not update the values; undo the change.
"""

from __future__ import annotations

import hashlib

from passlb.hashing.maglev import build_ring, permutation_params

BACKENDS = [
    ("198.18.2.11", 1),
    ("198.18.2.12", 2),
    ("198.18.2.13:8080", 1),
    ("[2001:db8::1]:443", 3),
    ("backend-with-ünïcode", 1),
]


def test_permutation_parameters_are_pinned() -> None:
    assert [permutation_params(key, 65537) for key, _ in BACKENDS] == [
        (6391, 40624),
        (9297, 53336),
        (6751, 45252),
        (23906, 19257),
        (15880, 11776),
    ]


def test_ring_bytes_are_pinned() -> None:
    ring = build_ring(BACKENDS)
    assert ring.counts() == [8192, 16384, 8192, 24577, 8192]
    assert list(ring.slots[:16]) == [2, 1, 3, 0, 1, 3, 3, 3, 1, 3, 3, 2, 1, 4, 0, 3]
    assert (
        hashlib.sha256(ring.to_bytes()).hexdigest()
        == "266321eecbf4080c8bc0a34d5073387ca357a611de38afd6a1469f8f1972afcd"
    )
