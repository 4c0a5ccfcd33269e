"""NftRunner: applies a Transaction with one libnftables call; reads tables back as JSON.

The runner can work on another network namespace: libnftables binds its
netlink socket when the context is created, so the context (and the
nfnetlink reader beside it) is created by `netlink.in_netns`, in a short-lived
thread that joined the namespace, and talks to that namespace for good.
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
from dataclasses import replace
from typing import Any

import nftables

from passlb.dataplane.nft.netlink import NetlinkReader, in_netns
from passlb.dataplane.nft.objects import (
    Chain,
    Counter,
    CounterValue,
    Element,
    RingWrite,
    Set,
    Table,
)
from passlb.dataplane.nft.ruleset import Ruleset
from passlb.dataplane.nft.transaction import Transaction
from passlb.errors import DataplaneError

_LOCATION = re.compile(r"^(?:[^:\s]*):(\d+):\d+(?:-\d+)?: ", re.MULTILINE)

Json = dict[str, Any]


BIG_TEXT = 1 << 20  # a full 65537-slot ring is several MB of nft text or JSON
# Ring slots that still go as nft text with the rest of a transaction that also
# changes rules or declarations (libnftables parses ~4 µs a slot).
RING_TEXT_LIMIT = 4096
BIG_RING_WRITE = 1 << 16  # slots: tens of MB of batch, worth handing back to the kernel


def release_heap() -> None:
    """Hand freed heap back to the kernel after a big transaction or listing.

    libnftables parses and prints every element of a ring; glibc keeps the
    freed memory in its arenas, so without this a daemon with two full rings
    sits at ~250 MB RSS instead of ~100 MB.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _LIBC = None


class NftRunner:
    """The real nftables, in this network namespace or in the named one."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        try:
            self._nft, self._netlink, self._walker, self._writer = in_netns(
                netns or None,
                lambda: (nftables.Nftables(), NetlinkReader(), NetlinkReader(), NetlinkReader()),
            )
        except OSError as e:
            raise DataplaneError(f"cannot open nftables in netns {netns!r}: {e}") from e
        self._lock = threading.Lock()  # one libnftables context is not thread-safe
        # Netlink reads have their own sockets and locks: a flow-table walk
        # (count_marks, seconds on a big table, in a worker thread) must not
        # hold up a counter read or a sync on the event loop.
        self._netlink_lock = threading.Lock()
        self._walker_lock = threading.Lock()

    # -- writes ---------------------------------------------------------------

    def apply(self, tx: Transaction) -> None:
        """One transaction: nft text through libnftables, or, when it holds only ring
        slots, one binary nfnetlink batch (setelem.py).

        A new table with more ring slots than RING_TEXT_LIMIT is created dormant
        (no base chain hooked, so no packet sees it) by libnftables, then filled
        and woken in one nfnetlink batch: packets see no table, then all of it.
        """
        tx.raise_error()
        writes, rest = tx.ring_writes(), tx.rest()
        if not writes and not rest:
            return  # nothing but the add of an existing table: no change
        if writes and not rest:
            self._write_rings(tx.table, writes)
            return
        if sum(len(w) for w in writes) > RING_TEXT_LIMIT and not self._table_exists(tx.table):
            self.run_script(tx.without_rings(replace(tx.table, dormant=True)).render())
            self._write_rings(tx.table, writes)
            return
        script = tx.render()
        if script:
            self.run_script(script)

    def _write_rings(self, table: Table, writes: list[RingWrite]) -> None:
        with self._lock:  # one writer at a time: libnftables or this batch
            self._writer.write_rings(table.family, table.name, writes)
        if sum(len(w) for w in writes) > BIG_RING_WRITE:
            release_heap()

    def run_script(self, script: str) -> str:
        """Run nft text commands as one transaction; the output text on success."""
        with self._lock:
            self._nft.set_json_output(False)
            rc, out, err = self._nft.cmd(script)
        if len(script) > BIG_TEXT:
            release_heap()
        if rc != 0:
            raise DataplaneError(_describe_failure(script, err))
        return str(out)

    # -- reads ------------------------------------------------------------------

    def list_json(self, command: str) -> list[Json]:
        """The objects of an nft `list` command, without the metainfo entry."""
        with self._lock:
            self._nft.set_json_output(True)
            try:
                rc, out, err = self._nft.cmd(command)
            finally:
                self._nft.set_json_output(False)
        if rc != 0:
            raise DataplaneError(f"nft {command!r} failed: {err.strip()}")
        items = [i for doc in _json_documents(out or "") for i in doc["nftables"]]
        if len(out or "") > BIG_TEXT:
            release_heap()
        return [i for i in items if "metainfo" not in i]

    def read(self, table: Table) -> Ruleset | None:
        if not self._table_exists(table):
            return None
        # Not `list table`: that would also turn the rules into JSON, which nft
        # 1.0.6 cannot do for some statements (it warns on stderr), and we do not
        # read rules back. One call, though: libnftables fills its whole cache
        # (every ring element) once per call, ~0.6 s with two 65,537-slot rings.
        f = table.family
        found = Ruleset(table, rules_known=False)
        listing = (
            f"list chains {f}; list sets {f}; list maps {f}; list counters table {f} {table.name}"
        )
        for item in self.list_json(listing):
            if "chain" in item and item["chain"]["table"] == table.name:
                found.add_chain(_chain_from_json(item["chain"]))
            body = item.get("set") or item.get("map")
            if body is not None and body["table"] == table.name:
                decl, elements = _set_from_json(body)
                if _is_ring(body):
                    with self._netlink_lock:
                        found.add_ring(decl, self._netlink.ring(f, table.name, decl.name))
                else:
                    found.add_set(decl, elements)
            if "counter" in item:
                c = item["counter"]
                found.add_counter(Counter(c["name"], c.get("comment")))
                found.counter_values[c["name"]] = CounterValue(c["packets"], c["bytes"])
        return found

    def read_elements(self, table: Table, set_name: str) -> list[Element]:
        for kind in ("map", "set"):
            for item in self.list_json(f"list {kind} {table.family} {table.name} {set_name}"):
                if kind in item:
                    return _set_from_json(item[kind])[1]
        raise DataplaneError(f"set {set_name!r} not found in table {table.name!r}")

    def read_counters(self, table: Table) -> dict[str, CounterValue]:
        # Over nfnetlink, not `list counters`: see netlink.py for why.
        with self._netlink_lock:
            return self._netlink.counters(table.family, table.name)

    def count_marks(self, table: Table, map_name: str) -> dict[int, int]:
        """How many elements of a map hold each mark value (e.g. flows per backend id)."""
        with self._walker_lock:
            return dict(self._walker.mark_values(table.family, table.name, map_name))

    def _table_exists(self, table: Table) -> bool:
        with self._netlink_lock:  # netlink: `list tables` would fill the whole cache too
            return table.name in self._netlink.table_names(table.family)


def _json_documents(text: str) -> list[Json]:
    """The JSON documents of one nft call: one per `list` command, one per line."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def _describe_failure(script: str, err: str) -> str:
    """nft's error text, with the script line it blames when nft names one."""
    lines = script.splitlines()
    message = err.strip() or "nft failed without a message"
    m = _LOCATION.search(err)
    if m and 1 <= int(m.group(1)) <= len(lines):
        line = lines[int(m.group(1)) - 1]
        return f"nft rejected line {m.group(1)}: {_shorten(line)}\n{message}"
    return f"nft rejected the transaction ({len(lines)} lines):\n{message}"


