"""What a full resync repairs: the kernel table against what passlb last wrote.

Something else may change passlb's table behind its back: an operator's `nft`
command, another program, a second daemon started by mistake. The full resync
reads the table and converges it back; `repairs` says what it found changed,
by service and kind, so the log and /metrics can say it. Pure.

Kinds: `table` (the whole table was gone), `chains`, `sets`, `counters`,
`elements` (map elements: dispatch, backends, counter maps), `ring_slots`.
Rules are not compared: the table is read back without them, and a full
resync rewrites them all anyway.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from passlb.dataplane.base import Repairs
from passlb.dataplane.nft.objects import Chain, Element, RingWrite, Set
from passlb.dataplane.nft.objects import Counter as NftCounter
from passlb.dataplane.nft.ruleset import Ruleset, converge
from passlb.dataplane.nft.transaction import Verb

# The service an object (by name, or an element's set and comment) belongs to; "" if shared.
OwnerOf = Callable[[str, str | None], str]


def repairs(believed: Ruleset, actual: Ruleset | None, owner_of: OwnerOf) -> Repairs:
    """How the kernel's table (`actual`, None: gone) differs from `believed`."""
    found: Counter[tuple[str, str]] = Counter()
    if actual is None:
        found[("", "table")] = 1
        return dict(found)
    elements: set[tuple[str, tuple[str, ...]]] = set()  # a changed value is a delete + an add
    for op in converge(actual, believed):
        obj = op.obj
        if isinstance(obj, RingWrite):
            slots = set(obj.deleted) | set(obj.added)
            found[(owner_of(obj.set, None), "ring_slots")] += len(slots)
        elif isinstance(obj, Element):
            if (obj.set, obj.key) not in elements:
                elements.add((obj.set, obj.key))
                found[(owner_of(obj.set, obj.comment), "elements")] += 1
        elif op.verb is Verb.FLUSH:
            continue  # chains are flushed to rewrite their rules, which are not compared
        elif isinstance(obj, Chain):
            found[(owner_of(obj.name, obj.comment), "chains")] += 1
        elif isinstance(obj, Set):
            found[(owner_of(obj.name, obj.comment), "sets")] += 1
        elif isinstance(obj, NftCounter):
            found[(owner_of(obj.name, obj.comment), "counters")] += 1
    return dict(found)
