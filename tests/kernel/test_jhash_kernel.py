"""The Python jhash twin predicts the kernel's nft ``jhash`` for every affinity.

In a throwaway network namespace, an output chain sets ``meta mark`` to the nft
jhash of each UDP datagram (fields from ``flowkey.hash_fields``, the definition
the renderer uses) and records (5-tuple, mark) into a dynamic set. We then send
datagrams over loopback from many source addresses and ports, read the set back
and check every mark against ``flowkey.ring_slot``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from passlb.hashing.flowkey import L4PROTO, hash_fields, hash_key_bytes, ring_slot
from passlb.hashing.jhash import nft_jhash
from passlb.model import Affinity, IPAddress

pytestmark = pytest.mark.kernel

RING_SIZE = 65537
UDP = L4PROTO["udp"]


@dataclass(frozen=True)
class Probe:
    """One nft rule under test: datagrams to ``dport`` get marked by this hash."""

    dport: int
    affinity: Affinity
    seed: int
    modulus: int = RING_SIZE
    offset: int = 0


PROBES = (
    Probe(40001, Affinity.FIVE_TUPLE, 0x9E3779B9),
    Probe(40002, Affinity.CLIENT_IP_PROTO, 0x00000001),
    Probe(40003, Affinity.CLIENT_IP, 0xFFFFFFFF),
    Probe(40004, Affinity.FIVE_TUPLE, 0, modulus=1009, offset=7),
)

# Sources and destinations, all loopback; 127/8 is loopback as a whole.
V4_SOURCES = tuple(IPv4Address(f"127.0.0.{i}") for i in range(1, 9))
V4_DESTINATIONS = (IPv4Address("127.0.0.1"), IPv4Address("127.0.0.2"))
V6_SOURCES = (IPv6Address("::1"),)
V6_DESTINATIONS = (IPv6Address("::1"),)
SOURCE_PORTS = range(20000, 20000 + 13)


def nft(netns: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the kernel tests need root (run them with -m 'not kernel' otherwise)")
    name = f"passlb-jh-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=10
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def ruleset() -> str:
    rules = []
    for family, ip in ((4, "ip"), (6, "ip6")):
        for probe in PROBES:
            fields = " . ".join(hash_fields(probe.affinity, family))
            offset = f" offset {probe.offset}" if probe.offset else ""
            rules.append(
                f"meta nfproto ipv{family} udp dport {probe.dport} "
                f"meta mark set jhash {fields} mod {probe.modulus} seed {probe.seed:#x}{offset} "
                f"update @seen{family} {{ {ip} saddr . udp sport . {ip} daddr . udp dport "
                ". meta mark }"
            )
    body = "\n    ".join(rules)
    return f"""
table inet passlb_jh {{
  set seen4 {{ typeof ip saddr . udp sport . ip daddr . udp dport . meta mark; flags dynamic; }}
  set seen6 {{ typeof ip6 saddr . udp sport . ip6 daddr . udp dport . meta mark; flags dynamic; }}
  chain out {{
    type filter hook output priority 0; policy accept;
    {body}
  }}
}}
"""


SENDER = """
import socket, sys
for line in sys.stdin:
    family, src, sport, dst, dport = line.split()
    af = socket.AF_INET if family == "4" else socket.AF_INET6
    with socket.socket(af, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((src, int(sport)))
        s.sendto(b"passlb", (dst, int(dport)))
"""


def send_datagrams(netns: str) -> int:
    lines = [
        f"{family} {src} {sport} {dst} {probe.dport}"
        for family, sources, destinations in (
            (4, V4_SOURCES, V4_DESTINATIONS),
            (6, V6_SOURCES, V6_DESTINATIONS),
        )
        for probe in PROBES
        for src in sources
        for dst in destinations
        for sport in (SOURCE_PORTS if family == 4 else range(20000, 20000 + 60))
    ]
    subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SENDER],
        input="\n".join(lines),
        text=True,
        check=True,
        timeout=30,
    )
    return len(lines)


def read_set(netns: str, name: str) -> list[tuple[IPAddress, int, IPAddress, int, int]]:
    listing = json.loads(nft(netns, "-j", "list", "set", "inet", "passlb_jh", name))
    elements = next(item["set"] for item in listing["nftables"] if "set" in item).get("elem", [])
    seen = []
    for element in elements:
        value = (
            element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
        )
        src, sport, dst, dport, mark = value["concat"]
        seen.append((ip_address(src), int(sport), ip_address(dst), int(dport), int(mark)))
    return seen


def test_twin_predicts_every_kernel_jhash(netns: str) -> None:
    nft(netns, "-f", "-", stdin=ruleset())
    sent = send_datagrams(netns)
    seen = read_set(netns, "seen4") + read_set(netns, "seen6")
    assert len(seen) == sent  # every datagram was hashed and recorded, none lost
    probe_for_port = {p.dport: p for p in PROBES}
    mismatches = []
    for src, sport, dst, dport, mark in seen:
        probe = probe_for_port[dport]
        if probe.offset:
            key = hash_key_bytes(probe.affinity, src, sport, dst, dport, UDP)
            predicted = nft_jhash(key, probe.modulus, probe.seed, probe.offset)
        else:
            predicted = ring_slot(
                probe.affinity, probe.seed, probe.modulus, src, sport, dst, dport, UDP
            )
        if predicted != mark:
            mismatches.append((src, sport, dst, dport, mark, predicted))
    assert not mismatches, mismatches[:5]
    # The probes really spread: many distinct slots, so a constant twin could not pass.
    five_tuple_marks = {mark for *_, dport, mark in seen if dport == 40001}
    assert len(five_tuple_marks) > 100
