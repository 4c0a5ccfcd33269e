"""Named counters of one nftables table, read straight from nfnetlink.

libnftables 1.0.6 fills its whole cache before `list counters`: every element
of every set, so with two 65,537-slot rings a counter read costs 0.5-0.7 s of
CPU on the daemon's event loop. A netlink dump of the table's counter objects
(NFT_MSG_GETOBJ, filtered by table and type in the kernel) costs about a
millisecond and does not grow with the rings.

Message layout (include/uapi/linux/netfilter/nf_tables.h):
  nlmsghdr | nfgenmsg(family, version 0, res_id 0) | attributes
  request:  NFTA_OBJ_TABLE (string), NFTA_OBJ_TYPE (be32 NFT_OBJECT_COUNTER)
  replies:  NFT_MSG_NEWOBJ with NFTA_OBJ_NAME and nested NFTA_OBJ_DATA holding
            NFTA_COUNTER_BYTES / NFTA_COUNTER_PACKETS (be64); then NLMSG_DONE
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator

from passlb.dataplane.nft.objects import CounterValue
from passlb.errors import DataplaneError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETOBJ = 19
NFT_MSG_NEWOBJ = 18
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFT_OBJECT_COUNTER = 1

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


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size:
            break
        yield kind & NLA_TYPE_MASK, data[offset + _NLA.size : offset + length]
        offset += _align(length)


def counter_dump_request(family: str, table: str, seq: int) -> bytes:
    """The GETOBJ dump request for the counters of one table."""
    body = _NFGENMSG.pack(FAMILIES[family], 0, 0)
    body += _attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
    body += _attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def parse_counter_replies(data: bytes, seq: int, into: dict[str, CounterValue]) -> bool:
    """Add the counters of one recv() buffer to `into`; True once the dump is done."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            raise DataplaneError("nfnetlink: malformed reply")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)
        if msg_seq != seq:
            continue
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload)
            if code == 0:
                continue
            if -code == errno.ENOENT:  # no such table: nothing to count
                return True
            raise DataplaneError(f"nfnetlink: reading counters: {os.strerror(-code)}")
        if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
            continue
        name, value = "", CounterValue()
        for attr, body in _attrs(payload[_NFGENMSG.size :]):
            if attr == NFTA_OBJ_NAME:
                name = body.rstrip(b"\0").decode()
            elif attr == NFTA_OBJ_DATA:
                fields = {k: struct.unpack(">Q", v)[0] for k, v in _attrs(body) if len(v) == 8}
                value = CounterValue(
                    fields.get(NFTA_COUNTER_PACKETS, 0), fields.get(NFTA_COUNTER_BYTES, 0)
                )
        if name:
            into[name] = value
    return False


class CounterReader:
    """Reads a table's named counters over one nfnetlink socket.

    The socket belongs to the network namespace it was created in; the
    runner creates it where it creates its libnftables context.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(REPLY_TIMEOUT)

    def read(self, family: str, table: str) -> dict[str, CounterValue]:
        seq = next(_seq)
        counters: dict[str, CounterValue] = {}
        try:
            self._sock.send(counter_dump_request(family, table, seq))
            while not parse_counter_replies(self._sock.recv(1 << 20), seq, counters):
                pass
        except OSError as e:  # incl. the reply timeout
            raise DataplaneError(f"nfnetlink: reading counters of {family} {table}: {e}") from e
        return counters

    def close(self) -> None:
        self._sock.close()
