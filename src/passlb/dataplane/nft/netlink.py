"""Counters and map values of one nftables table, read straight from nfnetlink.

libnftables 1.0.6 fills its whole cache before `list counters`: every element
of every set, so with two 65,537-slot rings a counter read costs 0.5-0.7 s of
CPU on the daemon's event loop, and even a filtered `list map` costs ~0.1 s.
A netlink dump filtered in the kernel costs about a millisecond and does not
grow with the rings.

Message layout (include/uapi/linux/netfilter/nf_tables.h):
  nlmsghdr | nfgenmsg(family, version 0, res_id 0) | attributes
  tables:   GETTABLE dump -> NEWTABLE: NFTA_TABLE_NAME
  counters: GETOBJ dump with NFTA_OBJ_TABLE + NFTA_OBJ_TYPE (be32 counter) ->
            NEWOBJ: NFTA_OBJ_NAME, NFTA_OBJ_DATA { COUNTER_BYTES, COUNTER_PACKETS (be64) }
  elements: GETSETELEM dump with NFTA_SET_ELEM_LIST_TABLE + _SET ->
            NEWSETELEM: NFTA_SET_ELEM_LIST_ELEMENTS { LIST_ELEM { KEY, DATA { VALUE } } }
  every dump ends with NLMSG_DONE (or NLMSG_ERROR).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterator

from passlb.dataplane.nft.objects import CounterValue
from passlb.errors import DataplaneError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

NFTA_TABLE_NAME = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFT_OBJECT_COUNTER = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_DATA = 2
NFTA_DATA_VALUE = 1

REPLY_TIMEOUT = 5.0  # seconds; the kernel answers a dump at once
FAMILIES = {"ip": 2, "ip6": 10, "inet": 1, "netdev": 5, "arp": 3, "bridge": 7}

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_seq = itertools.count(1)


def _align(size: int) -> int:
    return (size + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    header = _NLA.pack(_NLA.size + len(payload), kind)
    return (header + payload).ljust(_align(_NLA.size + len(payload)), b"\0")


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size:
            break
        yield kind & NLA_TYPE_MASK, data[offset + _NLA.size : offset + length]
        offset += _align(length)


def dump_request(message: int, family: str, attributes: bytes, seq: int) -> bytes:
    body = _NFGENMSG.pack(FAMILIES[family], 0, 0) + attributes
    kind = (NFNL_SUBSYS_NFTABLES << 8) | message
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def parse_dump(data: bytes, seq: int, message: int, into: list[bytes]) -> bool:
    """Append the attributes of each `message` reply in one recv() buffer to
    `into`; True once the dump is done. A missing table or set ends it empty."""
    wanted = (NFNL_SUBSYS_NFTABLES << 8) | message
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            raise DataplaneError("nfnetlink: malformed reply")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)
        if msg_seq != seq:
            continue  # a late answer to an earlier request
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload)
            if code == 0:
                continue
            if -code == errno.ENOENT:
                return True
            raise DataplaneError(f"nfnetlink: {os.strerror(-code)}")
        if kind == wanted:
            into.append(payload[_NFGENMSG.size :])
    return False


def counters_from(replies: list[bytes]) -> dict[str, CounterValue]:
    counters: dict[str, CounterValue] = {}
    for reply in replies:
        name, value = "", CounterValue()
        for attr, body in _attrs(reply):
            if attr == NFTA_OBJ_NAME:
                name = body.rstrip(b"\0").decode()
            elif attr == NFTA_OBJ_DATA:
                fields = {k: struct.unpack(">Q", v)[0] for k, v in _attrs(body) if len(v) == 8}
                value = CounterValue(
                    fields.get(NFTA_COUNTER_PACKETS, 0), fields.get(NFTA_COUNTER_BYTES, 0)
                )
        if name:
            counters[name] = value
    return counters


def mark_values_from(replies: list[bytes]) -> Counter[int]:
    """How many elements map to each 32-bit value (a `meta mark` datum is host order)."""
    counts: Counter[int] = Counter()
    for reply in replies:
        for attr, elements in _attrs(reply):
            if attr != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for kind, element in _attrs(elements):
                if kind != NFTA_LIST_ELEM:
                    continue
                for field, datum in _attrs(element):
                    if field != NFTA_SET_ELEM_DATA:
                        continue
                    for part, value in _attrs(datum):
                        if part == NFTA_DATA_VALUE and len(value) == 4:
                            counts[struct.unpack("=I", value)[0]] += 1
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
        replies = self._dump(NFT_MSG_GETTABLE, NFT_MSG_NEWTABLE, family, b"")
        return {
            body.rstrip(b"\0").decode()
            for reply in replies
            for attr, body in _attrs(reply)
            if attr == NFTA_TABLE_NAME
        }

    def counters(self, family: str, table: str) -> dict[str, CounterValue]:
        attributes = _string(NFTA_OBJ_TABLE, table)
        attributes += _attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
        replies = self._dump(NFT_MSG_GETOBJ, NFT_MSG_NEWOBJ, family, attributes)
        return counters_from(replies)

    def mark_values(self, family: str, table: str, set_name: str) -> Counter[int]:
        attributes = _string(NFTA_SET_ELEM_LIST_TABLE, table)
        attributes += _string(NFTA_SET_ELEM_LIST_SET, set_name)
        replies = self._dump(NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM, family, attributes)
        return mark_values_from(replies)

    def _dump(self, request: int, reply: int, family: str, attributes: bytes) -> list[bytes]:
        seq = next(_seq)
        replies: list[bytes] = []
        try:
            self._sock.send(dump_request(request, family, attributes, seq))
            while not parse_dump(self._sock.recv(1 << 20), seq, reply, replies):
                pass
        except OSError as e:  # incl. the reply timeout
            raise DataplaneError(f"nfnetlink: reading from nftables: {e}") from e
        return replies

    def close(self) -> None:
        self._sock.close()
