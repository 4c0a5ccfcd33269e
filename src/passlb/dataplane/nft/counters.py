"""Per-backend counters of a kernel driver, from its table's named counters.

Both kernel drivers name their counters alike: `pkts_<id>` (client → backend
packets and bytes), `new_<id>` (new flows), the service's drop counter (no
backend) and one counter per drop reason of its guard (guard.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from passlb.dataplane.base import BackendCounters, ServiceCounters
from passlb.dataplane.nft.guard import NO_BACKEND, reason_counters
from passlb.dataplane.nft.names import ServiceNames
from passlb.dataplane.nft.objects import CounterValue
from passlb.state import ServiceDesired


def service_counters(
    services: Iterable[ServiceDesired],
    ids: Mapping[tuple[str, str], int],
    values: Mapping[str, CounterValue],
    active: Mapping[int, int],
) -> dict[str, ServiceCounters]:
    """Counters by service from the table's counter values, backend ids
    ((service, backend key) -> id) and active flows by id."""
    result: dict[str, ServiceCounters] = {}
    for sd in services:
        backends: dict[str, BackendCounters] = {}
        for b in sd.backends:
            bid = ids.get((sd.service.name, b.key))
            if bid is None:
                continue
            pkts = values.get(f"pkts_{bid}", CounterValue())
            new = values.get(f"new_{bid}", CounterValue())
            backends[b.key] = BackendCounters(
                packets=pkts.packets,
                bytes=pkts.bytes,
                new_flows=new.packets,
                active_flows=active.get(bid, 0),
            )
        drop = values.get(ServiceNames.of(sd.service.name).drop_counter, CounterValue())
        drops = {NO_BACKEND: drop.packets}
        for reason, counter in reason_counters(sd.service).items():
            drops[reason] = values.get(counter, CounterValue()).packets
        result[sd.service.name] = ServiceCounters(
            backends=backends, dropped=drop.packets, drops=drops
        )
    return result
