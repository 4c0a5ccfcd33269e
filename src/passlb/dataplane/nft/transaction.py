"""A Transaction: objects to add, create, flush or delete, rendered as one nft script.

The first invalid object is latched and raised when the transaction is applied
(knftables' habit), so renderers can build a whole change without checking
after every call. The script runs as one nft transaction: the kernel applies
all of it or none of it, and a packet never sees half a change.

Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from passlb.dataplane.nft.objects import (
    FAMILIES,
    Chain,
    Counter,
    Element,
    Object,
    RingWrite,
    Rule,
    Set,
    Table,
    check_name,
    format_seconds,
    quote,
)
from passlb.errors import DataplaneError


class Verb(enum.StrEnum):
    ADD = "add"  # create, or leave alone when it exists (elements: same value)
    CREATE = "create"  # create; an error when it exists
    FLUSH = "flush"  # empty a table, chain or set
    DELETE = "delete"  # remove; an error when it does not exist


@dataclass(frozen=True)
class Operation:
    verb: Verb
    obj: Object


class Transaction:
    """Operations on one table, applied together by a runner (or the fake)."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.operations: list[Operation] = []
        self.error: DataplaneError | None = None
        self._ring_elements = 0  # element writes inside RingWrites, beyond one per op
        if table.family not in FAMILIES:
            self._latch(f"unknown table family {table.family!r}")
        self._check(check_name("table", table.name))

    def __len__(self) -> int:
        """Operations, counting each element a RingWrite deletes or adds."""
        return len(self.operations) + self._ring_elements

    def ring_writes(self) -> list[RingWrite]:
        return [op.obj for op in self.operations if isinstance(op.obj, RingWrite)]

    def rest(self) -> list[Operation]:
        """Every operation but the ring writes and the (idempotent) add of the table."""
        return [
            op
            for op in self.operations
            if not isinstance(op.obj, RingWrite)
            and not (op.verb is Verb.ADD and isinstance(op.obj, Table))
        ]

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    def add(self, obj: Object) -> None:
        self._record(Verb.ADD, obj)

    def create(self, obj: Object) -> None:
        self._record(Verb.CREATE, obj)

    def flush(self, obj: Table | Chain | Set) -> None:
        self._record(Verb.FLUSH, obj)

    def delete(self, obj: Object) -> None:
        self._record(Verb.DELETE, obj)

    def without_rings(self, table: Table) -> Transaction:
        """The other operations, on `table` (e.g. the same table, dormant)."""
        twin = Transaction(table)  # validated already: the operations are copied as they are
        twin.error = self.error
        twin.operations = [
            Operation(op.verb, table) if isinstance(op.obj, Table) else op
            for op in self.operations
            if not isinstance(op.obj, RingWrite)
        ]
        return twin

    def copy(self) -> Transaction:
        twin = Transaction(self.table)
        twin.operations = list(self.operations)
        twin.error = self.error
        twin._ring_elements = self._ring_elements
        return twin

    def raise_error(self) -> None:
        """Raise the first validation error, if any (runners call this before applying)."""
        if self.error is not None:
            raise self.error

    def render(self) -> str:
        """The nft script, one command a line; consecutive element writes share a line."""
        lines: list[str] = []
        batch: list[Element] = []
        batch_verb: Verb | None = None

        def flush_batch() -> None:
            if batch:
                where = f"{self._where()} {batch[0].set}"
                body = ", ".join(
                    e.text() if batch_verb is not Verb.DELETE else e.key_text() for e in batch
                )
                lines.append(f"{batch_verb} element {where} {{ {body} }}")
                batch.clear()

        for op in self.operations:
            if isinstance(op.obj, RingWrite):
                flush_batch()
                where = f"{self._where()} {op.obj.set}"
                if op.obj.deleted:
                    lines.append(f"delete element {where} {{ {op.obj.delete_text()} }}")
                if op.obj.added:
                    lines.append(f"add element {where} {{ {op.obj.add_text()} }}")
                continue
            if isinstance(op.obj, Element):
                if batch and (batch_verb is not op.verb or batch[0].set != op.obj.set):
                    flush_batch()
                batch_verb = op.verb
                batch.append(op.obj)
                continue
            flush_batch()
            lines.append(self._render_one(op))
        flush_batch()
        return "\n".join(lines) + "\n" if lines else ""

    # -- validation --------------------------------------------------------

    def _record(self, verb: Verb, obj: Object) -> None:
        if self.error is None:
            self._check(self._validate(verb, obj))
        if isinstance(obj, RingWrite):
            self._ring_elements += len(obj) - 1
        self.operations.append(Operation(verb, obj))

    def _latch(self, message: str) -> None:
        if self.error is None:
            self.error = DataplaneError(f"invalid nft transaction: {message}")

    def _check(self, problem: str | None) -> None:
        if problem is not None:
            self._latch(problem)

    def _validate(self, verb: Verb, obj: Object) -> str | None:
        if isinstance(obj, Element):  # first: rings bring tens of thousands
            if verb is Verb.FLUSH:
                return f"elements cannot be flushed (set {obj.set!r}: flush the set)"
            if not obj.key:
                return f"element of set {obj.set!r} has an empty key"
            return check_name("set", obj.set)
        if isinstance(obj, RingWrite):
            if verb is not Verb.ADD:
                return f"ring writes are added (set {obj.set!r})"
            if len(obj.added) != len(obj.values):
                return f"ring write to {obj.set!r}: not one value per added slot"
            return check_name("set", obj.set)
        if isinstance(obj, Table):
            if obj != self.table and obj.name != self.table.name:
                return f"table {obj.name!r} is not this transaction's table {self.table.name!r}"
            return None
        if isinstance(obj, Chain):
            return check_name("chain", obj.name) or _validate_chain(verb, obj)
        if isinstance(obj, Rule):
            if verb not in (Verb.ADD,):
                return f"rules can only be added (chain {obj.chain!r}: flush the chain instead)"
            if not obj.rule.strip() or "\n" in obj.rule:
                return f"rule in chain {obj.chain!r} must be one non-empty line"
            return check_name("chain", obj.chain)
        if isinstance(obj, Set):
            return check_name("set", obj.name) or _validate_set(verb, obj)
        if isinstance(obj, Counter):
            if verb is Verb.FLUSH:
                return f"counter {obj.name!r} cannot be flushed"
            return check_name("counter", obj.name)
        return f"unknown object {obj!r}"

    # -- rendering ---------------------------------------------------------

    def _where(self) -> str:
        return f"{self.table.family} {self.table.name}"

    def _render_one(self, op: Operation) -> str:
        obj, verb = op.obj, op.verb
        if isinstance(obj, Table):
            # Without flags, an add of an existing table clears its dormant flag.
            parts = ["flags dormant"] if obj.dormant else []
            parts += [f"comment {quote(obj.comment)}"] if obj.comment else []
            spec = f" {{ {' ; '.join(parts)} ; }}" if parts and verb in _CREATING else ""
            return f"{verb} table {self._where()}{spec}"
        if isinstance(obj, Chain):
            spec = f" {_chain_spec(obj)}" if verb in _CREATING else ""
            return f"{verb} chain {self._where()} {obj.name}{spec}"
        if isinstance(obj, Rule):
            comment = f" comment {quote(obj.comment)}" if obj.comment else ""
            return f"add rule {self._where()} {obj.chain} {obj.rule}{comment}"
        if isinstance(obj, Set):
            kind = "map" if obj.is_map else "set"
            spec = f" {_set_spec(obj)}" if verb in _CREATING else ""
            return f"{verb} {kind} {self._where()} {obj.name}{spec}"
        if isinstance(obj, Counter):
            spec = (
                f" {{ comment {quote(obj.comment)} ; }}"
                if obj.comment and verb in _CREATING
                else ""
            )
            return f"{verb} counter {self._where()} {obj.name}{spec}"
        raise AssertionError(f"unrenderable {obj!r}")  # elements are batched by render()


