"""Ring map slots as binary nfnetlink messages: one batch, one kernel transaction.

libnftables parses every element of a text command (~4 µs each), which made a
first sync of 1,000 services x 4,099 slots take most of a minute. A ring map's
key is the 32-bit slot number and its value a 32-bit mark, both in host byte
order (what `jhash ... mod N` and `meta mark` / `ct mark` put in a register),
so its elements are fixed-size records the kernel takes as they are:

    NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE u32 slot },
                     NFTA_SET_ELEM_DATA { NFTA_DATA_VALUE u32 id } }     (28 bytes)

A batch is NFNL_MSG_BATCH_BEGIN, DELSETELEM/NEWSETELEM messages of up to
MAX_ELEMENTS elements each (an nlattr length is 16 bits), an optional
NEWTABLE that clears the dormant flag, and NFNL_MSG_BATCH_END; the kernel
applies all of it or nothing (include/uapi/linux/netfilter/nfnetlink.h,
nf_tables.h). Only the last message asks for an acknowledgement: an error in
any message, or in the commit, comes back before it.

Reading a ring back (GETSETELEM dump) walks the same fixed records.

Pure: no I/O.
"""

from __future__ import annotations

import socket
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator

from passlb.dataplane.nft.nlmsg import HEADER, NFGEN, NLM_F_REQUEST, attr, attrs
from passlb.dataplane.nft.objects import RingValues, RingWrite

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE = 0
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000

NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE = 1

MAX_ELEMENTS = 2000  # 2,000 x 28 bytes fits the 16-bit length of the element list

_NATIVE = "<" if sys.byteorder == "little" else ">"
# One element as u32 words: the nlattr headers are (length, type) u16 pairs.
_ADD = array(
    "I",
    struct.pack(
        _NATIVE + "HHHHHHIHHHHI",
        28, NFTA_LIST_ELEM | NLA_F_NESTED,
        12, NFTA_SET_ELEM_KEY | NLA_F_NESTED, 8, NFTA_DATA_VALUE, 0,
        12, NFTA_SET_ELEM_DATA | NLA_F_NESTED, 8, NFTA_DATA_VALUE, 0,
    ),
)  # fmt: skip
# As the kernel dumps it: nests without the NLA_F_NESTED flag (nla_nest_start_noflag).
_DUMPED = array("I", [w & ~(NLA_F_NESTED << (16 if _NATIVE == "<" else 0)) for w in _ADD])
_DELETE = array(
    "I",
    struct.pack(
        _NATIVE + "HHHHHHI",
        16, NFTA_LIST_ELEM | NLA_F_NESTED,
        12, NFTA_SET_ELEM_KEY | NLA_F_NESTED, 8, NFTA_DATA_VALUE, 0,
    ),
)  # fmt: skip


def _message(kind: int, flags: int, seq: int, family: int, body: bytes, res_id: int = 0) -> bytes:
    payload = NFGEN.pack(family, 0, res_id) + body
    return HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0) + payload


def _elements(table: bytes, name: bytes, records: bytes) -> bytes:
    head = attr(NFTA_SET_ELEM_LIST_TABLE, table) + attr(NFTA_SET_ELEM_LIST_SET, name)
    return (
        head
        + struct.pack("=HH", 4 + len(records), NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED)
        + records
    )


def _chunks(write: RingWrite) -> Iterator[tuple[int, bytes]]:
    """(message type, element records) of one ring write: its deletes, then its adds."""
    for start in range(0, len(write.deleted), MAX_ELEMENTS):
        slots = write.deleted[start : start + MAX_ELEMENTS]
        records = _DELETE * len(slots)
        records[3::4] = slots
        yield NFT_MSG_DELSETELEM, records.tobytes()
    for start in range(0, len(write.added), MAX_ELEMENTS):
        slots = write.added[start : start + MAX_ELEMENTS]
        records = _ADD * len(slots)
        records[3::7] = slots
        records[6::7] = write.values[start : start + MAX_ELEMENTS]
        yield NFT_MSG_NEWSETELEM, records.tobytes()


