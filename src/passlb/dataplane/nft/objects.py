"""nftables objects as immutable values (the vocabulary of a Transaction).

Modelled on kubernetes-sigs/knftables: a program describes the objects it
wants; a Transaction turns them into one nft script. Objects live in one table,
given to the Transaction, so they carry only their own name. Expressions
(rule bodies, typeof keys, element keys) stay nft text: the renderers own that
syntax, and the kernel is the authority on it.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from array import array
from dataclasses import dataclass
from typing import TypeAlias

Family = str  # "ip", "ip6", "inet", "arp", "bridge", "netdev"
FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})

# nft identifiers: a letter, then letters, digits, "_" or "." (we keep "/" and
# "\" out: they mean something to the nft parser in other positions).
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,62}")


@functools.lru_cache(maxsize=1 << 16)  # every object and element name of a sync
def check_name(kind: str, name: str) -> str | None:
    """Why `name` is no valid nft object name, or None when it is."""
    if not _NAME.fullmatch(name):
        return f"{kind} name {name!r} must be a letter then up to 62 letters, digits, '_' or '.'"
    return None


def quote(text: str) -> str:
    """An nft double-quoted string (comments, device names)."""
    if '"' in text or "\n" in text:
        raise ValueError(f"nft strings cannot hold quotes or newlines: {text!r}")
    return f'"{text}"'


@dataclass(frozen=True)
class Table:
    family: Family
    name: str
    comment: str | None = None
    dormant: bool = False  # base chains unhooked: no packet sees the table


@dataclass(frozen=True)
class Chain:
    """A chain; a base chain when `hook` is set (then `type` and `priority` too)."""

    name: str
    type: str | None = None  # "filter", "nat", "route"
    hook: str | None = None  # "ingress", "prerouting", ...
    priority: int | None = None
    device: str | None = None  # netdev ingress/egress chains
    policy: str | None = None  # "accept" | "drop"
    comment: str | None = None


@dataclass(frozen=True)
class Rule:
    chain: str
    rule: str  # nft rule text, e.g. 'ip daddr 198.18.0.10 counter accept'
    comment: str | None = None


@dataclass(frozen=True)
class Set:
    """A named set; a map when `value` is set ("meta mark", "verdict", "counter", ...)."""

    name: str
    key: str  # a typeof expression ("ip daddr . th dport") or, with typeof=False, a type
    value: str | None = None
    typeof: bool = True
    flags: tuple[str, ...] = ()  # "interval", "timeout", "dynamic", "constant"
    timeout: float | None = None  # seconds; the default timeout of elements
    size: int | None = None
    comment: str | None = None

    @property
    def is_map(self) -> bool:
        return self.value is not None

    @property
    def is_dynamic(self) -> bool:
        """Filled by the packet path (update/add statements), not by us."""
        return "dynamic" in self.flags


@dataclass(frozen=True)
class Counter:
    name: str
    comment: str | None = None


@dataclass(frozen=True)
class CounterValue:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Element:
    """One element of a set or map.

    `key` holds the parts of a concatenation in canonical text ("198.18.0.10",
    "tcp", "443", "1-65535"); `value` the map value in nft text ("3",
    "198.18.2.11", "goto svc_web", '"pkts_3"' for a counter reference).
    """

    set: str
    key: tuple[str, ...]
    value: str | None = None
    comment: str | None = None
    timeout: float | None = None
    expires: float | None = None  # seconds left, when read back from the kernel

    def key_text(self) -> str:
        return " . ".join(self.key)

    def text(self) -> str:
        """The element as it appears inside `{ ... }` of an add/delete element command."""
        parts = [self.key_text()]
        if self.timeout is not None:
            parts.append(f"timeout {format_seconds(self.timeout)}")
        if self.comment is not None:
            parts.append(f"comment {quote(self.comment)}")
        if self.value is not None:
            parts.append(f": {self.value}")
        return " ".join(parts)


RingValues: TypeAlias = "array[int]"  # array('I'): slot -> backend id, a ring map's content


@dataclass(frozen=True, eq=False)
class RingWrite:
    """Slots of one ring map (integer key -> mark) to delete, then slots to add.

    Rings are the bulk of a table (up to 65,537 slots a service), so their
    changes travel as arrays, not as one Element each: the runner writes them
    as binary nfnetlink set-element messages, other backends as nft text.
    A slot whose value changes is in both (a map element's value cannot be
    replaced in place).
    """

    set: str
    deleted: array[int]  # slots
    added: array[int]  # slots, with `values` at the same positions
    values: array[int]

    def __len__(self) -> int:
        return len(self.deleted) + len(self.added)

    def delete_text(self) -> str:
        return ", ".join(map(str, self.deleted))

    def add_text(self) -> str:
        return ", ".join(f"{s} : {v}" for s, v in zip(self.added, self.values, strict=True))


Object = Table | Chain | Rule | Set | Counter | Element | RingWrite


def format_seconds(seconds: float) -> str:
    """nft time: whole seconds as "300s", fractions in milliseconds."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"
