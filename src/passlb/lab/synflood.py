"""A SYN flood for the lab: TCP SYNs from spoofed sources, bounded in rate, count and time.

    sent = lab.call(lab.clients[0].ns, syn_flood, lab.vip4, 80, packets=200_000)

Raw IPv4 packets (IP_HDRINCL, needs root) built ahead of time, one per packet
to send: the sources take turns, each turn with new source ports, so every SYN
is a flow of its own. They go out until `packets` are sent or `seconds` have
passed, at most `rate` a second. Every source and the target must lie in
198.18.0.0/15, the benchmarking range (RFC 2544) the lab uses: anything else
is refused before a socket is opened, so the flood cannot leave a lab built
from those addresses. Sources are never drawn from the whole address space.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from passlb.lab.client import internet_checksum

LAB_NET = IPv4Network("198.18.0.0/15")
# The default spoofed sources: 65,536 addresses no lab node uses (the lab's
# segments are in 198.18.0.0/22).
DEFAULT_SOURCES = "198.19.0.0/16"
MAX_RATE = 200_000  # packets per second
MAX_SECONDS = 60.0
MAX_PACKETS = 2_000_000  # built ahead: ~44 bytes and ~5 us of checksums each
MAX_SOURCES = 1 << 17  # the whole of 198.18.0.0/15
_BATCH_SECONDS = 0.002  # pacing granularity: one burst of rate * 2 ms, then wait


@dataclass(frozen=True)
class FloodResult:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def check_flood(target: str, sources: str, rate: int, seconds: float, packets: int) -> None:
    """Refuse any flood that could leave the lab's range or run unbounded."""
    dst = ip_address(target)
    if not isinstance(dst, IPv4Address) or dst not in LAB_NET:
        raise ValueError(f"target {target} is not in {LAB_NET}: the flood stays in the lab")
    net = ip_network(sources)
    if not isinstance(net, IPv4Network) or not net.subnet_of(LAB_NET):
        raise ValueError(f"sources {sources} are not inside {LAB_NET}: the flood stays in the lab")
    if net.num_addresses > MAX_SOURCES:
        raise ValueError(f"sources {sources}: at most {MAX_SOURCES} addresses")
    if not 1 <= rate <= MAX_RATE:
        raise ValueError(f"rate {rate} is not in 1..{MAX_RATE} packets per second")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds {seconds} is not in (0, {MAX_SECONDS}]")
    if not 1 <= packets <= MAX_PACKETS:
        raise ValueError(f"packets {packets} is not in 1..{MAX_PACKETS}")


def syn_packet(src: IPv4Address, dst: IPv4Address, sport: int, dport: int, seq: int) -> bytes:
    """An IPv4 TCP SYN with an MSS option, checksums filled in."""
    options = struct.pack("!BBH", 2, 4, 1460)  # MSS 1460
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, offset << 4, 0x02, 64240, 0, 0)
    tcp += options
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", internet_checksum(pseudo + tcp)) + tcp[18:]
    total = 20 + len(tcp)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, seq & 0xFFFF, 0, 64, socket.IPPROTO_TCP, 0,
        src.packed, dst.packed,
    )  # fmt: skip
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    return ip + tcp


def syn_flood(
    target: str,
    port: int,
    *,
    sources: str = DEFAULT_SOURCES,
    rate: int = 20_000,
    seconds: float = 10.0,
    packets: int = 200_000,
) -> FloodResult:
    """Send SYNs to target:port from every address of `sources`, round-robin,
    until `packets` are sent or `seconds` pass, at most `rate` per second."""
    check_flood(target, sources, rate, seconds, packets)
    dst = IPv4Address(target)
    net = IPv4Network(sources)
    seed = int.from_bytes(os.urandom(4), "big")
    addresses = list(net)
    frames = [
        syn_packet(
            addresses[i % len(addresses)],
            dst,
            1024 + (seed + i // len(addresses)) % 64000,
            port,
            (seed + i) & 0xFFFFFFFF,
        )
        for i in range(packets)
    ]
    to = (target, 0)  # IP_HDRINCL: the header names the source; this routes the packet
    per_batch = max(1, round(rate * _BATCH_SECONDS))
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        sendto = sock.sendto
        started = time.monotonic()
        deadline = started + seconds
        next_batch = started
        while sent < packets:
            now = time.monotonic()
            if now >= deadline:
                break
            if now < next_batch:
                time.sleep(next_batch - now)  # pacing: the next burst is due then
            burst = min(per_batch, packets - sent)
            for i in range(sent, sent + burst):
                try:
                    sendto(frames[i], to)
                except BlockingIOError:
                    break  # the device queue is full: count only what left
                sent += 1
            next_batch += _BATCH_SECONDS
        elapsed = time.monotonic() - started
    return FloodResult(sent=sent, seconds=elapsed)
