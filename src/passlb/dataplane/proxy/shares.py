"""What each relay worker process gets of the desired state (pure).

Every worker serves every service, so each runs the whole desired state; only
the connection limits are split: a worker cannot see the others' connections,
so it enforces its share. `max_connections`, `max_connections_per_backend` and
`max_udp_sessions` are divided evenly, the remainder going to the first
workers. A limit smaller than the number of workers still gives every worker
1 (a worker with 0 would refuse every flow the kernel hands it), so the total
can then reach the number of workers. The shares hold exactly only when the
kernel's SO_REUSEPORT hash spreads the flows evenly; one worker may refuse
while another has room.
"""

from __future__ import annotations

import dataclasses

from passlb.model import ProxyOptions
from passlb.state import DesiredState, ServiceDesired


def worker_share(limit: int, workers: int, index: int) -> int:
    """Worker `index`'s part of `limit` (0 <= index < workers), at least 1."""
    base, remainder = divmod(limit, workers)
    return max(1, base + (1 if index < remainder else 0))


def desired_for_worker(desired: DesiredState, workers: int, index: int) -> DesiredState:
    if workers == 1:
        return desired
    return DesiredState(
        services=tuple(_service_share(sd, workers, index) for sd in desired.services)
    )


def _service_share(sd: ServiceDesired, workers: int, index: int) -> ServiceDesired:
    options = sd.service.proxy or ProxyOptions()

    def share(limit: int | None) -> int | None:
        return None if limit is None else worker_share(limit, workers, index)

    shared = dataclasses.replace(
        options,
        max_connections=share(options.max_connections),
        max_connections_per_backend=share(options.max_connections_per_backend),
        max_udp_sessions=worker_share(options.max_udp_sessions, workers, index),
    )
    return dataclasses.replace(sd, service=dataclasses.replace(sd.service, proxy=shared))
