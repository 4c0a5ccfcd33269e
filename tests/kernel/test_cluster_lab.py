"""Issue 12: three passlb nodes (dsr) behind a router running BIRD 2 with ECMP
and L4 hashing, each node announcing the VIPs through its own supervised BIRD.

One lab for the module (building it and bringing up BGP costs seconds); every
test leaves it as it found it: three nodes announcing, every backend healthy.
Loads are bounded: 200 long-lived TCP connections and one UDP flow.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from passlb.config import parse_config
from passlb.control.desired import compute_desired
from passlb.control.explain import explain_flow
from passlb.control.reconciler import assume_all_healthy
from passlb.lab import Lab, LabSpec
from passlb.lab.client import tcp_requests
from passlb.lab.cluster import Cluster, next_hops, node_config, start_router

pytestmark = pytest.mark.kernel

CONNECTIONS = 200
VIP_DROP4 = "198.18.0.11"
HEALTH_PORT = 8081  # the drop services' check: its own server process, killed on purpose


def services(lab: Lab) -> str:
    """web (tcp+udp, fail-open) on the IPv4 VIP; drop4 and drop6 with all_unhealthy
    = "drop", checked on HEALTH_PORT."""
    text = ""
    for name, vip, family, protocol, extra in (
        ("web", lab.vip4, "ipv4", "tcp+udp", ""),
        ("drop4", VIP_DROP4, "ipv4", "tcp", 'all_unhealthy = "drop"\n'),
        ("drop6", lab.vip6, "ipv6", "tcp", 'all_unhealthy = "drop"\n'),
    ):
        port = f"port = {HEALTH_PORT}\n" if name != "web" else ""
        text += (
            f'[[services]]\nname = "{name}"\nvip = "{vip}"\nprotocol = "{protocol}"\n'
            f'ports = [80]\nmode = "dsr"\nring_size = 1009\n{extra}\n'
            f'[services.health]\ntype = "tcp"\ninterval = 1\ntimeout = 0.8\nrise = 2\n'
            f"fall = 3\n{port}"
        )
        for b in lab.backends:
            text += f'\n[[services.backends]]\naddress = "{getattr(b, family)}"\n'
        text += "\n"
    return text


class Fleet:
    def __init__(self, lab: Lab, cluster: Cluster) -> None:
        self.lab, self.cluster = lab, cluster
        self.health_servers: dict[str, subprocess.Popen[str]] = {}

    def start_health_servers(self) -> None:
        for b in self.lab.backends:
            self.health_servers[b.name] = self.lab.start_servers(b, tcp=[HEALTH_PORT])

    def stop_health_servers(self) -> None:
        for proc in self.health_servers.values():
            proc.send_signal(signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    lab = Lab(LabSpec(lbs=3, bgp=True, backends=3))
    lab.build()
    try:
        cluster = Cluster(lab, services(lab))
        fleet = Fleet(lab, cluster)
        for b in lab.backends:
            lab.start_servers(b, tcp=[80], udp=[80])
            for vip in (lab.vip4, VIP_DROP4, lab.vip6):
                lab.run(b.ns, [sys.executable, "-m", "passlb.cli", "backend-setup", "--vip", vip])
        fleet.start_health_servers()
        start_router(lab)
        for node in lab.lbs:
            cluster.start_node(node)
        for vip in (lab.vip4, VIP_DROP4, lab.vip6):
            cluster.wait_for_next_hops(vip, 3)
        yield fleet
    finally:
        lab.teardown()


def vip_state(doc: dict[str, Any], vip: str) -> tuple[bool, str]:
    (entry,) = [v for v in doc["bgp"]["vips"] if v["vip"] == vip]
    return entry["announced"], entry["reason"]


def both_established(doc: dict[str, Any]) -> bool:
    return [p["state"] for p in doc["bgp"]["peers"]] == ["Established", "Established"]


def new_flows(doc: dict[str, Any]) -> int:
    return sum(b["new_flows"] for s in doc["services"] for b in s["backends"])


def test_every_node_announces_and_flows_land_where_explain_says(fleet: Fleet) -> None:
    lab, cluster = fleet.lab, fleet.cluster
    assert next_hops(lab, lab.vip4) == sorted(n.ipv4 for n in lab.lbs)
    assert next_hops(lab, lab.vip6) == sorted(n.ipv6 for n in lab.lbs)
    before = {n.name: new_flows(cluster.status(n)) for n in lab.lbs}
    load = cluster.start_load(lab.vip4, 80, 90, udp=False)
    tcp, _ = load.finish()
    assert tcp["broken"] == []
    config = parse_config(cluster.config_file(lab.lbs[0]).read_text())
    state = compute_desired(config, assume_all_healthy(config), {}, 0.0)
    names = {b.ipv4: b.name for b in lab.backends}
    for sport, backend in tcp["flows"]:
        explained = explain_flow(state, lab.clients[0].ipv4, sport, lab.vip4, 80, "tcp")
        assert explained.backend is not None
        assert names[str(explained.backend.address)] == backend, sport
    docs = {n.name: cluster.status(n) for n in lab.lbs}
    # Every node took some of the 90 new flows: the router spread them.
    assert all(new_flows(docs[name]) > before[name] for name in docs), before
    fingerprints = {
        name: [s["ring_fingerprint"] for s in doc["services"]] for name, doc in docs.items()
    }
    assert len({tuple(f) for f in fingerprints.values()}) == 1, fingerprints
    for node in lab.lbs:
        doc = cluster.wait_for_status(node, both_established)
        assert all(v["announced"] for v in doc["bgp"]["vips"])


def test_losing_a_node_and_adding_it_back_break_no_connection(fleet: Fleet) -> None:
    lab, cluster = fleet.lab, fleet.cluster
    victim = lab.lbs[2]
    load = cluster.start_load(lab.vip4, 80, CONNECTIONS)
    cluster.kill_node(victim)
    cluster.wait_for_next_hops(lab.vip4, 2)
    cluster.revive_node(victim)
    cluster.wait_for_next_hops(lab.vip4, 3)
    cluster.wait_for_next_hops(lab.vip6, 3)
    tcp, udp = load.finish()
    assert udp is not None
    print(
        f"node loss + return: {tcp['opened']} connections, {len(tcp['broken'])} broken,"
        f" longest wait for an echo {tcp['max_wait']:.2f} s; udp {udp['sent']} sent,"
        f" {len(udp['lost'])} lost"
    )
    assert tcp["opened"] == CONNECTIONS
    assert tcp["broken"] == []
    # The UDP flow kept its backend through both moves (datagrams sent into
    # the dead node before the router noticed are lost, not misrouted).
    assert len(udp["by_backend"]) == 1, udp["by_backend"]


def test_a_drained_node_breaks_nothing_and_gets_no_new_flows(fleet: Fleet) -> None:
    lab, cluster = fleet.lab, fleet.cluster
    node = lab.lbs[1]
    load = cluster.start_load(lab.vip4, 80, CONNECTIONS)
    drained = cluster.passlb(node, "node", "drain", "--timeout", "60")
    assert "the routers moved the traffic away" in drained.stdout, drained.stdout
    assert next_hops(lab, lab.vip4) == sorted(n.ipv4 for n in lab.lbs if n is not node)
    doc = cluster.status(node)
    assert vip_state(doc, lab.vip4) == (False, "node drained")
    assert doc["bgp"]["node"]["traffic_moved"] is True
    flows_at_withdrawal = new_flows(doc)
    replies = lab.call(lab.clients[0].ns, tcp_requests, lab.vip4, 80, 60)
    assert all("error" not in r for r in replies), replies
    assert new_flows(cluster.status(node)) == flows_at_withdrawal
    undrained = cluster.passlb(node, "node", "undrain")
    assert "undrained" in undrained.stdout
    cluster.wait_for_next_hops(lab.vip4, 3)
    tcp, udp = load.finish()
    assert udp is not None
    assert tcp["opened"] == CONNECTIONS
    assert tcp["broken"] == []
    assert len(udp["by_backend"]) == 1 and udp["lost"] == [], udp


def test_all_backends_down_with_drop_withdraws_the_vip_everywhere_ipv6_too(
    fleet: Fleet,
) -> None:
    lab, cluster = fleet.lab, fleet.cluster
    fleet.stop_health_servers()
    for vip in (VIP_DROP4, lab.vip6):
        cluster.wait_for_next_hops(vip, 0)
    for node in lab.lbs:
        doc = cluster.status(node)
        assert vip_state(doc, VIP_DROP4) == (False, "all backends unhealthy")
        assert vip_state(doc, lab.vip6) == (False, "all backends unhealthy")
        assert vip_state(doc, lab.vip4) == (True, "serving")
    assert len(next_hops(lab, lab.vip4)) == 3
    fleet.start_health_servers()
    for vip in (VIP_DROP4, lab.vip6):
        cluster.wait_for_next_hops(vip, 3)
    replies = lab.call(lab.clients[0].ns, tcp_requests, lab.vip6, 80, 20)
    assert all(r.get("local", [None])[0] == lab.vip6 for r in replies), replies


def test_bad_bgp_input_is_refused_and_changes_nothing(fleet: Fleet, tmp_path: Path) -> None:
    lab, cluster = fleet.lab, fleet.cluster
    node = lab.lbs[0]
    config_file = cluster.config_file(node)
    good = config_file.read_text()
    before = cluster.status(node)
    peers_v6_only = node_config(lab, node, services(lab)).replace(
        f'address = "{lab.router.back_ipv4}"', 'address = "2001:2:0:2::fe"'
    )
    bad_inputs = {
        "unknown key": good.replace("[bgp]\n", "[bgp]\nhold = 3\n"),
        "bad ASN": good.replace("asn = 64512", "asn = 4294967295"),
        "peer in the wrong family": peers_v6_only,
    }
    expected = {
        "unknown key": "bgp.hold: unknown key",
        "bad ASN": "bgp.asn: must be an AS number between 1 and 4294967294",
        "peer in the wrong family": "services[web].vip: IPv4 VIP to announce but every",
    }
    try:
        for what, text in bad_inputs.items():
            config_file.write_text(text)
            refused = cluster.passlb(node, "reload", check=False)
            assert refused.returncode == 4, (what, refused.stdout, refused.stderr)
            assert expected[what] in refused.stderr, (what, refused.stderr)
    finally:
        config_file.write_text(good)
    after = cluster.status(node)
    assert after["bgp"]["vips"] == before["bgp"]["vips"]
    assert both_established(after)
    assert after["last_reload"]["ok"] is False
    assert len(next_hops(lab, lab.vip4)) == 3


def test_sigterm_withdraws_first_and_leaves_the_data_plane(fleet: Fleet) -> None:
    lab, cluster = fleet.lab, fleet.cluster
    node = lab.lbs[0]
    load = cluster.start_load(lab.vip4, 80, CONNECTIONS)
    daemon = cluster.daemons.pop(node.name)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    cluster.wait_for_next_hops(lab.vip4, 2)
    # Withdrawn first (BIRD reported no route left with any peer), then stopped.
    log = cluster.log_file(node).read_text()
    withdrawn = log.rfind(
        "every VIP withdrawn before BIRD stops (routes exported:"
        f" {lab.router.back_ipv4}=0, {lab.router.back_ipv6}=0)"
    )
    assert -1 < withdrawn < log.rfind("bgp: BIRD stopped"), log[-3000:]
    tables = lab.run(node.ns, ["nft", "list", "tables"]).stdout
    assert "netdev passlb" in tables  # the kernel data plane stays
    cluster.start_node(node)
    cluster.wait_for_next_hops(lab.vip4, 3)
    tcp, udp = load.finish()
    assert udp is not None
    assert tcp["opened"] == CONNECTIONS
    assert tcp["broken"] == []
    assert len(udp["by_backend"]) == 1, udp["by_backend"]
