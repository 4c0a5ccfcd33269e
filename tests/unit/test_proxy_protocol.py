"""PROXY protocol v1/v2: encoder, strict incremental parser, fuzzing."""

from __future__ import annotations

import contextlib
import itertools
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passlb.dataplane.proxy.proxy_protocol import (
    NEED_MORE,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyAddresses,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    Transport,
    encode_v1,
    encode_v1_unknown,
    encode_v2,
    encode_v2_local,
    parse,
)

V4_SRC, V4_DST = IPv4Address("198.18.0.7"), IPv4Address("198.19.0.1")
V6_SRC, V6_DST = IPv6Address("2001:db8::7"), IPv6Address("2001:db8::1")


def test_v1_tcp4_is_the_spec_line() -> None:
    assert (
        encode_v1(V4_SRC, 56324, V4_DST, 443) == b"PROXY TCP4 198.18.0.7 198.19.0.1 56324 443\r\n"
    )


def test_v1_tcp6_round_trips() -> None:
    header, rest = parse(encode_v1(V6_SRC, 1, V6_DST, 65535) + b"GET /")
    assert header == ProxyHeader(
        version=1,
        addresses=ProxyAddresses(Transport.TCP, V6_SRC, 1, V6_DST, 65535),
        length=len(encode_v1(V6_SRC, 1, V6_DST, 65535)),
    )
    assert rest == b"GET /"


def test_v1_unknown_has_no_addresses() -> None:
    header, _ = parse(encode_v1_unknown())
    assert header.addresses is None
    header, _ = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert header.addresses is None


def test_v2_tcp4_layout() -> None:
    raw = encode_v2(V4_SRC, 56324, V4_DST, 443)
    assert raw[:12] == V2_SIGNATURE
    assert raw[12:16] == bytes([0x21, 0x11]) + struct.pack("!H", 12)
    assert raw[16:] == V4_SRC.packed + V4_DST.packed + struct.pack("!HH", 56324, 443)


@pytest.mark.parametrize(
    ("src", "dst", "transport", "fam"),
    [
        (V4_SRC, V4_DST, Transport.TCP, 0x11),
        (V4_SRC, V4_DST, Transport.UDP, 0x12),
        (V6_SRC, V6_DST, Transport.TCP, 0x21),
        (V6_SRC, V6_DST, Transport.UDP, 0x22),
    ],
)
def test_v2_round_trips_every_family(
    src: IPv4Address | IPv6Address, dst: IPv4Address | IPv6Address, transport: Transport, fam: int
) -> None:
    raw = encode_v2(src, 1234, dst, 53, transport, tlvs=((0x04, b"\x00\x01"),))
    assert raw[13] == fam
    header, rest = parse(raw + b"payload")
    assert header.addresses == ProxyAddresses(transport, src, 1234, dst, 53)
    assert header.tlvs == ((0x04, b"\x00\x01"),)
    assert header.length == len(raw)
    assert rest == b"payload"


def test_v2_local_has_no_addresses() -> None:
    header, rest = parse(encode_v2_local())
    assert header.version == 2 and header.addresses is None and rest == b""


def test_mixed_families_are_refused_by_the_encoder() -> None:
    with pytest.raises(ValueError):
        encode_v1(V4_SRC, 1, V6_DST, 2)
    with pytest.raises(ValueError):
        encode_v2(V6_SRC, 1, V4_DST, 2)


@pytest.mark.parametrize(
    "raw",
    [
        encode_v1(V4_SRC, 56324, V4_DST, 443),
        encode_v2(V6_SRC, 9, V6_DST, 10, Transport.UDP),
    ],
)
def test_parser_needs_more_until_the_last_byte(raw: bytes) -> None:
    parser = ProxyHeaderParser()
    for byte in raw[:-1]:
        assert parser.feed(bytes([byte])) is NEED_MORE
    result = parser.feed(raw[-1:] + b"x")
    assert isinstance(result, ProxyHeader) and result.length == len(raw)
    assert parser.rest == b"x"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # double space
        b"PROXY TCP4 ::1 ::2 1 2\r\n",  # v6 address under TCP4
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",  # a non-ASCII digit
        b"PROXY " + b"x" * 200,
        V2_SIGNATURE + bytes([0x11, 0x11]) + struct.pack("!H", 12) + bytes(12),  # version 1
        V2_SIGNATURE + bytes([0x22, 0x11]) + struct.pack("!H", 12) + bytes(12),  # command 2
        V2_SIGNATURE + bytes([0x21, 0x41]) + struct.pack("!H", 12) + bytes(12),  # family 4
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 11) + bytes(11),  # short block
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 14) + bytes(14),  # torn TLV
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 16) + bytes(12) + b"\x01\x00\x09x",
        V2_SIGNATURE[:11] + b"X",
    ],
)
def test_malformed_headers_are_refused(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(raw)


def test_v1_line_without_end_fails_at_the_length_bound() -> None:
    parser = ProxyHeaderParser()
    line = b"PROXY UNKNOWN " + b"a" * (V1_MAX_LENGTH - 15)
    assert parser.feed(line) is NEED_MORE
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"a")


def test_v2_length_over_the_limit_fails_before_the_body_arrives() -> None:
    parser = ProxyHeaderParser(max_length=100)
    with pytest.raises(ProxyProtocolError, match="over the limit"):
        parser.feed(V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 101))


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
)
ports = st.integers(0, 65535)


@given(addresses, ports, ports, st.sampled_from(list(Transport)), st.binary(max_size=64))
def test_v2_round_trip_property(
    pair: tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address],
    sport: int,
    dport: int,
    transport: Transport,
    payload: bytes,
) -> None:
    src, dst = pair
    header, rest = parse(encode_v2(src, sport, dst, dport, transport) + payload)
    assert header.addresses == ProxyAddresses(transport, src, sport, dst, dport)
    assert rest == payload


@given(addresses, ports, ports)
def test_v1_round_trip_property(
    pair: tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address], sport: int, dport: int
) -> None:
    src, dst = pair
    raw = encode_v1(src, sport, dst, dport)
    assert len(raw) <= V1_MAX_LENGTH
    header, _ = parse(raw)
    assert header.addresses == ProxyAddresses(Transport.TCP, src, sport, dst, dport)


def _feed_in_chunks(data: bytes, cuts: list[int]) -> ProxyHeader | None:
    parser = ProxyHeaderParser()
    edges = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(edges):
        result = parser.feed(data[start:end])
        if isinstance(result, ProxyHeader):
            assert result.length <= end  # decided only from bytes given
            return result
    return None


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_random_bytes_only_raise_our_error(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(ProxyProtocolError):
        _feed_in_chunks(data, cuts)


@given(
    st.sampled_from(
        [
            encode_v1(V4_SRC, 56324, V4_DST, 443),
            encode_v1(V6_SRC, 1, V6_DST, 2),
            encode_v2(V4_SRC, 1, V4_DST, 2, Transport.UDP, tlvs=((1, b"h2"),)),
            encode_v2(V6_SRC, 1, V6_DST, 2),
        ]
    ),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.lists(st.integers(0, 300), max_size=6),
)
def test_mutated_headers_parse_or_fail_cleanly(
    raw: bytes, mutations: list[tuple[int, int]], cuts: list[int]
) -> None:
    data = bytearray(raw)
    for position, value in mutations:
        if position < len(data):
            data[position] = value
    try:
        result = _feed_in_chunks(bytes(data), cuts)
    except ProxyProtocolError:
        return
    if result is not None and result.addresses is not None:
        assert result.addresses.src == ip_address(str(result.addresses.src))
        assert 0 <= result.addresses.src_port <= 65535
