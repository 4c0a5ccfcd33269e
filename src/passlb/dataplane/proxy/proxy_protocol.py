"""PROXY protocol v1 and v2: encoder and incremental parser (sans-IO).

The wire format is HAProxy's "The PROXY protocol" (versions 1 and 2,
doc/proxy-protocol.txt). The encoder writes what passlb prepends to a backend
connection (or, for UDP, to every datagram: a datagram may be lost or
reordered, so none can be trusted to be "the first"). The parser reads a
header a client sends when `trust_inbound_proxy_protocol` is set, and serves
the tests.

Parser rules, strict on purpose (the header decides which address we believe):
- v1: "PROXY " then TCP4, TCP6 or UNKNOWN, the whole line at most 107 bytes
  including CRLF; addresses in canonical form, ports 0..65535 without leading
  zeros; a line that ends early or runs long is an error, never "need more".
- v2: the 12-byte signature, version 2, command LOCAL or PROXY, a known family
  and transport, and a length that holds the family's address block and at
  most `max_length` bytes; TLVs must tile the rest exactly.
Bytes are examined only as they arrive: a prefix that could still become a
valid header yields NEED_MORE, anything else raises ProxyProtocolError at the
first byte that rules it out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv6Address

from passlb.errors import PasslbError
from passlb.model import IPAddress

V1_MAX_LENGTH = 107  # spec section 2.1: worst case "PROXY UNKNOWN ..." line with CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16  # signature, version/command, family/transport, length
V2_MAX_LENGTH = 0xFFFF  # the 16-bit length field's own bound

_V1_PREFIX = b"PROXY "
_V2_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX


class ProxyProtocolError(PasslbError):
    """The peer sent bytes that are not a valid PROXY protocol header."""


class Transport(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class NeedMore(enum.Enum):
    """The bytes so far are a valid prefix of a header; feed more."""

    NEED_MORE = "need-more"


NEED_MORE = NeedMore.NEED_MORE


@dataclass(frozen=True)
class ProxyAddresses:
    transport: Transport
    src: IPAddress
    src_port: int
    dst: IPAddress
    dst_port: int


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    # None: the sender gives no usable address (v1 UNKNOWN, v2 LOCAL, UNSPEC or
    # AF_UNIX); the receiver then uses the connection's own addresses.
    addresses: ProxyAddresses | None
    length: int  # bytes the header took on the wire
    tlvs: tuple[tuple[int, bytes], ...] = ()


# ---------------------------------------------------------------- encoding


def encode_v1(src: IPAddress, src_port: int, dst: IPAddress, dst_port: int) -> bytes:
    """A v1 line for a TCP connection (v1 has no UDP)."""
    _check_pair(src, dst)
    _check_port(src_port)
    _check_port(dst_port)
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v1_unknown() -> bytes:
    return b"PROXY UNKNOWN\r\n"


def encode_v2(
    src: IPAddress,
    src_port: int,
    dst: IPAddress,
    dst_port: int,
    transport: Transport = Transport.TCP,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 PROXY-command header; UDP gets the DGRAM transport."""
    _check_pair(src, dst)
    _check_port(src_port)
    _check_port(dst_port)
    family = 0x1 if src.version == 4 else 0x2
    proto = 0x1 if transport is Transport.TCP else 0x2
    body = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV {tlv_type} does not fit the v2 format")
        body += struct.pack("!BH", tlv_type, len(value)) + value
    if len(body) > V2_MAX_LENGTH:
        raise ValueError("PROXY v2 header longer than 65535 bytes")
    return V2_SIGNATURE + bytes([0x21, (family << 4) | proto]) + struct.pack("!H", len(body)) + body


