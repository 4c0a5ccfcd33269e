"""FakeNft: an in-memory nftables with the runner's interface (knftables' fake.go habit).

A transaction is applied to a copy of the tables and swapped in only when every
operation succeeded, with the kernel's refusals: deleting or flushing what does
not exist, creating what exists, re-adding an element with another value,
elements of a missing set, a set past its size, removing what a rule, a verdict
map or a counter map still refers to. `dump` prints a table canonically (a valid
nft script, elements sorted) for golden files.
"""

from __future__ import annotations

import collections
import re
from array import array

from passlb.dataplane.nft.objects import (
    Chain,
    Counter,
    CounterValue,
    Element,
    RingWrite,
    Rule,
    Set,
    Table,
)
from passlb.dataplane.nft.ruleset import Ruleset
from passlb.dataplane.nft.transaction import Transaction, Verb
from passlb.errors import DataplaneError

_SET_REF = re.compile(r"@([A-Za-z][A-Za-z0-9_.]*)")
_CHAIN_REF = re.compile(r"\b(?:goto|jump)\s+([A-Za-z][A-Za-z0-9_.]*)")
_COUNTER_REF = re.compile(r'\bcounter\s+name\s+"([^"]+)"')

TableKey = tuple[str, str]


class FakeNft:
    """Tables in memory; `apply` is all-or-nothing like the kernel's transactions."""

    def __init__(self) -> None:
        self.tables: dict[TableKey, Ruleset] = {}
        self.transactions = 0  # applied successfully

    # -- the NftBackend interface -------------------------------------------------

    def apply(self, tx: Transaction) -> None:
        tx.raise_error()
        work = {k: v.copy() for k, v in self.tables.items()}
        for op in tx:
            _Apply(work, tx.table).run(op.verb, op.obj)
        self.tables = work
        self.transactions += 1

    def read(self, table: Table) -> Ruleset | None:
        found = self.tables.get(_key(table))
        if found is None:
            return None
        view = found.copy()
        view.rules_known = False  # as the runner: rules come back opaque
        return view

    def read_elements(self, table: Table, set_name: str) -> list[Element]:
        rs = self._table(table)
        if set_name not in rs.sets:
            raise DataplaneError(f"set {set_name!r} not found in table {table.name!r}")
        return list(rs.elements[set_name].values())

    def count_marks(self, table: Table, map_name: str) -> dict[int, int]:
        rs = self.tables.get(_key(table))
        if rs is not None and map_name in rs.rings:
            return dict(collections.Counter(v for v in rs.rings[map_name] if v))
        elements = rs.elements.get(map_name, {}) if rs is not None else {}
        return dict(collections.Counter(int(e.value or 0) for e in elements.values()))

    def read_counters(self, table: Table) -> dict[str, CounterValue]:
        rs = self._table(table)
        return {name: rs.counter_values.get(name, CounterValue()) for name in rs.counters}

    # -- for tests ------------------------------------------------------------------

    def ruleset(self, table: Table) -> Ruleset:
        """The live content of a table (the tracer mutates flow tables and counters in it)."""
        return self._table(table)

    def dump(self, table: Table) -> str:
        """The table as a canonical nft script (loadable with `nft -f`), everything sorted."""
        rs = self._table(table)
        tx = Transaction(rs.table)
        tx.add(rs.table)
        for name in sorted(rs.counters):
            tx.add(rs.counters[name])
        for name in sorted(rs.chains):
            tx.add(rs.chains[name])
        for name in sorted(rs.sets):
            tx.add(rs.sets[name])
            for elem in sorted(rs.elements[name].values(), key=lambda e: _natural(e.key)):
                tx.add(elem)
            if name in rs.rings:
                for slot, value in enumerate(rs.rings[name]):
                    if value:
                        tx.add(Element(name, (str(slot),), str(value)))
        for name in sorted(rs.chains):
            for rule in rs.rules[name]:
                tx.add(rule)
        return tx.render()

    def _table(self, table: Table) -> Ruleset:
        found = self.tables.get(_key(table))
        if found is None:
            raise DataplaneError(f"table {table.family} {table.name} does not exist")
        return found


