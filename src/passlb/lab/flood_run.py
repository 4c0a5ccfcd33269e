"""A SYN flood against a lab's VIP with legitimate clients meanwhile (tests and bench).

Client 1 floods (`synflood.syn_flood`, spoofed sources in 198.19.0.0/16) while
client 2 opens a new connection every 20 ms for 12 s and, when asked, client 1
keeps one connection echoing. `occupancy` is read right after the flood, while
the flood's last entries are still there.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from passlb.lab.client import tcp_flow_stream, tcp_stream
from passlb.lab.lab import Lab
from passlb.lab.synflood import FloodResult, syn_flood

LEGIT_SECONDS = 12.0  # longer than the flood at its full rate (10 s)


@dataclass(frozen=True)
class FloodRun:
    flood: FloodResult
    occupied: int  # what `occupancy` said right after the flood
    new: list[dict[str, Any]]  # client 2's connections, one reply (or error) each
    stream: dict[str, Any] | None  # client 1's echoing connection, when asked for

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.new if "error" in r]


def flood_with_clients(
    lab: Lab,
    port: int,
    occupancy: Callable[[], int],
    *,
    stream_port: int | None = None,
    packets: int = 200_000,
    rate: int = 20_000,
) -> FloodRun:
    c1, c2 = lab.clients[:2]
    results: dict[str, Any] = {}
    legit = [
        threading.Thread(
            target=lambda: results.update(
                new=lab.call(c2.ns, tcp_flow_stream, lab.vip4, port, LEGIT_SECONDS, 0.02, 3.0)
            )
        )
    ]
    if stream_port is not None:
        legit.append(
            threading.Thread(
                target=lambda: results.update(
                    stream=lab.call(
                        c1.ns, tcp_stream, lab.vip4, stream_port, LEGIT_SECONDS, 16384, 5.0
                    )
                )
            )
        )
    for thread in legit:
        thread.start()
    try:
        flood = functools.partial(syn_flood, rate=rate, seconds=30.0, packets=packets)
        sent = lab.call(c1.ns, flood, lab.vip4, port)
        occupied = occupancy()
    finally:
        for thread in legit:
            thread.join()
    return FloodRun(sent, occupied, results["new"], results.get("stream"))
