"""The control plane's cost: how long the dsr driver's `sync` takes.

For N services (one VIP, ports 10000+i, three backends each), a real kernel
in the lab's LB namespace:

- first sync: the whole table written (a full resync: every ring slot of
  every service);
- ring change in every service: one backend drained in each, which moves
  about a third of every ring; the driver writes only the slots that changed;
- ring change in one service: that backend enabled again in the first
  service only, the common case of one health flip among many services.

`sync` is timed as the driver reports it (render + diff + one nft
transaction). The desired state is computed before the clock starts.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from ipaddress import IPv4Address

from passlb.control.desired import compute_desired, update_drain_starts
from passlb.control.reconciler import assume_all_healthy
from passlb.dataplane.nft.dsr import DsrDriver
from passlb.dataplane.nft.runner import NftRunner
from passlb.lab import Lab
from passlb.model import (
    AdminState,
    Backend,
    Config,
    HealthSpec,
    HealthType,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import DesiredState

FIRST_PORT = 10000
BENCH_TABLE = "passlb_bench"


@dataclass(frozen=True)
class SyncCost:
    services: int
    ring_size: int
    first_sync: float  # seconds
    first_operations: int
    change_sync: float
    change_operations: int
    single_sync: float
    single_operations: int
    peak_rss_mib: float  # of this process so far: the driver runs in it


def bench_config(
    services: int, ring_size: int, vip: str, backends: list[str], drained: range
) -> Config:
    """N services; the last backend of the services numbered in `drained` is drained."""
    last = len(backends) - 1
    return Config(
        services=tuple(
            Service(
                name=f"svc{i}",
                vip=IPv4Address(vip),
                protocol=Protocol.TCP,
                ports=PortSet(ranges=(PortRange(FIRST_PORT + i, FIRST_PORT + i),)),
                mode=Mode.DSR,
                backends=tuple(
                    Backend(
                        IPv4Address(address),
                        admin=AdminState.DRAIN
                        if i in drained and n == last
                        else AdminState.ENABLED,
                    )
                    for n, address in enumerate(backends)
                ),
                health=HealthSpec(type=HealthType.NONE),
                ring_size=ring_size,
            )
            for i in range(services)
        )
    )


def _desired(config: Config) -> DesiredState:
    drains = update_drain_starts(config, {}, now=0.0)
    return compute_desired(config, assume_all_healthy(config), drains, now=0.0)


def sync_cost(lab: Lab, services: int, ring_size: int) -> SyncCost:
    backends = [b.ipv4 for b in lab.backends]
    states = [
        _desired(bench_config(services, ring_size, lab.vip4, backends, drained))
        for drained in (range(0), range(services), range(1, services))
    ]
    driver = DsrDriver([lab.lb.interface], NftRunner(lab.lb.ns), table=BENCH_TABLE)
    try:
        first, change, single = [driver.sync(state) for state in states]
    finally:
        driver.close(cleanup=True)
    return SyncCost(
        services=services,
        ring_size=ring_size,
        first_sync=first.duration,
        first_operations=first.operations,
        change_sync=change.duration,
        change_operations=change.operations,
        single_sync=single.duration,
        single_operations=single.operations,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