def _shorten(line: str, limit: int = 300) -> str:
    return line if len(line) <= limit else line[:limit] + " ..."


# -- JSON -> objects --------------------------------------------------------------


def _chain_from_json(c: Json) -> Chain:
    return Chain(
        name=c["name"],
        type=c.get("type"),
        hook=c.get("hook"),
        priority=c.get("prio"),
        device=c.get("dev"),
        policy=c.get("policy"),
        comment=c.get("comment"),
    )


def _is_ring(s: Json) -> bool:
    """A ring map: a 32-bit integer (the hash slot) to a mark."""
    return s.get("type") == "integer" and s.get("map") == "mark"


def _set_from_json(s: Json) -> tuple[Set, list[Element]]:
    key = s["type"]
    key_text = " . ".join(key) if isinstance(key, list) else str(key)
    value = s.get("map")
    flags = tuple(s.get("flags", ()))
    decl = Set(
        name=s["name"],
        key=key_text,
        value=value if isinstance(value, str) else None,
        typeof=False,
        flags=flags,
        timeout=s.get("timeout"),
        size=s.get("size"),
        comment=s.get("comment"),
    )
    quote_values = value == "counter"
    elements = [_element_from_json(s["name"], e, quote_values) for e in s.get("elem", ())]
    return decl, elements


def _element_from_json(set_name: str, e: Any, quote_values: bool) -> Element:
    value: str | None = None
    if isinstance(e, list):  # a map element: [key, value]
        e, raw_value = e
        value = _value_text(raw_value)
        if quote_values:
            value = f'"{value}"'
    timeout = expires = None
    comment = None
    if isinstance(e, dict) and "elem" in e:
        meta = e["elem"]
        e = meta["val"]
        timeout, expires, comment = meta.get("timeout"), meta.get("expires"), meta.get("comment")
    parts = e["concat"] if isinstance(e, dict) and "concat" in e else [e]
    return Element(
        set=set_name,
        key=tuple(_value_text(p) for p in parts),
        value=value,
        comment=comment,
        timeout=timeout,
        expires=expires,
    )


def _value_text(v: Any) -> str:
    if isinstance(v, dict):
        if "range" in v:
            first, last = v["range"]
            return f"{_value_text(first)}-{_value_text(last)}"
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        for verdict in ("goto", "jump"):
            if verdict in v:
                return f"{verdict} {v[verdict]['target']}"
        for verdict in ("accept", "drop", "continue", "return"):
            if verdict in v:
                return verdict
    return str(v)
