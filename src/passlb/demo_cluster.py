"""`passlb demo --cluster`: three passlb nodes behind a router; one dies mid-transfer.

As root on Linux it builds a cluster lab (a client, a router running BIRD 2
with ECMP, three passlb nodes in dsr mode, three backends), starts passlb on
every node (each starts its own BIRD and announces the VIP), opens long-lived
TCP connections that stream data through the router, then kills one node
abruptly (link down, passlb and BIRD SIGKILLed). The router drops the dead
next hop when the BGP hold time (3 s) runs out; the other nodes pick up its
flows and, building the same rings, send each to the same backend. The last
line counts the established connections that broke.
"""

from __future__ import annotations

import os
import sys
import time

from passlb.errors import PasslbError
from passlb.lab import Lab, LabSpec
from passlb.lab.cluster import HOLD_TIME, Cluster, next_hops, start_router

PORT = 80
MIN_CONNECTIONS, MAX_CONNECTIONS = 1, 2000


def _say(text: str = "") -> None:
    print(text, flush=True)


def cluster_services(lab: Lab) -> str:
    backends = "".join(f'\n[[services.backends]]\naddress = "{b.ipv4}"\n' for b in lab.backends)
    return (
        f'[[services]]\nname = "web"\nvip = "{lab.vip4}"\nprotocol = "tcp"\nports = [{PORT}]\n'
        'mode = "dsr"\n\n[services.health]\ntype = "tcp"\ninterval = "0.5s"\n'
        f'timeout = "0.3s"\n{backends}'
    )


def run_cluster_demo(connections: int) -> int:
    if not MIN_CONNECTIONS <= connections <= MAX_CONNECTIONS:
        raise PasslbError(
            f"--flows: must be between {MIN_CONNECTIONS} and {MAX_CONNECTIONS}"
            f" with --cluster, got {connections}"
        )
    if os.geteuid() != 0 or sys.platform != "linux":
        raise PasslbError("demo --cluster needs root on Linux (network namespaces, nftables)")
    with Lab(LabSpec(lbs=3, bgp=True, backends=3, ipv6=False)) as lab:
        _say(f"lab {lab.prefix}: client -> router (BIRD, ECMP) -> 3 passlb nodes -> 3 backends")
        cluster = Cluster(lab, cluster_services(lab))
        for b in lab.backends:
            lab.start_servers(b, tcp=[PORT])
            lab.run(b.ns, [sys.executable, "-m", "passlb.cli", "backend-setup", "--vip", lab.vip4])
        start_router(lab)
        for node in lab.lbs:
            cluster.start_node(node)
        cluster.wait_for_next_hops(lab.vip4, 3)
        hops = ", ".join(next_hops(lab, lab.vip4))
        _say(f"the router learnt {lab.vip4}/32 from every node over BGP: next hops {hops}")
        rings = {cluster.status(n)["services"][0]["ring_fingerprint"] for n in lab.lbs}
        _say(f"ring fingerprint on every node: {', '.join(sorted(rings))}")
        load = cluster.start_load(lab.vip4, PORT, connections, udp=False)
        _say(f"{connections} TCP connections streaming through the nodes")
        time.sleep(1.0)
        victim = lab.lbs[2]
        killed_at = cluster.kill_node(victim)
        _say(f"killed {victim.name} ({victim.ipv4}): link down, passlb and BIRD SIGKILLed")
        gone = cluster.wait_for_next_hops(lab.vip4, 2)
        _say(
            f"the router dropped {victim.ipv4} after {gone - killed_at:.1f} s"
            f" (BGP hold time {HOLD_TIME} s); the other nodes carry its flows"
        )
        time.sleep(1.0)
        tcp, _ = load.finish()
        counts = {n.name: cluster.status(n)["services"][0] for n in lab.lbs[:2]}
        for name, svc in counts.items():
            flows = sum(b["packets"] for b in svc["backends"])
            _say(f"  {name}: {flows} packets forwarded")
        _say(f"longest wait of a message for its echo: {tcp['max_wait']:.1f} s")
        _say(f"connections opened: {tcp['opened']}")
        for broken in tcp["broken"][:5]:
            _say(f"  broken: port {broken['sport']} to {broken['backend']}: {broken['error']}")
        _say(f"broken connections: {len(tcp['broken'])}")
        return 0 if not tcp["broken"] and tcp["opened"] == connections else 1