def _key(table: Table) -> TableKey:
    return (table.family, table.name)


def _natural(key: tuple[str, ...]) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key)


class _Apply:
    """One operation against the working copy, refusing what the kernel refuses."""

    def __init__(self, tables: dict[TableKey, Ruleset], table: Table) -> None:
        self.tables = tables
        self.table = table

    def fail(self, message: str) -> None:
        raise DataplaneError(f"nft rejected the transaction: {message}")

    def rs(self) -> Ruleset:
        found = self.tables.get(_key(self.table))
        if found is None:
            self.fail(f"No such file or directory: table {self.table.name}")
            raise AssertionError  # unreachable: fail raises
        return found

    def run(self, verb: Verb, obj: object) -> None:
        if isinstance(obj, Table):
            self.table_op(verb)
        elif isinstance(obj, Chain):
            self.chain_op(verb, obj)
        elif isinstance(obj, Rule):
            self.rule_op(obj)
        elif isinstance(obj, Set):
            self.set_op(verb, obj)
        elif isinstance(obj, Counter):
            self.counter_op(verb, obj)
        elif isinstance(obj, Element):
            self.element_op(verb, obj)
        elif isinstance(obj, RingWrite):
            self.ring_op(obj)

    def ring_op(self, write: RingWrite) -> None:
        rs = self.rs()
        s = rs.sets.get(write.set)
        if s is None or not s.is_map:
            self.fail(f"No such file or directory: map {write.set}")
            return
        if rs.elements[write.set]:
            self.fail(f"Invalid argument: {write.set} holds elements, not ring slots")
        ring = array("I", rs.rings.get(write.set, ()))
        for slot in write.deleted:
            if slot >= len(ring) or not ring[slot]:
                self.fail(f"No such file or directory: element {slot} of {write.set}")
            ring[slot] = 0
        for slot, value in zip(write.added, write.values, strict=True):
            if slot >= len(ring):
                ring.extend([0] * (slot + 1 - len(ring)))
            if ring[slot] and ring[slot] != value:
                self.fail(f"File exists: element {slot} of {write.set}")
            ring[slot] = value
        if s.size is not None and sum(1 for v in ring if v) > s.size:
            self.fail(f"Too many open files in system: set {write.set} is full ({s.size})")
        rs.rings[write.set] = ring

    def table_op(self, verb: Verb) -> None:
        key = _key(self.table)
        exists = key in self.tables
        if verb is Verb.ADD and not exists:
            self.tables[key] = Ruleset(self.table)
        elif verb is Verb.CREATE:
            if exists:
                self.fail(f"File exists: table {self.table.name}")
            self.tables[key] = Ruleset(self.table)
        elif verb is Verb.FLUSH:
            for rules in self.rs().rules.values():
                rules.clear()
        elif verb is Verb.DELETE:
            self.rs()
            del self.tables[key]

    def chain_op(self, verb: Verb, chain: Chain) -> None:
        rs = self.rs()
        current = rs.chains.get(chain.name)
        if verb in (Verb.ADD, Verb.CREATE):
            if current is not None:
                if verb is Verb.CREATE or (chain.hook is not None and current != chain):
                    self.fail(f"File exists: chain {chain.name}")
                return
            if chain.hook is not None:
                for other in rs.chains.values():
                    if other.hook == chain.hook and other.device == chain.device and other.device:
                        self.fail(f"File exists: device {chain.device} already hooked")
            rs.add_chain(chain)
            return
        if current is None:
            self.fail(f"No such file or directory: chain {chain.name}")
        if verb is Verb.FLUSH:
            rs.rules[chain.name].clear()
            return
        if rs.rules[chain.name]:
            self.fail(f"Device or resource busy: chain {chain.name} has rules")
        if self.chain_referenced(rs, chain.name):
            self.fail(f"Device or resource busy: chain {chain.name} is referenced")
        del rs.chains[chain.name], rs.rules[chain.name]

    def rule_op(self, rule: Rule) -> None:
        rs = self.rs()
        if rule.chain not in rs.chains:
            self.fail(f"No such file or directory: chain {rule.chain}")
        for name in _SET_REF.findall(rule.rule):
            if name not in rs.sets:
                self.fail(f"No such file or directory: set {name} (in {rule.rule!r})")
        for name in _CHAIN_REF.findall(rule.rule):
            if name not in rs.chains:
                self.fail(f"No such file or directory: chain {name} (in {rule.rule!r})")
        for name in _COUNTER_REF.findall(rule.rule):
            if name not in rs.counters:
                self.fail(f"No such file or directory: counter {name} (in {rule.rule!r})")
        rs.rules[rule.chain].append(rule)

    def set_op(self, verb: Verb, s: Set) -> None:
        rs = self.rs()
        current = rs.sets.get(s.name)
        if verb in (Verb.ADD, Verb.CREATE):
            if current is not None:
                if verb is Verb.CREATE or current != s:
                    self.fail(f"File exists: set {s.name} is declared differently")
                return
            rs.add_set(s)
            return
        if current is None:
            self.fail(f"No such file or directory: set {s.name}")
        if verb is Verb.FLUSH:
            rs.elements[s.name].clear()
            rs.rings.pop(s.name, None)
            return
        for rules in rs.rules.values():
            if any(s.name in _SET_REF.findall(r.rule) for r in rules):
                self.fail(f"Device or resource busy: set {s.name} is used by a rule")
        del rs.sets[s.name], rs.elements[s.name]
        rs.rings.pop(s.name, None)

    def counter_op(self, verb: Verb, counter: Counter) -> None:
        rs = self.rs()
        exists = counter.name in rs.counters
        if verb in (Verb.ADD, Verb.CREATE):
            if exists and verb is Verb.CREATE:
                self.fail(f"File exists: counter {counter.name}")
            if not exists:
                rs.add_counter(counter)
                rs.counter_values[counter.name] = CounterValue()
            return
        if not exists:
            self.fail(f"No such file or directory: counter {counter.name}")
        quoted = f'"{counter.name}"'
        for elements in rs.elements.values():
            if any(e.value == quoted for e in elements.values()):
                self.fail(f"Device or resource busy: counter {counter.name} is in a map")
        for rules in rs.rules.values():
            if any(counter.name in _COUNTER_REF.findall(r.rule) for r in rules):
                self.fail(f"Device or resource busy: counter {counter.name} is used by a rule")
        del rs.counters[counter.name]
        rs.counter_values.pop(counter.name, None)

    def element_op(self, verb: Verb, elem: Element) -> None:
        rs = self.rs()
        s = rs.sets.get(elem.set)
        if s is None:
            self.fail(f"No such file or directory: set {elem.set}")
            return
        elements = rs.elements[elem.set]
        current = elements.get(elem.key)
        if verb is Verb.DELETE:
            if current is None:
                self.fail(f"No such file or directory: element {elem.key_text()} of {elem.set}")
            del elements[elem.key]
            return
        if s.is_map != (elem.value is not None):
            self.fail(f"Invalid argument: element {elem.key_text()} of {elem.set} (map value)")
        if current is not None:
            if verb is Verb.CREATE or current.value != elem.value:
                self.fail(f"File exists: element {elem.key_text()} of {elem.set}")
            return
        if s.size is not None and len(elements) >= s.size:
            self.fail(f"Too many open files in system: set {elem.set} is full ({s.size})")
        self.check_value(rs, s, elem)
        elements[elem.key] = elem

    def check_value(self, rs: Ruleset, s: Set, elem: Element) -> None:
        if elem.value is None:
            return
        if s.value == "verdict":
            for name in _CHAIN_REF.findall(elem.value):
                if name not in rs.chains:
                    self.fail(f"No such file or directory: chain {name} (element of {s.name})")
        if s.value == "counter" and elem.value.strip('"') not in rs.counters:
            self.fail(f"No such file or directory: counter {elem.value} (element of {s.name})")

    @staticmethod
    def chain_referenced(rs: Ruleset, name: str) -> bool:
        for rules in rs.rules.values():
            if any(name in _CHAIN_REF.findall(r.rule) for r in rules):
                return True
        for elements in rs.elements.values():
            if any(e.value and name in _CHAIN_REF.findall(e.value) for e in elements.values()):
                return True
        return False
