"""The ctnetlink codec on hand-built messages laid out as the kernel sends them."""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address

import pytest

from passlb.dataplane.nft import ctnetlink as ct
from passlb.dataplane.nft import nlmsg
from passlb.dataplane.nft.nlmsg import NetlinkError

NESTED = 0x8000  # NLA_F_NESTED: the kernel sets it on every nested attribute
CTA_STATUS = 3  # attributes the decoder must step over
CTA_ID = 12


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NESTED, b"".join(parts))


def tuple_attr(kind: int, src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    s, d = ip_address(src), ip_address(dst)
    v4 = s.version == 4
    src_kind = ct.CTA_IP_V4_SRC if v4 else ct.CTA_IP_V6_SRC
    dst_kind = ct.CTA_IP_V4_DST if v4 else ct.CTA_IP_V6_DST
    ports = b""
    if proto in (6, 17):
        ports = attr(ct.CTA_PROTO_SRC_PORT, struct.pack(">H", sport)) + attr(
            ct.CTA_PROTO_DST_PORT, struct.pack(">H", dport)
        )
    return nested(
        kind,
        nested(ct.CTA_TUPLE_IP, attr(src_kind, s.packed), attr(dst_kind, d.packed)),
        nested(ct.CTA_TUPLE_PROTO, attr(ct.CTA_PROTO_NUM, bytes([proto])), ports),
    )


def message(kind: int, seq: int, body: bytes, family: int = socket.AF_INET) -> bytes:
    payload = nlmsg.NFGEN.pack(family, 0, 0) + body
    length = nlmsg.HEADER.size + len(payload)
    return nlmsg.HEADER.pack(length, kind, 0x2, seq, 0) + payload + b"\0" * (-length % 4)


def entry_message(seq: int, *, mark: int = 0, tcp_state: int | None = 3, v6: bool = False) -> bytes:
    client, vip, backend = (
        ("2001:2:0:1::10", "2001:2:0:ff00::10", "2001:2:0:2::12")
        if v6
        else ("198.18.1.10", "198.18.0.10", "198.18.2.12")
    )
    parts = [
        tuple_attr(ct.CTA_TUPLE_ORIG, client, vip, 6, 40000, 80),
        tuple_attr(ct.CTA_TUPLE_REPLY, backend, client, 6, 8080, 40000),
        attr(CTA_STATUS, struct.pack(">I", 0x18E)),
        attr(ct.CTA_TIMEOUT, struct.pack(">I", 431999)),
        attr(ct.CTA_MARK, struct.pack(">I", mark)),
        attr(CTA_ID, struct.pack(">I", 0xDEADBEEF)),
    ]
    if tcp_state is not None:
        parts.append(
            nested(
                ct.CTA_PROTOINFO,
                nested(
                    ct.CTA_PROTOINFO_TCP,
                    attr(ct.CTA_PROTOINFO_TCP_STATE, bytes([tcp_state])),
                    attr(2, b"\x07"),  # CTA_PROTOINFO_TCP_WSCALE_ORIGINAL
                ),
            )
        )
    family = socket.AF_INET6 if v6 else socket.AF_INET
    return message(ct.CT_NEW, seq, b"".join(parts), family)


def done(seq: int) -> bytes:
    return nlmsg.HEADER.pack(nlmsg.HEADER.size + 4, nlmsg.NLMSG_DONE, 0x2, seq, 0) + b"\0" * 4


def error(seq: int, errno: int) -> bytes:
    body = struct.pack("=i", -errno) + nlmsg.HEADER.pack(nlmsg.HEADER.size, ct.CT_GET, 0, seq, 0)
    return nlmsg.HEADER.pack(nlmsg.HEADER.size + len(body), nlmsg.NLMSG_ERROR, 0, seq, 0) + body


def test_an_entry_is_decoded_field_by_field() -> None:
    entries, finished = ct.read_messages(entry_message(7, mark=42), seq=7)
    assert not finished
    assert entries == [
        ct.RawEntry(
            orig=ct.Tuple(6, ip_address("198.18.1.10"), 40000, ip_address("198.18.0.10"), 80),
            reply=ct.Tuple(6, ip_address("198.18.2.12"), 8080, ip_address("198.18.1.10"), 40000),
            mark=42,
            timeout=431999,
            tcp_state="ESTABLISHED",
        )
    ]


def test_ipv6_udp_and_a_whole_dump_in_one_buffer() -> None:
    buffer = (
        entry_message(3, mark=1, v6=True)
        + entry_message(3, mark=2, tcp_state=None)
        + entry_message(3, mark=3, tcp_state=7)
        + done(3)
    )
    entries, finished = ct.read_messages(buffer, seq=3)
    assert finished
    assert [e.mark for e in entries] == [1, 2, 3]
    assert entries[0].orig.src == ip_address("2001:2:0:1::10")
    assert entries[0].reply.src == ip_address("2001:2:0:2::12")
    assert entries[1].tcp_state is None
    assert entries[2].tcp_state == "TIME_WAIT"


def test_messages_of_another_request_are_skipped() -> None:
    entries, finished = ct.read_messages(entry_message(1) + done(1) + entry_message(2), seq=2)
    assert len(entries) == 1 and not finished


def test_an_error_answer_raises_with_its_errno() -> None:
    with pytest.raises(NetlinkError) as raised:
        ct.read_messages(error(5, 1), seq=5)
    assert raised.value.errno == 1


def test_a_zero_error_ends_the_dump() -> None:
    assert ct.read_messages(error(5, 0), seq=5) == ([], True)


def test_a_truncated_message_raises() -> None:
    with pytest.raises(NetlinkError, match="truncated"):
        ct.read_messages(entry_message(4)[:-8], seq=4)


def test_an_entry_without_a_reply_tuple_is_dropped() -> None:
    body = tuple_attr(ct.CTA_TUPLE_ORIG, "198.18.1.10", "198.18.0.10", 6, 1, 2)
    assert ct.read_messages(message(ct.CT_NEW, 9, body), seq=9) == ([], False)


def test_the_dump_request_asks_one_family_filtered_by_mark() -> None:
    request = ct.dump_request(socket.AF_INET6, seq=11, mark=5)
    length, kind, flags, seq, pid = nlmsg.HEADER.unpack_from(request)
    assert (length, kind, flags, seq, pid) == (len(request), 0x101, 0x301, 11, 0)
    family, version, res_id = nlmsg.NFGEN.unpack_from(request, nlmsg.HEADER.size)
    assert (family, version, res_id) == (socket.AF_INET6, 0, 0)
    attrs = request[nlmsg.HEADER.size + nlmsg.NFGEN.size :]
    assert attrs == attr(ct.CTA_MARK, struct.pack(">I", 5)) + attr(
        ct.CTA_MARK_MASK, b"\xff\xff\xff\xff"
    )
    unfiltered = ct.dump_request(socket.AF_INET, seq=12)
    assert len(unfiltered) == nlmsg.HEADER.size + nlmsg.NFGEN.size


def test_counting_keys_entries_by_mark_protocol_and_destination() -> None:
    buffer = (
        entry_message(8, mark=1)
        + entry_message(8, mark=1, tcp_state=7)
        + entry_message(8, mark=2, v6=True)
        + entry_message(8, mark=9)
    )
    counts, finished = ct.count_messages(buffer + done(8), seq=8)
    assert finished
    vip4, vip6 = ip_address("198.18.0.10").packed, ip_address("2001:2:0:ff00::10").packed
    assert counts == {(1, 6, vip4): 2, (2, 6, vip6): 1, (9, 6, vip4): 1}
