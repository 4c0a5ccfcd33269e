"""Counters and map values of one nftables table, read straight from nfnetlink.

libnftables 1.0.6 fills its whole cache before `list counters`: every element
of every set, so with two 65,537-slot rings a counter read costs 0.5-0.7 s of
CPU on the daemon's event loop, and even a filtered `list map` costs ~0.1 s.
A netlink dump filtered in the kernel costs about a millisecond and does not
grow with the rings.

Framing is `nlmsg.py`'s; the messages (include/uapi/linux/netfilter/nf_tables.h):
  tables:   GETTABLE dump -> NEWTABLE: NFTA_TABLE_NAME
  counters: GETOBJ dump with NFTA_OBJ_TABLE + NFTA_OBJ_TYPE (be32 counter) ->
            NEWOBJ: NFTA_OBJ_NAME, NFTA_OBJ_DATA { COUNTER_BYTES, COUNTER_PACKETS (be64) }
  elements: GETSETELEM dump with NFTA_SET_ELEM_LIST_TABLE + _SET ->
            NEWSETELEM: NFTA_SET_ELEM_LIST_ELEMENTS { LIST_ELEM { KEY, DATA { VALUE } } }
  every dump ends with NLMSG_DONE (or NLMSG_ERROR).

`in_netns` is how the runner and the conntrack reader open their sockets and
contexts inside another network namespace.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

from passlb.dataplane.nft.nlmsg import (
    HEADER,
    NETLINK_NETFILTER,
    NLMSG_ERROR,
    NetlinkError,
    attr,
    attrs,
    dump_request,
    message_spans,
)
from passlb.dataplane.nft.objects import CounterValue, Element, RingValues, RingWrite
from passlb.dataplane.nft.setelem import ring_batch, ring_from_dump
from passlb.dataplane.nft.setread import SetInfo, elements_from, list_elements, sets_from
from passlb.errors import DataplaneError

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFT_MSG_NEWSET, NFT_MSG_GETSET = 9, 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19

NFTA_TABLE_NAME = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFT_OBJECT_COUNTER = 1
NFTA_SET_TABLE = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1

REPLY_TIMEOUT = 5.0  # seconds; the kernel answers a dump at once
READ_TRIES = 20  # a resize under a set dump is rare and runs once (read_whole)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10  # acknowledgements without the request echoed back
FAMILIES = {"ip": 2, "ip6": 10, "inet": 1, "netdev": 5, "arp": 3, "bridge": 7}
_CLONE_NEWNET = 0x40000000
_seq = itertools.count(1)
T = TypeVar("T")
# A dump's answer: each recv() buffer with the (start, end) of its messages' attributes.
Parts = list[tuple[bytes, list[tuple[int, int]]]]


def in_netns(netns: str | None, work: Callable[[], T]) -> T:
    """`work()`, run in a short-lived thread that joined `netns` (here when None).

    A netlink socket or a libnftables context talks to the namespace it was
    created in for good, and setns(2) moves only the calling thread: so they
    are created this way while the rest of the process stays where it is.
    """
    if netns is None:
        return work()
    made: list[T] = []
    failure: list[BaseException] = []

    def joined() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(work())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=joined, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return made[0]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _string(buffer: bytes, start: int, end: int) -> str:
    return buffer[start:end].rstrip(b"\0").decode()


def _messages(parts: Parts) -> Iterator[tuple[bytes, int, int]]:
    for buffer, spans in parts:
        for start, end in spans:
            yield buffer, start, end


def table_names_from(parts: Parts) -> set[str]:
    return {
        _string(buffer, a, b)
        for buffer, start, end in _messages(parts)
        for kind, a, b in attrs(buffer, start, end)
        if kind == NFTA_TABLE_NAME
    }


def counters_from(parts: Parts) -> dict[str, CounterValue]:
    counters: dict[str, CounterValue] = {}
    for buffer, start, end in _messages(parts):
        name, value = "", CounterValue()
        for kind, a, b in attrs(buffer, start, end):
            if kind == NFTA_OBJ_NAME:
                name = _string(buffer, a, b)
            elif kind == NFTA_OBJ_DATA:
                fields = {
                    k: struct.unpack_from(">Q", buffer, c)[0]
                    for k, c, d in attrs(buffer, a, b)
                    if d - c == 8
                }
                value = CounterValue(
                    fields.get(NFTA_COUNTER_PACKETS, 0), fields.get(NFTA_COUNTER_BYTES, 0)
                )
        if name:
            counters[name] = value
    return counters


def mark_values_from(parts: Parts) -> Counter[int]:
    """How many elements map to each 32-bit value (a `meta mark` datum is host order)."""
    counts: Counter[int] = Counter()
    for buffer, c, d in list_elements(parts):
        for field, e, f in attrs(buffer, c, d):
            if field != NFTA_SET_ELEM_DATA:
                continue
            for part, g, h in attrs(buffer, e, f):
                if part == NFTA_DATA_VALUE and h - g == 4:
                    counts[struct.unpack_from("=I", buffer, g)[0]] += 1
    return counts


class NetlinkReader:
    """Reads one table's counters and map values over one nfnetlink socket.

    The socket belongs to the network namespace it was created in; the
    runner creates it where it creates its libnftables context.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(REPLY_TIMEOUT)

    def table_names(self, family: str) -> set[str]:
        return table_names_from(self._dump(NFT_MSG_GETTABLE, NFT_MSG_NEWTABLE, family, b""))

    def counters(self, family: str, table: str) -> dict[str, CounterValue]:
        attributes = attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
        attributes += attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
        return counters_from(self._dump(NFT_MSG_GETOBJ, NFT_MSG_NEWOBJ, family, attributes))

    def mark_values(self, family: str, table: str, set_name: str) -> Counter[int]:
        attributes = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        attributes += attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
        parts = self._dump(NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM, family, attributes)
        return mark_values_from(parts)

    def sets(self, family: str, table: str) -> list[SetInfo]:
        """The declarations of a table's sets and maps."""
        attributes = attr(NFTA_SET_TABLE, table.encode() + b"\0")
        return sets_from(self._dump(NFT_MSG_GETSET, NFT_MSG_NEWSET, family, attributes))

    def elements(self, family: str, table: str, info: SetInfo) -> list[Element]:
        """The elements of one set, as nft prints them (read again, as a ring is,
        when a resize made the dump repeat elements; a flow table, which changes
        under any read, is taken as it comes)."""
        attributes = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        attributes += attr(NFTA_SET_ELEM_LIST_SET, info.decl.name.encode() + b"\0")

        def read() -> tuple[list[Element], bool]:
            dump = self._dump(NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM, family, attributes)
            found = elements_from(info, dump)
            return found, info.decl.is_dynamic or len({e.key for e in found}) == len(found)

        return read_whole(read, f"table {table}: set {info.decl.name}")

    def ring(self, family: str, table: str, set_name: str) -> RingValues:
        """slot -> id of a ring map (0 where a slot has no element).

        A dump that met a resize of the kernel's hash table is read again: the
        resize runs once, right after a big write, so the next dump is whole.
        """
        attributes = attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        attributes += attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
        return read_whole(
            lambda: ring_from_dump(
                self._dump(NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM, family, attributes)
            ),
            f"table {table}: map {set_name}",
        )

    def write_rings(
        self, family: str, table: str, writes: list[RingWrite], *, wake: bool = True
    ) -> None:
        """Write ring slots (and clear a dormant flag) in one nfnetlink batch: one
        transaction, all or nothing. Raises DataplaneError naming what was refused."""
        first = next(_seq)
        messages, labels = ring_batch(FAMILIES[family], table, writes, first, wake=wake)
        for _ in range(len(messages)):  # keep the sequence numbers of this socket unique
            next(_seq)
        batch = b"".join(messages)
        acked = first + len(labels)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(batch) + (1 << 16))
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.send(batch)
            done = False
            while not done:
                failed, done = _batch_reply(self._sock.recv(1 << 16), first, acked)
                if failed is not None:
                    seq, code = failed
                    what = labels[seq - first - 1] if first < seq <= acked else "the commit"
                    raise DataplaneError(
                        f"nfnetlink: table {table}: the kernel refused {what}: "
                        f"{os.strerror(code)} (nothing of this change was applied)"
                    )
        except OSError as e:
            raise DataplaneError(f"nfnetlink: writing to table {table}: {e}") from e

    def _dump(self, request: int, reply: int, family: str, attributes: bytes) -> Parts:
        """Send one dump request and collect its answer; a table or set that
        does not exist answers nothing."""
        seq = next(_seq)
        wanted = (NFNL_SUBSYS_NFTABLES << 8) | reply
        message = (NFNL_SUBSYS_NFTABLES << 8) | request
        parts: Parts = []
        try:
            self._sock.send(dump_request(message, FAMILIES[family], attributes, seq))
            done = False
            while not done:
                buffer = self._sock.recv(1 << 20)
                spans, done = message_spans(buffer, seq, wanted)
                parts.append((buffer, spans))
        except NetlinkError as e:
            if e.errno == errno.ENOENT:
                return []
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise DataplaneError(f"nfnetlink: reading from nftables: {reason}") from e
        except OSError as e:  # incl. the reply timeout
            raise DataplaneError(f"nfnetlink: reading from nftables: {e}") from e
        return parts

    def close(self) -> None:
        self._sock.close()


