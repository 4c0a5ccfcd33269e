"""A bit-exact twin of the Linux kernel's jhash() and of nftables' ``jhash`` expression.

``jhash`` is Bob Jenkins' lookup3 hash as include/linux/jhash.h writes it, with
JHASH_INITVAL 0xdeadbeef. The kernel reads whole 12-byte blocks with
``__get_unaligned_cpu32`` (CPU byte order) and the tail bytes explicitly as
little endian; on the little-endian machines passlb runs on (x86-64, arm64)
both are little endian, which is what this twin does.

``nft_jhash`` is net/netfilter/nft_hash.c: ``reciprocal_scale(jhash(data, len,
seed), modulus) + offset`` where ``reciprocal_scale(h, n) = (h * n) >> 32`` —
not ``h % n``. tests/kernel/test_jhash_kernel.py checks both against the kernel.
"""

from __future__ import annotations

JHASH_INITVAL = 0xDEADBEEF
_MASK = 0xFFFFFFFF


def _rol32(word: int, shift: int) -> int:
    return ((word << shift) | (word >> (32 - shift))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK
    a ^= _rol32(c, 4)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rol32(a, 6)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rol32(b, 8)
    b = (b + a) & _MASK
    a = (a - c) & _MASK
    a ^= _rol32(c, 16)
    c = (c + b) & _MASK
    b = (b - a) & _MASK
    b ^= _rol32(a, 19)
    a = (a + c) & _MASK
    c = (c - b) & _MASK
    c ^= _rol32(b, 4)
    b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b
    c = (c - _rol32(b, 14)) & _MASK
    a ^= c
    a = (a - _rol32(c, 11)) & _MASK
    b ^= a
    b = (b - _rol32(a, 25)) & _MASK
    c ^= b
    c = (c - _rol32(b, 16)) & _MASK
    a ^= c
    a = (a - _rol32(c, 4)) & _MASK
    b ^= a
    b = (b - _rol32(a, 14)) & _MASK
    c ^= b
    c = (c - _rol32(b, 24)) & _MASK
    return c


def jhash(data: bytes, initval: int = 0) -> int:
    """The kernel's ``jhash(data, len(data), initval)``."""
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + initval) & _MASK
    pos = 0
    while length > 12:
        a = (a + int.from_bytes(data[pos : pos + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[pos + 4 : pos + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[pos + 8 : pos + 12], "little")) & _MASK
        a, b, c = _mix(a, b, c)
        length -= 12
        pos += 12
    if length == 0:  # only reached for empty input: the kernel returns c unmixed
        return c
    # The tail is 1..12 bytes, zero-padded: the kernel's switch adds exactly these.
    tail = data[pos:].ljust(12, b"\0")
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    return _final(a, b, c)


def reciprocal_scale(value: int, modulus: int) -> int:
    """include/linux/math.h: map a u32 onto [0, modulus) by multiplication."""
    return (value * modulus) >> 32


def nft_jhash(data: bytes, modulus: int, seed: int, offset: int = 0) -> int:
    """What ``jhash <data> mod <modulus> seed <seed> offset <offset>`` evaluates to."""
    return (reciprocal_scale(jhash(data, seed), modulus) + offset) & _MASK
