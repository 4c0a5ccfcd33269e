"""TLS ClientHello peeking and server-name routing (sans-IO).

The proxy reads the client's first bytes, finds the server_name extension
(RFC 6066 section 3) and picks a pool, then forwards those same bytes to the
backend untouched: TLS stays end to end.

Layout read (RFC 8446 section 4.1.2; TLS 1.0-1.2 use the same bytes):
  record:      type(1)=22 version(2)=3.x length(2)<=2^14+256 fragment
  handshake:   type(1)=1 length(3) body        (may span several records)
  ClientHello: legacy_version(2) random(32) session_id<0..32>
               cipher_suites<2..2^16-2> compression_methods<1..2^8-1>
               [extensions<0..2^16-1>]          (absent in old TLS 1.0 hellos)
  server_name: server_name_list<1..2^16-1> of name_type(1) name<1..2^16-1>

Every length is checked against the bytes actually held before it is used;
anything malformed raises ClientHelloError, anything that is not a TLS
handshake at all raises NotTlsError. The peeker never asks for more than
`limit` bytes (16 KiB by default).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from passlb.errors import PasslbError
from passlb.model import DEFAULT_POOL, SniFallback, SniRoute

DEFAULT_LIMIT = 16 * 1024

_RECORD_HEADER = 5
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST = 0
_MAX_RECORD_FRAGMENT = 2**14 + 256  # RFC 5246 6.2.3: ciphertext bound, generous for plaintext
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class SniError(PasslbError):
    """The client's first bytes cannot be routed by server name."""


class NotTlsError(SniError):
    """The first bytes are not a TLS handshake record."""


class ClientHelloError(SniError):
    """A TLS handshake that is malformed, too large, or not a ClientHello."""


class NeedMore(enum.Enum):
    NEED_MORE = "need-more"


NEED_MORE = NeedMore.NEED_MORE


@dataclass(frozen=True)
class Found:
    server_name: str | None  # lower-cased host name; None: the hello carries no SNI