def read_whole(read: Callable[[], tuple[T, bool]], what: str) -> T:
    """What `read` returns once it says the dump was whole. A set dump restarts
    its walk for each message; a resize of the kernel's hash table between two
    messages makes it repeat elements and miss others. The resize runs once,
    right after a big write, so the next dump is whole."""
    for _ in range(READ_TRIES):
        found, whole = read()
        if whole:
            return found
    raise DataplaneError(f"nfnetlink: {what} was resized under {READ_TRIES} reads in a row")


def _batch_reply(buffer: bytes, first: int, last: int) -> tuple[tuple[int, int] | None, bool]:
    """The answers to a batch (sequence numbers first..last) in one recv() buffer:
    (sequence number, errno) of the first error, and whether the last message's
    acknowledgement came. A failed commit answers the BEGIN message (`first`)."""
    offset = 0
    while offset + HEADER.size <= len(buffer):
        length, kind, _flags, seq, _pid = HEADER.unpack_from(buffer, offset)
        if length < HEADER.size:
            break
        if kind == NLMSG_ERROR and first <= seq <= last:
            (code,) = struct.unpack_from("=i", buffer, offset + HEADER.size)
            if code:
                return (seq, -code), True
            if seq == last:
                return None, True
        offset += (length + 3) & ~3
    return None, False
