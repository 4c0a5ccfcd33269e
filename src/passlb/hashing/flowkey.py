"""What each affinity hashes: the one definition shared by the nft renderer and its twin.

The renderer writes ``jhash <" . ".join(hash_fields(...))> mod <ring size> seed
<service_seed(...)>`` and ``ring_slot`` computes the same value in Python. The
bytes nft hashes are its registers: each concatenated field in network byte
order, zero-padded to a multiple of 4 bytes (NFT_REG32 layout; seen with ``nft
--debug=netlink``: ``ip saddr . th sport . meta l4proto`` hashes 12 bytes).

FROZEN: the fields, their order and the seed derivation decide which backend a
flow lands on; changing them moves every flow of every service.
"""

from __future__ import annotations

import hashlib
import struct

from passlb.hashing.jhash import jhash_words, reciprocal_scale
from passlb.model import Affinity, IPAddress, Service

# IP protocol numbers (IANA), as ``meta l4proto`` yields them.
L4PROTO = {"tcp": 6, "udp": 17}

# The flow fields each affinity hashes, in hash order.
_AFFINITY_FIELDS = {
    Affinity.FIVE_TUPLE: ("saddr", "sport", "daddr", "dport", "l4proto"),
    Affinity.CLIENT_IP_PROTO: ("saddr", "l4proto"),
    Affinity.CLIENT_IP: ("saddr",),
}

# How nft names each field; {ip} is "ip" or "ip6".
_NFT_EXPRESSION = {
    "saddr": "{ip} saddr",
    "sport": "th sport",
    "daddr": "{ip} daddr",
    "dport": "th dport",
    "l4proto": "meta l4proto",
}


def hash_fields(affinity: Affinity, family: int) -> tuple[str, ...]:
    """The nft expressions hashed for ``affinity``; ``family`` is the IP version, 4 or 6."""
    ip = _ip_keyword(family)
    return tuple(_NFT_EXPRESSION[f].format(ip=ip) for f in _AFFINITY_FIELDS[affinity])


def hash_key_bytes(
    affinity: Affinity,
    src_ip: IPAddress,
    src_port: int,
    dst_ip: IPAddress,
    dst_port: int,
    l4proto: int,
) -> bytes:
    """The exact bytes nft feeds to jhash for this flow (see the module docstring)."""
    if src_ip.version != dst_ip.version:
        raise ValueError(f"flow mixes IPv{src_ip.version} and IPv{dst_ip.version} addresses")
    value = {
        "saddr": src_ip.packed,
        "sport": src_port.to_bytes(2, "big"),
        "daddr": dst_ip.packed,
        "dport": dst_port.to_bytes(2, "big"),
        "l4proto": l4proto.to_bytes(1, "big"),
    }
    return b"".join(_pad32(value[f]) for f in _AFFINITY_FIELDS[affinity])


def ring_slot(
    affinity: Affinity,
    seed: int,
    ring_size: int,
    src_ip: IPAddress,
    src_port: int,
    dst_ip: IPAddress,
    dst_port: int,
    l4proto: int,
) -> int:
    """The ring slot nft picks for a new flow: ``jhash ... mod ring_size seed seed``."""
    words = hash_key_words(affinity, src_ip, src_port, dst_ip, dst_port, l4proto)
    return reciprocal_scale(jhash_words(words, 4 * len(words), seed), ring_size)


def hash_key_words(
    affinity: Affinity,
    src_ip: IPAddress,
    src_port: int,
    dst_ip: IPAddress,
    dst_port: int,
    l4proto: int,
) -> tuple[int, ...]:
    """``hash_key_bytes`` as the little-endian 32-bit words jhash reads, built from the
    values without the bytes: the proxy hashes every new connection (tests pin the two equal)."""
    if src_ip.version != dst_ip.version:
        raise ValueError(f"flow mixes IPv{src_ip.version} and IPv{dst_ip.version} addresses")
    saddr = _ip_words(src_ip)
    if affinity is Affinity.CLIENT_IP:
        return saddr
    if affinity is Affinity.CLIENT_IP_PROTO:
        return (*saddr, l4proto)
    # A port is its two bytes in network order, then two zero bytes: read little endian.
    sport = (src_port >> 8) | (src_port & 0xFF) << 8
    dport = (dst_port >> 8) | (dst_port & 0xFF) << 8
    return (*saddr, sport, *_ip_words(dst_ip), dport, l4proto)


def service_seed(service: Service) -> int:
    """The service's jhash seed: its configured one, else one derived from its name.

    Never random: the kernel picks a random seed when none is given, which would
    remap flows whenever the rule is re-created and make load balancers disagree.
    """
    if service.hash_seed is not None:
        return service.hash_seed
    digest = hashlib.sha256(b"passlb/seed/" + service.name.encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _ip_keyword(family: int) -> str:
    if family == 4:
        return "ip"
    if family == 6:
        return "ip6"
    raise ValueError(f"family must be the IP version 4 or 6, not {family}")


def _ip_words(ip: IPAddress) -> tuple[int, ...]:
    if ip.version == 4:
        return (int.from_bytes(ip.packed, "little"),)
    return struct.unpack("<4I", ip.packed)


def _pad32(value: bytes) -> bytes:
    return value.ljust(-(-len(value) // 4) * 4, b"\0")
