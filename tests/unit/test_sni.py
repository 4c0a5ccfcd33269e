"""ClientHello peeking and server-name routing."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passlb.dataplane.proxy.sni import (
    NEED_MORE,
    ClientHelloError,
    ClientHelloPeeker,
    Found,
    NotTlsError,
    SniError,
    SniRouter,
    parse_client_hello,
)
from passlb.dataplane.proxy.testing import client_hello, refragment
from passlb.model import SniFallback, SniRoute

HELLO = client_hello("api.example.com")
HELLO12 = client_hello("Legacy.Example.COM", tls13=False)
HELLO_NO_SNI = client_hello(None)


def _hello_body(server_names: list[tuple[int, bytes]] | None, *, extra: bytes = b"") -> bytes:
    """A minimal hand-made ClientHello body (TLS 1.2 layout)."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if server_names is None:
        return body
    entries = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in server_names)
    sni_ext = struct.pack("!H", len(entries)) + entries
    exts = struct.pack("!HH", 0, len(sni_ext)) + sni_ext + extra
    return body + struct.pack("!H", len(exts)) + exts


def _record(body: bytes) -> bytes:
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


@pytest.mark.parametrize(
    ("hello", "name"),
    [(HELLO, "api.example.com"), (HELLO12, "legacy.example.com"), (HELLO_NO_SNI, None)],
)
def test_real_hellos(hello: bytes, name: str | None) -> None:
    assert ClientHelloPeeker().feed(hello) == Found(name)


def test_byte_by_byte_across_one_byte_records() -> None:
    data = refragment(HELLO, 1)  # every handshake byte in its own record
    peeker = ClientHelloPeeker(limit=len(data))
    results = [peeker.feed(bytes([b])) for b in data]
    assert results[:-1] == [NEED_MORE] * (len(data) - 1)
    assert results[-1] == Found("api.example.com")


@pytest.mark.parametrize("fragment", [3, 100, 300])
def test_handshake_spanning_records(fragment: int) -> None:
    assert ClientHelloPeeker().feed(refragment(HELLO, fragment)) == Found("api.example.com")


def test_not_tls_is_known_from_the_first_byte() -> None:
    with pytest.raises(NotTlsError):
        ClientHelloPeeker().feed(b"G")
    with pytest.raises(NotTlsError):
        ClientHelloPeeker().feed(b"\x16\x02")


def test_hello_without_extensions_has_no_name() -> None:
    assert parse_client_hello(_hello_body(None)) is None


def test_unknown_name_types_are_skipped_and_name_normalized() -> None:
    body = _hello_body([(7, b"ignored"), (0, b"WWW.Example.com.")])
    assert ClientHelloPeeker().feed(_record(body)) == Found("www.example.com")


@pytest.mark.parametrize(
    "data",
    [
        _record(_hello_body([(0, b"a.com"), (0, b"b.com")])),  # two host names
        _record(_hello_body([(0, b"bad name.com")])),
        _record(_hello_body([(0, b"\xff.com")])),
        _record(_hello_body([(0, b"")])),
        _record(_hello_body([(0, b"a.com")], extra=b"\x00\x00\x00\x00")),  # repeated ext
        _record(_hello_body([(0, b"a.com")])[:-1] + b""),  # truncated extension
        _record(_hello_body([(0, b"a.com")]) + b"\x00"),  # bytes after extensions
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x07\x00\x05",  # record version 3.7
        b"\x16\x03\x01\x00\x02\x01\x00" + b"\x17\x03\x01\x00\x01\x00",  # app data mid-hello
    ],
)
def test_malformed_hellos_are_refused(data: bytes) -> None:
    with pytest.raises(ClientHelloError):
        ClientHelloPeeker().feed(data)


def test_oversized_hello_is_refused_once_its_length_is_known() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (20000).to_bytes(3, "big")
    with pytest.raises(ClientHelloError, match="limit"):
        ClientHelloPeeker().feed(header)


def test_the_limit_bounds_what_is_read() -> None:
    data = refragment(HELLO, 1)  # 6 bytes per handshake byte
    peeker = ClientHelloPeeker(limit=1000)
    with pytest.raises(ClientHelloError, match="larger than"):
        peeker.feed(data)


ROUTES = (
    SniRoute(server_names=("api.example.com", "*.Example.com"), pool="a"),
    SniRoute(server_names=("*.b.test", "exact.b.test"), pool="b"),
    SniRoute(server_names=("www.example.com",), pool="www"),
)


@pytest.mark.parametrize(
    ("name", "pool"),
    [
        ("api.example.com", "a"),
        ("API.EXAMPLE.COM.", "a"),
        ("other.example.com", "a"),
        ("www.example.com", "www"),  # exact beats wildcard
        ("x.y.example.com", "default"),  # a wildcard covers one label
        ("example.com", "default"),
        ("exact.b.test", "b"),
        ("q.b.test", "b"),
        ("b.test", "default"),
        (None, "default"),
    ],
)
def test_routing_with_default_pool(name: str | None, pool: str) -> None:
    assert SniRouter(ROUTES, SniFallback.DEFAULT_POOL).pool_for(name) == pool


def test_routing_with_close_fallback() -> None:
    router = SniRouter(ROUTES, SniFallback.CLOSE)
    assert router.pool_for("nope.test") is None
    assert router.pool_for(None) is None
    assert router.pool_for("z.example.com") == "a"


def _feed_in_chunks(data: bytes, cuts: list[int]) -> Found | None:
    peeker = ClientHelloPeeker()
    edges = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(edges):
        result = peeker.feed(data[start:end])
        if isinstance(result, Found):
            return result
    return None


@settings(max_examples=300)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_random_bytes_only_raise_our_error(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(SniError):
        _feed_in_chunks(b"\x16\x03\x01" + data, cuts)


@settings(max_examples=300)
@given(
    st.sampled_from([HELLO, HELLO12, refragment(HELLO, 50)]),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=6),
    st.lists(st.integers(0, 700), max_size=6),
)
def test_mutated_hellos_parse_or_fail_cleanly(
    hello: bytes, mutations: list[tuple[int, int]], cuts: list[int]
) -> None:
    data = bytearray(hello)
    for position, value in mutations:
        if position < len(data):
            data[position] = value
    try:
        found = _feed_in_chunks(bytes(data), cuts)
    except SniError:
        return
    if found is not None and found.server_name is not None:
        # The name came from the bytes given: it is in them, as sent.
        assert found.server_name.encode() in bytes(data).lower()


@given(st.integers(1, len(HELLO) - 1))
def test_truncated_hellos_only_need_more(cut: int) -> None:
    assert ClientHelloPeeker().feed(HELLO[:cut]) is NEED_MORE