_CREATING = (Verb.ADD, Verb.CREATE)


def _comment_spec(comment: str | None) -> str:
    return f" {{ comment {quote(comment)} ; }}" if comment else ""


def _validate_chain(verb: Verb, chain: Chain) -> str | None:
    if chain.hook is None:
        if chain.type or chain.priority is not None or chain.device or chain.policy:
            return f"chain {chain.name!r}: type/priority/device/policy need a hook"
        return None
    if verb in _CREATING and (chain.type is None or chain.priority is None):
        return f"base chain {chain.name!r} needs a type and a priority"
    if chain.policy not in (None, "accept", "drop"):
        return f"chain {chain.name!r}: policy must be accept or drop"
    return None


def _validate_set(verb: Verb, s: Set) -> str | None:
    if verb in _CREATING and not s.key.strip():
        return f"set {s.name!r} needs a key"
    if s.size is not None and s.size < 1:
        return f"set {s.name!r}: size must be positive"
    if s.timeout is not None and "timeout" not in s.flags:
        return f"set {s.name!r}: a timeout needs the timeout flag"
    return None


def _chain_spec(chain: Chain) -> str:
    parts: list[str] = []
    if chain.hook is not None:
        hook = f"type {chain.type} hook {chain.hook}"
        if chain.device is not None:
            hook += f" device {quote(chain.device)}"
        parts.append(f"{hook} priority {chain.priority}")
        if chain.policy is not None:
            parts.append(f"policy {chain.policy}")
    if chain.comment:
        parts.append(f"comment {quote(chain.comment)}")
    return "{ " + " ; ".join(parts) + " ; }" if parts else "{ }"


def _set_spec(s: Set) -> str:
    kind = "typeof" if s.typeof else "type"
    parts = [f"{kind} {s.key}" + (f" : {s.value}" if s.value is not None else "")]
    if s.flags:
        parts.append("flags " + ",".join(s.flags))
    if s.timeout is not None:
        parts.append(f"timeout {format_seconds(s.timeout)}")
    if s.size is not None:
        parts.append(f"size {s.size}")
    if s.comment:
        parts.append(f"comment {quote(s.comment)}")
    return "{ " + " ; ".join(parts) + " ; }"
