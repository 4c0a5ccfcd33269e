"""The jhash twin and the flow key layout (kernel proof: tests/kernel/test_jhash_kernel.py)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passlb.hashing.flowkey import (
    L4PROTO,
    hash_fields,
    hash_key_bytes,
    hash_key_words,
    ring_slot,
    service_seed,
)
from passlb.hashing.jhash import jhash, jhash_words, nft_jhash, reciprocal_scale
from passlb.model import Affinity, Backend, Mode, PortSet, Protocol, Service

MASK = 0xFFFFFFFF


def rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & MASK


def kernel_jhash_transcribed(key: bytes, initval: int) -> int:
    """include/linux/jhash.h line by line: the tail as the kernel's fall-through switch."""
    a = b = c = (0xDEADBEEF + len(key) + initval) & MASK
    length, k = len(key), 0

    def word(at: int) -> int:
        return key[at] | key[at + 1] << 8 | key[at + 2] << 16 | key[at + 3] << 24

    while length > 12:
        a, b, c = (a + word(k)) & MASK, (b + word(k + 4)) & MASK, (c + word(k + 8)) & MASK
        for x, y, z, s in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19),
                           (2, 1, 0, 4)):  # fmt: skip
            v = [a, b, c]
            v[x] = ((v[x] - v[y]) & MASK) ^ rol(v[y], s)
            v[y] = (v[y] + v[z]) & MASK
            a, b, c = v
        length -= 12
        k += 12
    if length == 0:
        return c
    regs = [a, b, c]
    for i in range(length - 1, -1, -1):  # case 12 ... case 1
        regs[i // 4] = (regs[i // 4] + (key[k + i] << (8 * (i % 4)))) & MASK
    a, b, c = regs
    for x, y, s in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14),
                    (2, 1, 24)):  # fmt: skip
        v = [a, b, c]
        v[x] = ((v[x] ^ v[y]) - rol(v[y], s)) & MASK
        a, b, c = v
    return c


def test_lookup3_reference_vectors() -> None:
    # Bob Jenkins' lookup3.c driver5(): hashlittle() on a little-endian machine,
    # which the kernel's jhash() equals.
    assert jhash(b"") == 0xDEADBEEF
    assert jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_block_boundaries_are_pinned() -> None:
    # 12 and 24 bytes: the last full block goes through the tail switch, not the mix loop.
    assert jhash(bytes(range(12)), 0) == 0x5E4AA593
    assert jhash(bytes(range(24)), 7) == 0x6BC17C66


@given(st.binary(max_size=64), st.integers(0, MASK))
def test_matches_a_line_by_line_transcription(key: bytes, seed: int) -> None:
    assert jhash(key, seed) == kernel_jhash_transcribed(key, seed)


@given(st.integers(0, MASK), st.integers(1, 1 << 24))
def test_reciprocal_scale_lands_in_range(value: int, modulus: int) -> None:
    scaled = reciprocal_scale(value, modulus)
    assert 0 <= scaled < modulus
    assert scaled == value * modulus // (1 << 32)


def test_nft_jhash_scales_then_adds_the_offset() -> None:
    key = b"\xc6\x12\x00\x01"
    h = jhash(key, 5)
    assert nft_jhash(key, 65537, 5) == (h * 65537) >> 32
    assert nft_jhash(key, 65537, 5, offset=100) == ((h * 65537) >> 32) + 100


V4_SRC, V4_DST = IPv4Address("198.18.0.7"), IPv4Address("198.18.0.10")
V6_SRC, V6_DST = IPv6Address("2001:db8::7"), IPv6Address("2001:db8::10")


@pytest.mark.parametrize(
    ("affinity", "family", "fields"),
    [
        (
            Affinity.FIVE_TUPLE,
            4,
            ("ip saddr", "th sport", "ip daddr", "th dport", "meta l4proto"),
        ),
        (
            Affinity.FIVE_TUPLE,
            6,
            ("ip6 saddr", "th sport", "ip6 daddr", "th dport", "meta l4proto"),
        ),
        (Affinity.CLIENT_IP_PROTO, 4, ("ip saddr", "meta l4proto")),
        (Affinity.CLIENT_IP_PROTO, 6, ("ip6 saddr", "meta l4proto")),
        (Affinity.CLIENT_IP, 4, ("ip saddr",)),
        (Affinity.CLIENT_IP, 6, ("ip6 saddr",)),
    ],
)
def test_hash_fields(affinity: Affinity, family: int, fields: tuple[str, ...]) -> None:
    assert hash_fields(affinity, family) == fields


