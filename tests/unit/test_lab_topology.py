"""The lab topology plan: names, addresses and commands, without a kernel."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from passlb.lab.topology import (
    LabError,
    LabSpec,
    node_commands,
    plan,
    prefix_of,
    switch_commands,
    sysctls,
)

BENCHMARK_NETS = (ip_network("198.18.0.0/15"), ip_network("2001:2::/48"))


def test_every_address_is_in_the_benchmarking_ranges_and_unique() -> None:
    topo = plan(LabSpec(backends=5, clients=3), "plb-abc123")
    addresses = [topo.vip4, topo.vip6_or_none, topo.router.back_ipv4, topo.router.back_ipv6]
    for node in topo.nodes:
        addresses += [node.ipv4, node.ipv6]
    assert len(set(addresses)) == len(addresses)
    for address in addresses:
        assert any(ip_address(str(address)) in net for net in BENCHMARK_NETS), address


def test_names_addresses_and_macs_follow_the_plan() -> None:
    topo = plan(LabSpec(backends=3, clients=2), "plb-abc123")
    assert [b.ns for b in topo.backends] == ["plb-abc123-b1", "plb-abc123-b2", "plb-abc123-b3"]
    assert [b.ipv4 for b in topo.backends] == ["198.18.2.11", "198.18.2.12", "198.18.2.13"]
    assert [b.ipv6 for b in topo.backends] == ["2001:2:0:2::11", "2001:2:0:2::12", "2001:2:0:2::13"]
    assert [c.ipv4 for c in topo.clients] == ["198.18.1.10", "198.18.1.11"]
    assert (topo.lb.ipv4, topo.lb.interface) == ("198.18.2.2", "eth0")
    assert (topo.vip4, topo.vip6_or_none) == ("198.18.0.10", "2001:2:0:ff00::10")
    assert topo.backends[0].mac == "02:00:c6:12:02:0b"
    macs = [n.mac for n in topo.nodes] + [topo.router.back_mac]
    assert len(set(macs)) == len(macs)
    assert topo.namespaces[0] == "plb-abc123-sw"
    assert all(ns.startswith("plb-abc123-") for ns in topo.namespaces)


def test_switch_creates_each_veth_peer_inside_its_node() -> None:
    topo = plan(LabSpec(backends=2), "plb-abc123")
    lines = switch_commands(topo)
    assert (
        "link add b2 type veth peer name eth0 address 02:00:c6:12:02:0c netns plb-abc123-b2"
        in lines
    )
    assert "link set rt1 master back up" in lines
    assert "link set c1 master front up" in lines
    assert not any(
        line.startswith("link add") and "netns" not in line and "bridge" not in line
        for line in lines
    )


@pytest.mark.parametrize(("gateway", "via"), [("router", "198.18.2.1"), ("lb", "198.18.2.2")])
def test_backend_gateway_picks_the_backends_default_route(gateway: str, via: str) -> None:
    topo = plan(LabSpec(backends=1, backend_gateway=gateway), "plb-abc123")  # type: ignore[arg-type]
    commands = node_commands(topo)
    assert f"route add default via {via}" in commands["plb-abc123-b1"]
    # Whatever the backends do, the LB reaches clients through the router.
    assert "route add default via 198.18.2.1" in commands["plb-abc123-lb"]
    assert "route add 198.18.0.0/24 via 198.18.2.2" in commands["plb-abc123-rt"]
    assert "route add 2001:2:0:ff00::/56 via 2001:2:0:2::2" in commands["plb-abc123-rt"]


def test_ipv6_addresses_skip_duplicate_address_detection() -> None:
    commands = node_commands(plan(LabSpec(backends=1), "plb-abc123"))
    assert "addr add 2001:2:0:2::11/64 dev eth0 nodad" in commands["plb-abc123-b1"]


def test_ipv4_only_lab_has_no_ipv6_anywhere() -> None:
    topo = plan(LabSpec(backends=1, ipv6=False), "plb-abc123")
    every_line = switch_commands(topo) + [
        line for lines in node_commands(topo).values() for line in lines
    ]
    assert not [line for line in every_line if "2001:" in line or "::" in line]
    assert sysctls(topo)["plb-abc123-b1"]["net/ipv6/conf/default/disable_ipv6"] == "1"
    with pytest.raises(LabError, match="ipv6=False"):
        _ = topo.backends[0].ipv6


def test_only_router_and_lb_forward_and_nobody_filters_asymmetric_paths() -> None:
    topo = plan(LabSpec(backends=1), "plb-abc123")
    values = sysctls(topo)
    forwarding = {ns for ns, v in values.items() if v.get("net/ipv4/ip_forward") == "1"}
    assert forwarding == {"plb-abc123-rt", "plb-abc123-lb"}
    for node in topo.nodes:
        assert values[node.ns]["net/ipv4/conf/default/rp_filter"] == "0"
        assert values[node.ns]["net/ipv6/conf/default/accept_dad"] == "0"


@pytest.mark.parametrize(
    ("spec_fields", "message"),
    [
        ({"backends": 0}, "backends"),
        ({"clients": 101}, "clients"),
        ({"backend_gateway": "switch"}, "backend_gateway"),
    ],
)
def test_bad_specs_name_the_field(spec_fields: dict[str, object], message: str) -> None:
    with pytest.raises(LabError, match=message):
        LabSpec(**spec_fields)  # type: ignore[arg-type]


def test_prefix_of_recognises_only_lab_namespaces() -> None:
    assert prefix_of("plb-3fa2c1-b1") == "plb-3fa2c1"
    assert prefix_of("plb-3fa2c1-sw") == "plb-3fa2c1"
    assert prefix_of("plbtest-dsr1") is None
    assert prefix_of("plb-3fa2c1") is None
    assert prefix_of("other-ns") is None


def test_a_cluster_lab_has_several_lbs_and_no_static_vip_route() -> None:
    topo = plan(LabSpec(backends=2, lbs=3, bgp=True), "plb-abc123")
    assert [(n.name, n.ipv4) for n in topo.lbs] == [
        ("lb1", "198.18.2.2"),
        ("lb2", "198.18.2.3"),
        ("lb3", "198.18.2.4"),
    ]
    router = node_commands(topo)["plb-abc123-rt"]
    assert not any("198.18.0.0/24" in line for line in router)
    assert sysctls(topo)["plb-abc123-rt"]["net/ipv4/fib_multipath_hash_policy"] == "1"
    assert all(sysctls(topo)[n.ns]["net/ipv4/ip_forward"] == "1" for n in topo.lbs)


def test_several_lbs_need_bgp() -> None:
    with pytest.raises(LabError, match="several load balancers need bgp=True"):
        LabSpec(lbs=2)
