"""The lab's SYN generator refuses anything outside 198.18.0.0/15 and builds valid SYNs."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from passlb.lab.client import internet_checksum
from passlb.lab.synflood import check_flood, syn_packet


@pytest.mark.parametrize(
    ("target", "sources", "rate", "seconds", "packets", "why"),
    [
        ("203.0.113.1", "198.19.0.0/16", 1000, 1.0, 10, "target 203.0.113.1 is not in"),
        ("198.18.0.10", "0.0.0.0/0", 1000, 1.0, 10, "sources 0.0.0.0/0 are not inside"),
        ("198.18.0.10", "198.20.0.0/16", 1000, 1.0, 10, "sources 198.20.0.0/16 are not inside"),
        ("198.18.0.10", "2001:2::/64", 1000, 1.0, 10, "sources 2001:2::/64 are not inside"),
        ("198.18.0.10", "198.19.0.0/16", 0, 1.0, 10, "rate 0 is not in"),
        ("198.18.0.10", "198.19.0.0/16", 1000, 0.0, 10, "seconds 0.0 is not in"),
        ("198.18.0.10", "198.19.0.0/16", 1000, 61.0, 10, "seconds 61.0 is not in"),
        ("198.18.0.10", "198.19.0.0/16", 1000, 1.0, 0, "packets 0 is not in"),
    ],
)
def test_floods_outside_the_lab_range_or_unbounded_are_refused(
    target: str, sources: str, rate: int, seconds: float, packets: int, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        check_flood(target, sources, rate, seconds, packets)


def test_the_whole_benchmarking_range_is_allowed() -> None:
    check_flood("198.18.0.10", "198.18.0.0/15", 20_000, 10.0, 200_000)


def test_a_syn_has_valid_checksums_and_only_the_syn_flag() -> None:
    src, dst = IPv4Address("198.19.3.4"), IPv4Address("198.18.0.10")
    frame = syn_packet(src, dst, 40000, 80, 7)
    ip, tcp = frame[:20], frame[20:]
    assert internet_checksum(ip) == 0  # a header with its checksum sums to 0
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(tcp))
    assert internet_checksum(pseudo + tcp) == 0
    assert (ip[12:16], ip[16:20]) == (src.packed, dst.packed)
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    assert (sport, dport, seq, tcp[13]) == (40000, 80, 7, 0x02)