def test_hash_fields_refuses_an_unknown_family() -> None:
    with pytest.raises(ValueError, match="4 or 6"):
        hash_fields(Affinity.CLIENT_IP, 2)


def test_five_tuple_key_is_nft_register_layout() -> None:
    key = hash_key_bytes(Affinity.FIVE_TUPLE, V4_SRC, 40000, V4_DST, 443, L4PROTO["tcp"])
    assert key.hex(" ", 4) == "c6120007 9c400000 c612000a 01bb0000 06000000"


def test_v6_and_shorter_keys() -> None:
    udp = L4PROTO["udp"]
    v6 = hash_key_bytes(Affinity.FIVE_TUPLE, V6_SRC, 1, V6_DST, 53, udp)
    assert len(v6) == 44
    assert v6 == V6_SRC.packed + b"\0\x01\0\0" + V6_DST.packed + b"\0\x35\0\0" + b"\x11\0\0\0"
    assert hash_key_bytes(Affinity.CLIENT_IP_PROTO, V4_SRC, 1, V4_DST, 2, udp) == (
        V4_SRC.packed + b"\x11\0\0\0"
    )
    assert hash_key_bytes(Affinity.CLIENT_IP, V6_SRC, 1, V6_DST, 2, udp) == V6_SRC.packed


def test_key_refuses_mixed_families() -> None:
    with pytest.raises(ValueError, match="mixes"):
        hash_key_bytes(Affinity.CLIENT_IP, V4_SRC, 1, V6_DST, 2, 6)


def test_key_words_refuse_mixed_families() -> None:
    with pytest.raises(ValueError, match="mixes"):
        hash_key_words(Affinity.CLIENT_IP, V6_SRC, 1, V4_DST, 2, 6)


flows = st.one_of(
    st.tuples(st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
              st.builds(IPv4Address, st.integers(0, 2**32 - 1))),
    st.tuples(st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
              st.builds(IPv6Address, st.integers(0, 2**128 - 1))),
)  # fmt: skip


@given(
    st.sampled_from(Affinity),
    flows,
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.sampled_from(sorted(L4PROTO.values())),
    st.integers(0, MASK),
    st.integers(1, 1 << 20),
)
def test_ring_slot_is_nft_jhash_of_the_key(
    affinity: Affinity,
    addresses: tuple[IPv4Address, IPv4Address] | tuple[IPv6Address, IPv6Address],
    sport: int,
    dport: int,
    l4proto: int,
    seed: int,
    ring_size: int,
) -> None:
    # ring_slot hashes words built from the values; the bytes are the definition.
    src, dst = addresses
    key = hash_key_bytes(affinity, src, sport, dst, dport, l4proto)
    words = hash_key_words(affinity, src, sport, dst, dport, l4proto)
    assert words == struct.unpack(f"<{len(key) // 4}I", key)
    slot = ring_slot(affinity, seed, ring_size, src, sport, dst, dport, l4proto)
    assert slot == nft_jhash(key, ring_size, seed)


@given(st.lists(st.integers(0, MASK), max_size=16), st.integers(0, MASK))
def test_jhash_words_is_jhash_of_their_bytes(words: list[int], seed: int) -> None:
    data = struct.pack(f"<{len(words)}I", *words)
    assert jhash_words(words, len(data), seed) == kernel_jhash_transcribed(data, seed)


def service(name: str, seed: int | None = None) -> Service:
    return Service(
        name=name,
        vip=V4_DST,
        protocol=Protocol.TCP,
        ports=PortSet(all_ports=True),
        mode=Mode.DSR,
        backends=(Backend(V4_SRC),),
        hash_seed=seed,
    )


def test_service_seed_is_configured_or_derived_from_the_name() -> None:
    assert service_seed(service("web", seed=0)) == 0
    assert service_seed(service("web", seed=0x1234)) == 0x1234
    # first 4 bytes of sha256(b"passlb/seed/web"), pinned: frozen forever
    assert service_seed(service("web")) == 0x75798E5C
    assert service_seed(service("api")) != service_seed(service("web"))