class ClientHelloPeeker:
    """Feed the client's bytes as they arrive; NEED_MORE until the verdict.

    The caller keeps the bytes it fed (they go to the backend unchanged); the
    peeker only reads them.
    """

    def __init__(self, *, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = limit
        self._received = bytearray()
        self._handshake = bytearray()  # handshake bytes reassembled from records
        self._offset = 0  # start of the next unread record in _received

    def feed(self, data: bytes) -> Found | NeedMore:
        if len(self._received) + len(data) > self._limit:
            data = data[: self._limit - len(self._received)]
            self._received += data
            result = self._advance()
            if result is NEED_MORE:
                raise ClientHelloError(f"ClientHello larger than {self._limit} bytes")
            return result
        self._received += data
        return self._advance()

    def _advance(self) -> Found | NeedMore:
        buf = self._received
        while True:
            header = buf[self._offset : self._offset + _RECORD_HEADER]
            _check_record_header_prefix(bytes(header), first=self._offset == 0)
            if len(header) < _RECORD_HEADER:
                return NEED_MORE
            length = int.from_bytes(header[3:5], "big")
            if length == 0 or length > _MAX_RECORD_FRAGMENT:
                raise ClientHelloError(f"TLS record length {length} invalid")
            start = self._offset + _RECORD_HEADER
            fragment = buf[start : start + length]
            if len(fragment) < length:
                # Look into the partial fragment early: a wrong handshake type or
                # an oversized hello is known before its record completes.
                _check_handshake_prefix(bytes(self._handshake + fragment), self._limit)
                return NEED_MORE
            self._handshake += fragment
            self._offset = start + length
            _check_handshake_prefix(bytes(self._handshake), self._limit)
            if len(self._handshake) >= 4:
                body_len = int.from_bytes(self._handshake[1:4], "big")
                if len(self._handshake) >= 4 + body_len:
                    body = bytes(self._handshake[4 : 4 + body_len])
                    return Found(server_name=parse_client_hello(body))


def _check_record_header_prefix(header: bytes, *, first: bool) -> None:
    if len(header) >= 1 and header[0] != _HANDSHAKE:
        if first:
            raise NotTlsError("first byte is not a TLS handshake record")
        raise ClientHelloError(f"TLS record type {header[0]} inside the ClientHello")
    if len(header) >= 2 and header[1] != 3:
        if first:
            raise NotTlsError("TLS record version is not 3.x")
        raise ClientHelloError("TLS record version is not 3.x")
    if len(header) >= 3 and header[2] > 4:
        raise ClientHelloError(f"TLS record version 3.{header[2]} unknown")


def _check_handshake_prefix(handshake: bytes, limit: int) -> None:
    if len(handshake) >= 1 and handshake[0] != _CLIENT_HELLO:
        raise ClientHelloError(f"handshake type {handshake[0]} is not ClientHello")
    if len(handshake) >= 4:
        body_len = int.from_bytes(handshake[1:4], "big")
        if body_len + 4 > limit:
            raise ClientHelloError(f"ClientHello of {body_len} bytes over the {limit} limit")


class _Reader:
    """Bounds-checked reads over one byte string."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise ClientHelloError(f"{what} runs past the end of its container")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def take_all(self) -> bytes:
        return self.take(self.remaining, "rest")

    def vector(self, length_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(length_size, what), what))


def parse_client_hello(body: bytes) -> str | None:
    """The server name a ClientHello body asks for, or None when it has none."""
    hello = _Reader(body)
    hello.take(2, "legacy_version")
    hello.take(32, "random")
    session_id = hello.vector(1, "session_id")
    if session_id.remaining > 32:
        raise ClientHelloError("session_id longer than 32 bytes")
    ciphers = hello.vector(2, "cipher_suites")
    if ciphers.remaining < 2 or ciphers.remaining % 2:
        raise ClientHelloError("cipher_suites length invalid")
    if hello.vector(1, "compression_methods").remaining < 1:
        raise ClientHelloError("compression_methods empty")
    if hello.remaining == 0:
        return None  # a hello without extensions (TLS 1.0 allows it)
    extensions = hello.vector(2, "extensions")
    if hello.remaining:
        raise ClientHelloError("bytes after the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    while extensions.remaining:
        ext_type = extensions.uint(2, "extension type")
        ext_data = extensions.vector(2, "extension data")
        if ext_type in seen:
            raise ClientHelloError(f"extension {ext_type} repeated")  # RFC 8446 4.2
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(ext_data)
    return server_name


def _parse_server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, "server_name_list")
    if ext.remaining:
        raise ClientHelloError("bytes after server_name_list")
    host: str | None = None
    while names.remaining:
        name_type = names.uint(1, "name_type")
        name = names.vector(2, "server name").take_all()
        if name_type != _NAME_TYPE_HOST:
            continue  # RFC 6066: unknown name types are skipped
        if host is not None:
            raise ClientHelloError("two host_name entries")  # RFC 6066 section 3
        host = normalize_name(name)
    return host


def normalize_name(raw: bytes) -> str:
    """A host name as routing compares it: ASCII, lower case, no trailing dot."""
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError as e:
        raise ClientHelloError("server name is not ASCII") from e
    name = name.removesuffix(".")
    if not 0 < len(name) <= 253 or not _HOST_NAME.fullmatch(name):
        raise ClientHelloError(f"server name {name!r} is not a host name")
    return name


# ---------------------------------------------------------------- routing


class SniRouter:
    """Server name -> pool: exact names first, then one-label wildcards.

    "*.example.com" matches "a.example.com" but neither "example.com" nor
    "a.b.example.com" (as a wildcard in a TLS certificate does, RFC 6125 6.4.3).
    """

    def __init__(self, routes: Iterable[SniRoute], fallback: SniFallback) -> None:
        self._exact: dict[str, str] = {}
        self._wildcard: dict[str, str] = {}  # parent domain -> pool
        for route in routes:
            for pattern in route.server_names:
                name = pattern.lower().removesuffix(".")
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], route.pool)
                else:
                    self._exact.setdefault(name, route.pool)
        self._fallback = DEFAULT_POOL if fallback is SniFallback.DEFAULT_POOL else None

    def pool_for(self, server_name: str | None) -> str | None:
        """The pool for this name; None means close the connection."""
        if server_name is None:
            return self._fallback
        name = server_name.lower().removesuffix(".")
        if name in self._exact:
            return self._exact[name]
        _, dot, parent = name.partition(".")
        if dot and parent in self._wildcard:
            return self._wildcard[parent]
        return self._fallback