def encode_v2_local() -> bytes:
    """A v2 LOCAL header: the connection carries no client (health checks)."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def _check_pair(src: IPAddress, dst: IPAddress) -> None:
    if src.version != dst.version:
        raise ValueError(f"source {src} and destination {dst} are of different IP versions")


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")


# ---------------------------------------------------------------- parsing


class ProxyHeaderParser:
    """Feed bytes; get NEED_MORE, then one ProxyHeader (and the bytes after it).

    After a header is returned, `rest` holds the payload bytes that followed it
    in the fed data. The parser keeps at most one header's worth of bytes.
    """

    def __init__(self, *, max_length: int = V2_MAX_LENGTH) -> None:
        self._buffer = bytearray()
        self._max_v2_length = max_length
        self._result: ProxyHeader | None = None
        self.rest = b""

    def feed(self, data: bytes) -> ProxyHeader | NeedMore:
        if self._result is not None:
            raise ProxyProtocolError("header already parsed; the rest is payload")
        self._buffer += data
        result = self._parse()
        if result is NEED_MORE:
            return result
        assert isinstance(result, ProxyHeader)
        self._result = result
        self.rest = bytes(self._buffer[result.length :])
        self._buffer.clear()
        return result

    def _parse(self) -> ProxyHeader | NeedMore:
        buf = self._buffer
        if not buf:
            return NEED_MORE
        if buf[0] == _V1_PREFIX[0]:
            return self._parse_v1()
        if buf[0] == V2_SIGNATURE[0]:
            return self._parse_v2()
        raise ProxyProtocolError("not a PROXY protocol header")

    def _parse_v1(self) -> ProxyHeader | NeedMore:
        buf = self._buffer
        prefix_len = min(len(buf), len(_V1_PREFIX))
        if buf[:prefix_len] != _V1_PREFIX[:prefix_len]:
            raise ProxyProtocolError("not a PROXY protocol header")
        end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(buf) >= V1_MAX_LENGTH:
                raise ProxyProtocolError("v1 header longer than 107 bytes")
            if b"\n" in buf or b"\r" in buf[:-1]:
                raise ProxyProtocolError("v1 header has a stray CR or LF")
            return NEED_MORE
        line = bytes(buf[:end])
        return ProxyHeader(version=1, addresses=_parse_v1_line(line), length=end + 2)

    def _parse_v2(self) -> ProxyHeader | NeedMore:
        buf = self._buffer
        sig_len = min(len(buf), len(V2_SIGNATURE))
        if buf[:sig_len] != V2_SIGNATURE[:sig_len]:
            raise ProxyProtocolError("not a PROXY protocol header")
        if len(buf) >= 13:
            version, command = buf[12] >> 4, buf[12] & 0xF
            if version != 2:
                raise ProxyProtocolError(f"v2 signature with version {version}")
            if command not in (0x0, 0x1):
                raise ProxyProtocolError(f"v2 command {command} is neither LOCAL nor PROXY")
        if len(buf) >= 14:
            family, proto = buf[13] >> 4, buf[13] & 0xF
            if family > 0x3 or proto > 0x2:
                raise ProxyProtocolError(f"v2 family/transport byte {buf[13]:#04x} is unknown")
        if len(buf) < V2_FIXED_LENGTH:
            return NEED_MORE
        (length,) = struct.unpack_from("!H", buf, 14)
        if length > self._max_v2_length:
            raise ProxyProtocolError(f"v2 header length {length} over the limit")
        family, proto = buf[13] >> 4, buf[13] & 0xF
        address_len = _V2_ADDRESS_LENGTHS.get(family, 0)
        if length < address_len:
            raise ProxyProtocolError(f"v2 length {length} too short for its address block")
        total = V2_FIXED_LENGTH + length
        if len(buf) < total:
            return NEED_MORE
        body = bytes(buf[V2_FIXED_LENGTH:total])
        tlvs = _parse_tlvs(body[address_len:])
        is_proxy_command = buf[12] & 0xF == 0x1
        addresses = None
        if is_proxy_command and family in (0x1, 0x2) and proto in (0x1, 0x2):
            addresses = _v2_addresses(family, proto, body)
        return ProxyHeader(version=2, addresses=addresses, length=total, tlvs=tlvs)


def _parse_v1_line(line: bytes) -> ProxyAddresses | None:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as e:
        raise ProxyProtocolError("v1 header is not ASCII") from e
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return None  # spec: the receiver ignores everything after UNKNOWN
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("v1 header is not 'PROXY TCP4|TCP6 src dst sport dport'")
    address_type: type[IPv4Address] | type[IPv6Address] = (
        IPv4Address if fields[1] == "TCP4" else IPv6Address
    )
    try:
        src, dst = address_type(fields[2]), address_type(fields[3])
    except AddressValueError as e:
        raise ProxyProtocolError(f"v1 header address invalid: {e}") from e
    return ProxyAddresses(
        transport=Transport.TCP,
        src=src,
        src_port=_parse_v1_port(fields[4]),
        dst=dst,
        dst_port=_parse_v1_port(fields[5]),
    )


def _parse_v1_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1 header port {text!r} is not a decimal number")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError(f"v1 header port {port} out of range")
    return port


def _v2_addresses(family: int, proto: int, body: bytes) -> ProxyAddresses:
    transport = Transport.TCP if proto == 0x1 else Transport.UDP
    if family == 0x1:
        src4, dst4 = IPv4Address(body[0:4]), IPv4Address(body[4:8])
        sport, dport = struct.unpack_from("!HH", body, 8)
        return ProxyAddresses(transport, src4, sport, dst4, dport)
    src6, dst6 = IPv6Address(body[0:16]), IPv6Address(body[16:32])
    sport, dport = struct.unpack_from("!HH", body, 32)
    return ProxyAddresses(transport, src6, sport, dst6, dport)


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError("v2 TLV header truncated")
        tlv_type, tlv_len = struct.unpack_from("!BH", data, offset)
        offset += 3
        if tlv_len > len(data) - offset:
            raise ProxyProtocolError(f"v2 TLV {tlv_type:#04x} runs past the header")
        tlvs.append((tlv_type, data[offset : offset + tlv_len]))
        offset += tlv_len
    return tuple(tlvs)


def parse(data: bytes, *, max_length: int = V2_MAX_LENGTH) -> tuple[ProxyHeader, bytes]:
    """Parse a complete header from `data`; returns it and the bytes after it."""
    parser = ProxyHeaderParser(max_length=max_length)
    result = parser.feed(data)
    if result is NEED_MORE:
        raise ProxyProtocolError("header incomplete")
    assert isinstance(result, ProxyHeader)
    return result, parser.rest
