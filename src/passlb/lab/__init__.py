"""Network-namespace labs: throwaway topologies of clients, a router, the load
balancer and backends, for kernel tests, `passlb demo` and benchmarks.

See `passlb.lab.lab` for the life cycle, `passlb.lab.topology` for the
addresses, `passlb.lab.servers` and `passlb.lab.client` for the echo service.
"""

from passlb.lab.lab import Lab, LabCommandError, remove_stale_labs
from passlb.lab.netns import LabCallError
from passlb.lab.topology import LabError, LabSpec, Node, RouterNode

__all__ = [
    "Lab",
    "LabCallError",
    "LabCommandError",
    "LabError",
    "LabSpec",
    "Node",
    "RouterNode",
    "remove_stale_labs",
]
