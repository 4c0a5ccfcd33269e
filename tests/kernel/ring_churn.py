"""Random ring changes for the ring write-path tests, and a process that keeps applying them.

`python -m tests.kernel.ring_churn NETNS TABLE MODE SEED` syncs state 0, 1,
2, ... of `states(SEED, MODE)` to the table forever, printing each index once
the kernel took it (the test SIGKILLs it somewhere in the middle of one).
"""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from ipaddress import ip_address

from passlb.dataplane.nft.driver import NftDriver
from passlb.dataplane.nft.dsr import DsrDriver
from passlb.dataplane.nft.ids import parse_owner
from passlb.dataplane.nft.nat import NatDriver
from passlb.dataplane.nft.ruleset import Ruleset
from passlb.dataplane.nft.runner import NftRunner
from passlb.dataplane.nft.testing import desired, ports, service
from passlb.model import Backend, Mode, Protocol
from passlb.state import DesiredState

VIP = "198.18.0.10"
POOL = [f"198.18.2.{i}" for i in range(10, 30)]  # addresses only: no packet is sent
RING_SIZES = (1009, 2003, 4099)  # together above RING_TEXT_LIMIT: a new table fills dormant


def state(rng: random.Random, mode: str, services: int = 3) -> DesiredState:
    """Services with random pools (members, weights) on rings of random sizes."""
    chosen = []
    for n in range(services):
        members = rng.sample(POOL, rng.randint(1, 8))
        pool = [Backend(ip_address(a), weight=rng.randint(1, 4)) for a in members]
        svc = service(
            f"s{n}",
            VIP,
            pool,
            protocol=Protocol.TCP,
            port_set=ports(1000 + n),
            ring_size=RING_SIZES[n % len(RING_SIZES)],
        )
        chosen.append(replace(svc, mode=Mode.NAT) if mode == "nat" else svc)
    return desired(*chosen)


def states(seed: int, mode: str) -> list[DesiredState]:
    rng = random.Random(seed)
    return [state(rng, mode) for _ in range(8)]


def make_driver(mode: str, netns: str, table: str) -> NftDriver:
    runner = NftRunner(netns)
    if mode == "dsr":
        return DsrDriver(["eth0"], runner, table=table)
    return NatDriver(runner, table=table)


def kernel_rings(rs: Ruleset, owner_maps: tuple[str, ...]) -> dict[str, list[str]]:
    """Each ring map of a table read back from the kernel, as slot -> backend key
    (ids resolved through the element comments of the id maps)."""
    owners = {}
    for name in owner_maps:
        for elem in rs.elements.get(name, {}).values():
            owner = parse_owner(elem.comment)
            assert owner is not None
            owners[int(elem.key[0])] = owner
    rings = {}
    for name, values in rs.rings.items():
        rings[name] = [owners[v][1] if v in owners else f"missing:{v}" for v in values]
    return rings


def desired_rings(state: DesiredState) -> dict[str, list[str]]:
    return {
        f"ring_{sd.service.name}": [sd.backends[i].key for i in sd.ring.slots]
        for sd in state.services
        if sd.ring is not None
    }


def main() -> None:
    netns, table, mode, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    driver = make_driver(mode, netns, table)
    wanted = states(seed, mode)
    index = 0
    while True:
        driver.sync(wanted[index % len(wanted)])
        print(index % len(wanted), flush=True)
        index += 1


if __name__ == "__main__":
    main()
