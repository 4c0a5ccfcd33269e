"""One measurement of a kernel driver's `sync`, in a process of its own (bench_scale.py runs it).

    python bench/scale_driver.py NETNS MODE SERVICES BACKENDS RING_SIZE

prints one JSON object: seconds of the first sync, of syncs with no change,
of one health verdict (one backend of the first service down, then up), of
one backend down in every service, the operations each wrote, the peak RSS
of this process (the driver runs in it, as in the daemon) and how long the
desired states took to compute (the rings; the daemon does that off the
event loop). Backends get their own addresses per service (198.19.0.0/16),
which no packet is sent to. Runs against whichever passlb is on sys.path,
so the same file measures the code before and after a change.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from ipaddress import IPv4Address
from typing import Any

from passlb.control.desired import compute_desired
from passlb.model import (
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

try:
    from passlb.state import HealthStatus
except ImportError:  # before state.py existed
    from passlb.control.desired import HealthStatus  # type: ignore[attr-defined]

VIP = "198.18.0.10"
FIRST_PORT = 10000
BACKEND_BASE = int(IPv4Address("198.19.0.0"))
TABLE = "passlb_scale"
NO_CHANGE_RUNS = 7


def config(mode: Mode, services: int, backends: int, ring_size: int) -> Config:
    return Config(
        services=tuple(
            Service(
                name=f"svc{i}",
                vip=IPv4Address(VIP),
                protocol=Protocol.TCP,
                ports=PortSet(ranges=(PortRange(FIRST_PORT + i, FIRST_PORT + i),)),
                mode=mode,
                backends=tuple(
                    Backend(IPv4Address(BACKEND_BASE + i * backends + n + 1), port=8080)
                    for n in range(backends)
                ),
                health=HealthSpec(type=HealthType.NONE),
                ring_size=ring_size,
            )
            for i in range(services)
        )
    )


def health(cfg: Config, down: set[str]) -> dict[tuple[str, str], HealthStatus]:
    """Every backend up but the last backend of the services named in `down`."""
    return {
        (s.name, b.key): HealthStatus(healthy=not (s.name in down and n == len(s.backends) - 1))
        for s in cfg.services
        for n, b in enumerate(s.backends)
    }


def measure(netns: str, mode_name: str, services: int, backends: int, ring: int) -> dict[str, Any]:
    from passlb.dataplane.nft.runner import NftRunner

    mode = Mode(mode_name)
    cfg = config(mode, services, backends, ring)
    started = time.monotonic()
    names = {s.name for s in cfg.services}
    all_up = compute_desired(cfg, health(cfg, set()), {}, now=0.0)
    first_down = compute_desired(cfg, health(cfg, {"svc0"}), {}, now=0.0)
    every_down = compute_desired(cfg, health(cfg, names), {}, now=0.0)
    desired_seconds = time.monotonic() - started
    runner = NftRunner(netns)
    driver: Any
    if mode is Mode.DSR:
        from passlb.dataplane.nft.dsr import DsrDriver

        driver = DsrDriver(["lo"], runner, table=TABLE)
    else:
        from passlb.dataplane.nft.nat import NatDriver

        driver = NatDriver(runner, table=TABLE)
    try:
        first = driver.sync(all_up)
        no_change = [driver.sync(all_up).duration for _ in range(NO_CHANGE_RUNS)]
        verdicts = [driver.sync(s) for s in (first_down, all_up, first_down, all_up)]
        every = driver.sync(every_down)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        driver.close(cleanup=True)
    return {
        "mode": mode_name,
        "services": services,
        "backends": backends,
        "ring": ring,
        "desired_seconds": desired_seconds,
        "first": first.duration,
        "first_operations": first.operations,
        "no_change": statistics.median(no_change),
        "verdict": statistics.median(v.duration for v in verdicts),
        "verdict_operations": verdicts[0].operations,
        "every_down": every.duration,
        "every_down_operations": every.operations,
        "peak_rss_mib": rss,
    }


def main() -> None:
    netns, mode, services, backends, ring = sys.argv[1:6]
    print(json.dumps(measure(netns, mode, int(services), int(backends), int(ring))))


if __name__ == "__main__":
    main()
