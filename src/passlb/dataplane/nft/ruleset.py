"""The content of one table, and the transaction that turns one content into another.

A renderer builds the Ruleset it wants; `converge` diffs it against what is
there (what we last wrote, or what a runner read back from the kernel) and
writes only the difference: new and changed elements, rewritten chains, gone
objects. Sets flagged "dynamic" belong to the packet path (flow tables): their
elements are never flushed or diffed here, and their declaration is only
replaced when it changes.

Declarations read back from the kernel lose their `typeof` text, so every set's
comment carries a fingerprint of its declaration; a changed fingerprint is a
changed set.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import compress
from operator import ne
from typing import Protocol

from passlb.dataplane.nft.objects import (
    Chain,
    Counter,
    CounterValue,
    Element,
    RingValues,
    RingWrite,
    Rule,
    Set,
    Table,
)
from passlb.dataplane.nft.transaction import Transaction

ElementKey = tuple[str, ...]


@dataclass
class Ruleset:
    """Chains with their rules, sets with their elements, counters: one table."""

    table: Table
    chains: dict[str, Chain] = field(default_factory=dict)
    rules: dict[str, list[Rule]] = field(default_factory=dict)  # by chain, in order
    rules_known: bool = True  # False when read from the kernel (rules stay opaque)
    sets: dict[str, Set] = field(default_factory=dict)
    elements: dict[str, dict[ElementKey, Element]] = field(default_factory=dict)
    counters: dict[str, Counter] = field(default_factory=dict)
    counter_values: dict[str, CounterValue] = field(default_factory=dict)
    # Ring maps (integer slot -> mark): slot -> backend id, 0 where a slot is missing.
    # Treated as immutable: a change makes a new array.
    rings: dict[str, RingValues] = field(default_factory=dict)

    def add_chain(self, chain: Chain, rules: Sequence[str] | None = None) -> None:
        self.chains[chain.name] = chain
        self.rules[chain.name] = [Rule(chain.name, r) for r in rules or []]

    def add_set(self, s: Set, elements: list[Element] | None = None) -> None:
        self.sets[s.name] = s
        self.elements[s.name] = {e.key: e for e in elements or []}

    def add_ring(self, s: Set, values: RingValues) -> None:
        self.sets[s.name] = s
        self.rings[s.name] = values

    def add_counter(self, counter: Counter) -> None:
        self.counters[counter.name] = counter

    def copy(self) -> Ruleset:
        """A copy whose containers can change independently (the objects are frozen)."""
        return Ruleset(
            table=self.table,
            chains=dict(self.chains),
            rules={name: list(rules) for name, rules in self.rules.items()},
            rules_known=self.rules_known,
            sets=dict(self.sets),
            elements={name: dict(elems) for name, elems in self.elements.items()},
            counters=dict(self.counters),
            counter_values=dict(self.counter_values),
            rings=dict(self.rings),
        )


class NftBackend(Protocol):
    """What a driver needs from nftables: the runner and the fake both offer it."""

    def apply(self, tx: Transaction) -> None:
        """Apply every operation of `tx`, or none (raises DataplaneError)."""
        ...

    def read(self, table: Table) -> Ruleset | None:
        """The table's content (rules opaque), or None when it does not exist."""
        ...

    def read_elements(self, table: Table, set_name: str) -> list[Element]:
        """The current elements of one set (dynamic flow tables included)."""
        ...

    def read_counters(self, table: Table) -> dict[str, CounterValue]:
        """Named counters of the table, by name."""
        ...

    def count_marks(self, table: Table, map_name: str) -> dict[int, int]:
        """How many elements of a map hold each mark value ({} without the map)."""
        ...


# -- declaration fingerprints -------------------------------------------------

_FINGERPRINT = re.compile(r"^(.*?) ?\[([0-9a-f]{8})\]$")


@functools.lru_cache(maxsize=1 << 14)  # every set of every sync
def fingerprint(s: Set) -> str:
    """A short, stable digest of what a set is declared as (not its comment)."""
    decl = repr((s.key, s.value, s.typeof, sorted(s.flags), s.timeout, s.size))
    return hashlib.sha256(decl.encode()).hexdigest()[:8]


def with_fingerprint(s: Set) -> Set:
    """The set as written: its comment carries the fingerprint of its declaration."""
    tag = f"[{fingerprint(s)}]"
    return replace(s, comment=f"{s.comment} {tag}" if s.comment else tag)


def split_fingerprint(comment: str | None) -> tuple[str | None, str | None]:
    """(plain comment, fingerprint) of a comment written by with_fingerprint."""
    if comment is None:
        return None, None
    m = _FINGERPRINT.match(comment)
    if m is None:
        return comment, None
    return (m.group(1) or None), m.group(2)


def same_declaration(current: Set, desired: Set) -> bool:
    _, fp = split_fingerprint(current.comment)
    if fp is not None:
        return fp == fingerprint(desired)
    return current in (desired, with_fingerprint(desired))


# -- rings -------------------------------------------------------------------