def ring_batch(
    family: int, table: str, writes: Iterable[RingWrite], seq: int, *, wake: bool
) -> tuple[list[bytes], list[str]]:
    """The messages of one batch (the first has sequence number `seq`, each next one
    more), and what each message between BEGIN and END writes, for error messages.

    `wake` adds a NEWTABLE that clears the table's flags (dormant), in the
    same transaction as the slots.
    """
    name = table.encode() + b"\0"
    subsys = socket.htons(NFNL_SUBSYS_NFTABLES)
    body: list[tuple[int, bytes]] = []
    labels: list[str] = []
    for write in writes:
        set_name = write.set.encode() + b"\0"
        for kind, records in _chunks(write):
            body.append(((NFNL_SUBSYS_NFTABLES << 8) | kind, _elements(name, set_name, records)))
            verb = "delete" if kind == NFT_MSG_DELSETELEM else "add"
            labels.append(
                f"{verb} {len(records) // (16 if verb == 'delete' else 28)} slots of {write.set}"
            )
    if wake:
        table_attrs = attr(NFTA_TABLE_NAME, name) + attr(NFTA_TABLE_FLAGS, struct.pack(">I", 0))
        body.append(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE, table_attrs))
        labels.append(f"wake table {table}")
    messages = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, b"", subsys)]
    for index, (kind, attributes) in enumerate(body):
        flags = NLM_F_REQUEST | NLM_F_CREATE | (NLM_F_ACK if index == len(body) - 1 else 0)
        messages.append(_message(kind, flags, seq + 1 + index, family, attributes))
    messages.append(
        _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1 + len(body), 0, b"", subsys)
    )
    return messages, labels


def ring_from_dump(
    parts: Iterable[tuple[bytes, list[tuple[int, int]]]],
) -> tuple[RingValues, bool]:
    """slot -> id of a ring map from its GETSETELEM dump (0 where no element is), and
    whether the dump was whole: no slot came twice and none is missing below
    the highest (a ring has an element in every slot).

    A hash set's dump restarts its walk for every message, skipping as many
    elements as it already sent. When the kernel resizes the table between two
    messages (rhashtable grows in a worker after a big write), the walk order
    changes: the dump then sends some elements twice and misses as many others.
    A repeated slot or a hole is the sign of a miss.
    """
    found: dict[int, int] = {}
    records = 0
    for buffer, spans in parts:
        for start, end in spans:
            for kind, a, b in attrs(buffer, start, end):
                if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                    continue
                records += _records(buffer, a, b, found)
    ring = array("I", bytes(4 * (max(found, default=-1) + 1)))
    for slot, bid in found.items():
        ring[slot] = bid
    return ring, records == len(found) == len(ring)


def _records(buffer: bytes, start: int, end: int, found: dict[int, int]) -> int:
    """Adds the (slot, id) records of one element list to `found`; how many it read."""
    count = (end - start) // 28
    if count * 28 == end - start:  # the common case: every element a plain 28-byte record
        words = array("I", buffer[start:end])
        if any(
            all(words[i::7] == template[i : i + 1] * count for i in (0, 1, 2, 4, 5))
            for template in (_DUMPED, _ADD)
        ):
            found.update(zip(words[3::7], words[6::7], strict=True))
            return count
    records = 0
    for elem_kind, c, d in attrs(buffer, start, end):  # anything else: walk the attributes
        if elem_kind != NFTA_LIST_ELEM:
            continue
        slot = bid = None
        for field, e, f in attrs(buffer, c, d):
            for part, g, h in attrs(buffer, e, f):
                if part == NFTA_DATA_VALUE and h - g == 4:
                    value = struct.unpack_from("=I", buffer, g)[0]
                    if field == NFTA_SET_ELEM_KEY:
                        slot = value
                    elif field == NFTA_SET_ELEM_DATA:
                        bid = value
        if slot is not None and bid is not None:
            found[slot] = bid
            records += 1
    return records
