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

from passlb.dataplane.nft.library import LIBNFTABLES, libnftables_missing
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
from passlb.dataplane.nft.setread import SetInfo, UnknownType
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
        missing = libnftables_missing()
        if missing is not None:
            raise DataplaneError(missing)
        try:
            self._nft, self._netlink, self._walker, self._writer = in_netns(
                netns or None,
                lambda: (
                    nftables.Nftables(sofile=LIBNFTABLES),
                    NetlinkReader(),
                    NetlinkReader(),
                    NetlinkReader(),
                ),
            )
        except OSError as e:
            where = f" in network namespace {netns}" if netns else ""
            raise DataplaneError(f"cannot open nftables{where}: {e}") from e
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
        """The table's chains, sets with their elements (rings as arrays) and counters.

        Sets, elements and counters come over nfnetlink (setread.py): libnftables
        would first list every element of every set into its cache (27 s and
        2.8 GB with 1,000 rings of 4,099 slots). Chains come from a libnftables
        listing that does not fill that cache. Rules stay opaque; flow tables
        (dynamic sets) come without their elements (read_elements has them).
        """
        if not self._table_exists(table):
            return None
        found = Ruleset(table, rules_known=False)
        for item in self.list_json(f"list chains {table.family}"):
            if "chain" in item and item["chain"]["table"] == table.name:
                found.add_chain(_chain_from_json(item["chain"]))
        with self._netlink_lock:
            for info in _sets(self._netlink, table):
                if _is_ring(info.decl):
                    found.add_ring(
                        info.decl, self._netlink.ring(table.family, table.name, info.decl.name)
                    )
                elif info.decl.is_dynamic:
                    found.add_set(info.decl)
                else:
                    found.add_set(info.decl, self._netlink.elements(table.family, table.name, info))
            found.counter_values = self._netlink.counters(table.family, table.name)
        for name in found.counter_values:
            found.add_counter(Counter(name))
        return found

    def read_elements(self, table: Table, set_name: str) -> list[Element]:
        with self._walker_lock:  # flow tables: a long walk, on the walker's socket
            for info in _sets(self._walker, table):
                if info.decl.name == set_name:
                    return self._walker.elements(table.family, table.name, info)
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


def _sets(reader: NetlinkReader, table: Table) -> list[SetInfo]:
    try:
        return reader.sets(table.family, table.name)
    except UnknownType as e:
        raise DataplaneError(
            f"table {table.family} {table.name} holds a set of a type passlb does not "
            f"write ({e}): was it changed by hand? `passlb cleanup` removes the table"
        ) from e


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


def _is_ring(s: Set) -> bool:
    """A ring map: a 32-bit integer (the hash slot) to a mark."""
    return s.key == "integer" and s.value == "mark"