def ring_write(name: str, have: RingValues | None, want: RingValues) -> RingWrite | None:
    """The slots to delete and add that turn ring `have` (None: empty) into `want`.

    The comparisons run in C (map, compress): a health event in a 65,537-slot
    ring is a few milliseconds here, not tens.
    """
    if have is want or have == want:
        return None
    if not have:
        return RingWrite(name, array("I"), array("I", range(len(want))), array("I", want))
    common = min(len(have), len(want))
    changed = list(compress(range(common), map(ne, have[:common], want[:common])))
    deleted = array("I", compress(changed, map(have.__getitem__, changed)))
    deleted.extend(slot for slot in range(common, len(have)) if have[slot])
    added = array("I", changed)
    added.extend(range(common, len(want)))
    return RingWrite(name, deleted, added, array("I", map(want.__getitem__, added)))


# -- converge -------------------------------------------------------------------


def same_chain(current: Chain, desired: Chain) -> bool:
    """Whether a chain read from the kernel is the one we want.

    nft 1.0.6's JSON listing omits the device of netdev base chains, so a
    listed chain without one matches on its other fields (our netdev chain
    names carry the device). Replacing it would re-register the hook for
    nothing on every adopt.
    """
    if current.device is None and desired.device is not None:
        current = replace(current, device=desired.device)
    return current == desired


def converge(
    current: Ruleset | None,
    desired: Ruleset,
    *,
    rewrite_rules: bool = False,
    tx: Transaction | None = None,
) -> Transaction:
    """The operations that turn `current` (None: no table) into `desired`.

    Order matters inside one nft transaction: chains are flushed before the sets
    their rules use are replaced, and objects are deleted last, once nothing
    refers to them any more. Rules are rewritten (flush + add, atomically) for
    chains whose rules changed, or for all chains with `rewrite_rules` or when
    `current` rules are unknown.
    """
    tx = tx if tx is not None else Transaction(desired.table)
    cur = current if current is not None else Ruleset(desired.table)
    tx.add(desired.table)

    replaced_sets = {
        name
        for name, s in desired.sets.items()
        if name in cur.sets and not same_declaration(cur.sets[name], s)
    }
    replaced_chains = {
        name
        for name, c in desired.chains.items()
        if name in cur.chains and not same_chain(cur.chains[name], c)
    }
    rewrite_all = rewrite_rules or not cur.rules_known or bool(replaced_sets)
    rewritten = {
        name
        for name in desired.chains
        if name in cur.chains
        and (rewrite_all or name in replaced_chains or cur.rules.get(name) != desired.rules[name])
    }
    gone_chains = [name for name in cur.chains if name not in desired.chains]

    # 1. Empty what will be rewritten or removed, so nothing refers to what goes.
    for name in sorted(rewritten | set(gone_chains)):
        tx.flush(cur.chains[name])
    for name in sorted(replaced_chains):
        tx.delete(cur.chains[name])
    for name in sorted(replaced_sets):
        tx.delete(cur.sets[name])

    # 2. Elements that leave or change value in sets that stay.
    for name, s in desired.sets.items():
        if s.is_dynamic or name not in cur.sets or name in replaced_sets:
            continue
        want = desired.elements.get(name, {})
        if want is cur.elements.get(name):
            continue  # the very same elements: a renderer reused them unchanged
        for key, elem in cur.elements.get(name, {}).items():
            wanted = want.get(key)
            if wanted is not elem and wanted != elem:  # identity first: rings share elements
                tx.delete(elem)

    # 3. New declarations.
    for name, chain in desired.chains.items():
        if name not in cur.chains or name in replaced_chains:
            tx.add(chain)
    for name, counter in desired.counters.items():
        if name not in cur.counters:
            tx.add(counter)
    for name, s in desired.sets.items():
        if name not in cur.sets or name in replaced_sets:
            tx.add(with_fingerprint(s))

    # 4. New and changed elements.
    for name, s in desired.sets.items():
        if s.is_dynamic:
            continue
        have = {} if name in replaced_sets else cur.elements.get(name, {})
        if have is desired.elements.get(name):
            continue
        for key, elem in desired.elements.get(name, {}).items():
            had = have.get(key)
            if had is not elem and had != elem:
                tx.add(elem)

    # 4b. Ring slots, as arrays (see RingWrite).
    for name, ring in desired.rings.items():
        write = ring_write(name, None if name in replaced_sets else cur.rings.get(name), ring)
        if write is not None:
            tx.add(write)

    # 5. Rules of new and rewritten chains.
    for name in desired.chains:
        if name not in cur.chains or name in rewritten or name in replaced_chains:
            for rule in desired.rules[name]:
                tx.add(rule)

    # 6. What is gone: sets, then chains, then counters (counter maps were emptied above).
    for name in sorted(cur.sets):
        if name not in desired.sets:
            tx.delete(cur.sets[name])
    for name in gone_chains:
        tx.delete(cur.chains[name])
    for name in sorted(cur.counters):
        if name not in desired.counters:
            tx.delete(cur.counters[name])
    return tx


def delete_table(nft: NftBackend, table: Table) -> bool:
    """Delete `table` if it exists (one transaction); whether it existed."""
    if nft.read(table) is None:
        return False
    tx = Transaction(table)
    tx.delete(table)
    nft.apply(tx)
    return True
