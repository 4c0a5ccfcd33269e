"""Reading a ring map back from a GETSETELEM dump: whole, or met by a resize.

A hash set's dump restarts its walk for every message and skips what it
already sent; a resize between two messages reorders the walk, so the dump
repeats some slots and misses as many others (setelem.ring_from_dump)."""

from __future__ import annotations

from array import array

import pytest

from passlb.dataplane.nft.netlink import read_whole
from passlb.dataplane.nft.setelem import _ADD, _DUMPED, _elements, ring_from_dump
from passlb.errors import DataplaneError


def _message(slots: list[int], ids: list[int], template: array[int] = _DUMPED) -> bytes:
    records = template * len(slots)
    records[3::7] = array("I", slots)
    records[6::7] = array("I", ids)
    return _elements(b"t\0", b"ring_web\0", records.tobytes())


def _dump(*messages: bytes) -> list[tuple[bytes, list[tuple[int, int]]]]:
    return [(m, [(0, len(m))]) for m in messages]


def test_a_whole_dump_in_two_messages_gives_every_slot() -> None:
    ring, whole = ring_from_dump(
        _dump(_message([3, 1, 0, 2], [7, 8, 7, 9]), _message([5, 4], [9, 8], _ADD))
    )
    assert whole
    assert list(ring) == [7, 8, 9, 7, 8, 9]


def test_a_dump_that_met_a_resize_repeats_slots_and_is_not_whole() -> None:
    # The second message skipped two elements of the new walk order: slots 0 and 2
    # come again, 4 and 5 never.
    ring, whole = ring_from_dump(
        _dump(_message([3, 1, 0, 2], [7, 8, 7, 9]), _message([0, 2], [7, 9]))
    )
    assert not whole
    assert len(ring) == 4  # what it saw; the reader dumps again rather than trust it


def test_a_dump_with_a_hole_is_not_whole() -> None:
    _, whole = ring_from_dump(_dump(_message([3, 1, 0], [7, 8, 7]), _message([5, 4], [9, 8])))
    assert not whole


def test_a_dump_is_read_again_until_whole_and_given_up_on_after_a_bound() -> None:
    answers = iter([([1, 1], False), ([1, 2], True)])
    assert read_whole(lambda: next(answers), "map ring_web") == [1, 2]
    with pytest.raises(DataplaneError, match="map ring_web was resized"):
        read_whole(lambda: ([1, 1], False), "map ring_web")
