"""Netlink framing for NETLINK_NETFILTER: messages built, answers walked in place.

Every message is an nlmsghdr, an nfgenmsg (family, version 0, res_id) and
netlink attributes (nlattr: length, type, payload padded to 4 bytes). Both
users, `netlink.py` (nftables reads) and `ctnetlink.py` (conntrack dumps),
send one dump request and walk its answer by offsets, without copying.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
_NLA = struct.Struct("=HH")  # nlattr: length, type
_ERRNO = struct.Struct("=i")


class NetlinkError(Exception):
    """The kernel answered a request with an error (errno), or sent something unreadable."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


def attr(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def attrs(buffer: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buffer[start:end]."""
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(buffer, start)
        if length < _NLA.size:
            return
        yield kind & NLA_TYPE_MASK, start + _NLA.size, start + length
        start += (length + 3) & ~3


def dump_request(message: int, family: int, attributes: bytes, seq: int) -> bytes:
    """A dump request; `message` is (subsystem << 8) | message type."""
    body = NFGEN.pack(family, 0, 0) + attributes
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return HEADER.pack(HEADER.size + len(body), message, flags, seq, 0) + body


def message_spans(buffer: bytes, seq: int, wanted: int) -> tuple[list[tuple[int, int]], bool]:
    """Where the attributes of each `wanted` message answering request `seq` lie
    in one recv() buffer, and whether the answer ended in it.

    Raises NetlinkError for an NLMSG_ERROR with a non-zero errno, or a
    truncated message. Messages of other requests (late answers) are skipped.
    """
    spans: list[tuple[int, int]] = []
    offset, end = 0, len(buffer)
    while offset + HEADER.size <= end:
        length, kind, _flags, msg_seq, _pid = HEADER.unpack_from(buffer, offset)
        if length < HEADER.size or offset + length > end:
            raise NetlinkError(0, f"truncated netlink message ({length} bytes at {offset})")
        if msg_seq == seq:
            if kind == NLMSG_DONE:
                return spans, True
            if kind == NLMSG_ERROR:
                (error,) = _ERRNO.unpack_from(buffer, offset + HEADER.size)
                if error:
                    raise NetlinkError(-error, f"netlink dump failed: errno {-error}")
                return spans, True
            if kind == wanted:
                spans.append((offset + HEADER.size + NFGEN.size, offset + length))
        offset += (length + 3) & ~3
    return spans, False
