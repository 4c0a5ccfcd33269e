"""The lab's topology as data: names, addresses, sysctls and the `ip` commands.

Pure: no I/O. `passlb.lab.lab` runs what this module describes.

    clients ── front 198.18.1.0/24 ── router ── back 198.18.2.0/24 ── LB, backends
    (c1 …)     2001:2:0:1::/64        (rt)      2001:2:0:2::/64      (lb, b1 …)

Both segments are bridges in a "switch" namespace, so nothing is created in
the root namespace. The router sends the VIP prefixes to the LB. Addresses
come from the benchmarking ranges only: 198.18.0.0/15 (RFC 2544) and
2001:2::/48 (RFC 5180).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from passlb.errors import PasslbError

NAMESPACE_PREFIX = "plb-"

VIP_NET4 = IPv4Network("198.18.0.0/24")
VIP_NET6 = IPv6Network("2001:2:0:ff00::/56")
FRONT_NET4 = IPv4Network("198.18.1.0/24")
FRONT_NET6 = IPv6Network("2001:2:0:1::/64")
BACK_NET4 = IPv4Network("198.18.2.0/24")
BACK_NET6 = IPv6Network("2001:2:0:2::/64")

ROUTER_HOST = 1
LB_HOST = 2
FIRST_CLIENT_HOST = 10
FIRST_BACKEND_HOST = 11
VIP_HOST = 10
MAX_CLIENTS = 100
MAX_BACKENDS = 100
MAX_LBS = 8  # load-balancer hosts 2..9, below the first backend

FRONT_BRIDGE = "front"
BACK_BRIDGE = "back"

Gateway = Literal["router", "lb"]


class LabError(PasslbError):
    """The lab could not be built, used or torn down as asked."""


@dataclass(frozen=True)
class LabSpec:
    backends: int = 3
    clients: int = 1
    # "router": backends answer clients through the router (DSR: replies bypass
    # the LB); "lb": backends route through the LB (NAT).
    backend_gateway: Gateway = "router"
    ipv6: bool = True
    # A cluster: several load balancers ("lb1" ...), each a next hop for the VIPs.
    lbs: int = 1
    # The router learns the VIP routes over BGP from the load balancers (a
    # routing daemon in the router, see passlb.lab.cluster) instead of static
    # routes to the one LB; it hashes flows over equal next hops by L4 ports.
    bgp: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.backends <= MAX_BACKENDS:
            raise LabError(f"LabSpec.backends: {self.backends} is not in 1..{MAX_BACKENDS}")
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise LabError(f"LabSpec.clients: {self.clients} is not in 1..{MAX_CLIENTS}")
        if not 1 <= self.lbs <= MAX_LBS:
            raise LabError(f"LabSpec.lbs: {self.lbs} is not in 1..{MAX_LBS}")
        if self.lbs > 1 and not self.bgp:
            raise LabError("LabSpec.lbs: several load balancers need bgp=True for their routes")
        if self.backend_gateway not in ("router", "lb"):
            raise LabError(
                f"LabSpec.backend_gateway: {self.backend_gateway!r} is not 'router' or 'lb'"
            )


@dataclass(frozen=True)
class Node:
    """One namespace of the lab and its address on its (first) interface."""

    name: str  # "c1", "rt", "lb", "b1" …
    ns: str  # the network namespace, "<prefix>-<name>"
    interface: str
    ipv4: str
    mac: str
    ipv6_or_none: str | None = None

    @property
    def ipv6(self) -> str:
        if self.ipv6_or_none is None:
            raise LabError(f"{self.name} has no IPv6 address: the lab was built with ipv6=False")
        return self.ipv6_or_none


@dataclass(frozen=True)
class RouterNode(Node):
    """The router: `interface`/`ipv4` face the clients, `back_*` the LB and backends."""

    back_interface: str = "eth1"
    back_ipv4: str = ""
    back_mac: str = ""
    back_ipv6_or_none: str | None = None

    @property
    def back_ipv6(self) -> str:
        if self.back_ipv6_or_none is None:
            raise LabError("the router has no IPv6 address: the lab was built with ipv6=False")
        return self.back_ipv6_or_none


@dataclass(frozen=True)
class Link:
    """A veth pair: `switch_end` joins `bridge` in the switch ns, the peer is `node`'s."""

    switch_end: str
    bridge: str
    ns: str
    interface: str
    mac: str


@dataclass(frozen=True)
class Topology:
    spec: LabSpec
    prefix: str
    switch_ns: str
    clients: tuple[Node, ...]
    router: RouterNode
    lbs: tuple[Node, ...]
    backends: tuple[Node, ...]
    vip4: str
    vip6_or_none: str | None
    links: tuple[Link, ...] = field(default=())

    @property
    def lb(self) -> Node:
        return self.lbs[0]

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (*self.clients, self.router, *self.lbs, *self.backends)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.switch_ns, *(n.ns for n in self.nodes))


def mac_for(address: IPv4Address) -> str:
    """A locally administered MAC derived from the IPv4 address: unique in the lab."""
    return "02:00:" + ":".join(f"{octet:02x}" for octet in address.packed)


def _host4(net: IPv4Network, host: int) -> IPv4Address:
    return net.network_address + host


def _host6(net: IPv6Network, host: int) -> IPv6Address:
    # "::11" for backend 11 reads like its IPv4 twin 198.18.2.11.
    return net.network_address + int(str(host), 16)


def plan(spec: LabSpec, prefix: str) -> Topology:
    """Every name and address of a lab with this spec and namespace prefix."""
    v6 = spec.ipv6

    def node(name: str, net4: IPv4Network, net6: IPv6Network, host: int) -> Node:
        ipv4 = _host4(net4, host)
        return Node(
            name=name,
            ns=f"{prefix}-{name}",
            interface="eth0",
            ipv4=str(ipv4),
            mac=mac_for(ipv4),
            ipv6_or_none=str(_host6(net6, host)) if v6 else None,
        )

    clients = tuple(
        node(f"c{i + 1}", FRONT_NET4, FRONT_NET6, FIRST_CLIENT_HOST + i)
        for i in range(spec.clients)
    )
    router_back4 = _host4(BACK_NET4, ROUTER_HOST)
    router_front4 = _host4(FRONT_NET4, ROUTER_HOST)
    router = RouterNode(
        name="rt",
        ns=f"{prefix}-rt",
        interface="eth0",
        ipv4=str(router_front4),
        mac=mac_for(router_front4),
        ipv6_or_none=str(_host6(FRONT_NET6, ROUTER_HOST)) if v6 else None,
        back_interface="eth1",
        back_ipv4=str(router_back4),
        back_mac=mac_for(router_back4),
        back_ipv6_or_none=str(_host6(BACK_NET6, ROUTER_HOST)) if v6 else None,
    )
    lbs = tuple(
        node("lb" if spec.lbs == 1 else f"lb{i + 1}", BACK_NET4, BACK_NET6, LB_HOST + i)
        for i in range(spec.lbs)
    )
    backends = tuple(
        node(f"b{i + 1}", BACK_NET4, BACK_NET6, FIRST_BACKEND_HOST + i)
        for i in range(spec.backends)
    )
    links = (
        *(Link(c.name, FRONT_BRIDGE, c.ns, c.interface, c.mac) for c in clients),
        Link("rt0", FRONT_BRIDGE, router.ns, router.interface, router.mac),
        Link("rt1", BACK_BRIDGE, router.ns, router.back_interface, router.back_mac),
        *(Link(n.name, BACK_BRIDGE, n.ns, n.interface, n.mac) for n in (*lbs, *backends)),
    )
    return Topology(
        spec=spec,
        prefix=prefix,
        switch_ns=f"{prefix}-sw",
        clients=clients,
        router=router,
        lbs=lbs,
        backends=backends,
        vip4=str(_host4(VIP_NET4, VIP_HOST)),
        vip6_or_none=str(_host6(VIP_NET6, VIP_HOST)) if v6 else None,
        links=links,
    )


def switch_commands(topo: Topology) -> list[str]:
    """`ip -batch` lines run in the switch ns: bridges, and veth pairs whose far
    ends are created straight inside the node namespaces."""
    lines = []
    for bridge in (FRONT_BRIDGE, BACK_BRIDGE):
        # Without snooping the bridge floods multicast, so IPv6 neighbour
        # discovery works before any MLD report was seen.
        lines.append(f"link add {bridge} type bridge mcast_snooping 0")
        lines.append(f"link set {bridge} up")
    for link in topo.links:
        lines.append(
            f"link add {link.switch_end} type veth peer name {link.interface}"
            f" address {link.mac} netns {link.ns}"
        )
        lines.append(f"link set {link.switch_end} master {link.bridge} up")
    return lines


def _interface_lines(
    interface: str, ipv4: str, ipv6: str | None, plen4: int, plen6: int
) -> list[str]:
    lines = [f"link set {interface} up", f"addr add {ipv4}/{plen4} dev {interface}"]
    if ipv6 is not None:
        # nodad: usable at once, no 1-2 s of tentative state.
        lines.append(f"addr add {ipv6}/{plen6} dev {interface} nodad")
    return lines


def _default_routes(gateway4: str, gateway6: str | None) -> list[str]:
    lines = [f"route add default via {gateway4}"]
    if gateway6 is not None:
        lines.append(f"route add ::/0 via {gateway6}")
    return lines


def node_commands(topo: Topology) -> dict[str, list[str]]:
    """`ip -batch` lines per node namespace: addresses and routes."""
    router, lb = topo.router, topo.lb
    p4f, p6f = FRONT_NET4.prefixlen, FRONT_NET6.prefixlen
    p4b, p6b = BACK_NET4.prefixlen, BACK_NET6.prefixlen
    commands: dict[str, list[str]] = {}
    for client in topo.clients:
        commands[client.ns] = [
            "link set lo up",
            *_interface_lines(client.interface, client.ipv4, client.ipv6_or_none, p4f, p6f),
            *_default_routes(router.ipv4, router.ipv6_or_none),
        ]
    router_lines = [
        "link set lo up",
        *_interface_lines(router.interface, router.ipv4, router.ipv6_or_none, p4f, p6f),
        *_interface_lines(
            router.back_interface, router.back_ipv4, router.back_ipv6_or_none, p4b, p6b
        ),
    ]
    if not topo.spec.bgp:
        router_lines.append(f"route add {VIP_NET4} via {lb.ipv4}")
        if lb.ipv6_or_none is not None:
            router_lines.append(f"route add {VIP_NET6} via {lb.ipv6_or_none}")
    commands[router.ns] = router_lines
    for node in topo.lbs:
        commands[node.ns] = [
            "link set lo up",
            *_interface_lines(node.interface, node.ipv4, node.ipv6_or_none, p4b, p6b),
            *_default_routes(router.back_ipv4, router.back_ipv6_or_none),
        ]
    via = lb if topo.spec.backend_gateway == "lb" else None
    gateway4 = via.ipv4 if via else router.back_ipv4
    gateway6 = via.ipv6_or_none if via else router.back_ipv6_or_none
    for backend in topo.backends:
        commands[backend.ns] = [
            "link set lo up",
            *_interface_lines(backend.interface, backend.ipv4, backend.ipv6_or_none, p4b, p6b),
            *_default_routes(gateway4, gateway6),
        ]
    return commands


def sysctls(topo: Topology) -> dict[str, dict[str, str]]:
    """Sysctls per namespace, as paths under /proc/sys. They are written before
    any interface exists, so each new interface inherits the `default` values."""
    v6 = topo.spec.ipv6
    common = {
        # DSR replies bypass the LB, so paths are asymmetric by design.
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/default/rp_filter": "0",
        # An LB that forwards out of the interface a packet came in on would
        # otherwise redirect backends past itself and break NAT replies.
        "net/ipv4/conf/all/accept_redirects": "0",
        "net/ipv4/conf/default/accept_redirects": "0",
        "net/ipv4/conf/all/send_redirects": "0",
        "net/ipv4/conf/default/send_redirects": "0",
    }
    if v6:
        common |= {
            "net/ipv6/conf/all/accept_dad": "0",
            "net/ipv6/conf/default/accept_dad": "0",
            "net/ipv6/conf/all/accept_redirects": "0",
            "net/ipv6/conf/default/accept_redirects": "0",
        }
    else:
        common |= {
            "net/ipv6/conf/all/disable_ipv6": "1",
            "net/ipv6/conf/default/disable_ipv6": "1",
        }
    forwarding = {"net/ipv4/ip_forward": "1"}
    if v6:
        forwarding["net/ipv6/conf/all/forwarding"] = "1"
    result = {n.ns: dict(common) for n in topo.nodes}
    for ns in (topo.router.ns, *(n.ns for n in topo.lbs)):
        result[ns] |= forwarding
    if topo.spec.bgp:
        # Equal-cost next hops chosen by a hash over the L4 ports too, so the
        # flows of one client spread over the load balancers.
        result[topo.router.ns]["net/ipv4/fib_multipath_hash_policy"] = "1"
        if v6:
            result[topo.router.ns]["net/ipv6/fib_multipath_hash_policy"] = "1"
    # The switch only bridges; its ports need no addresses of their own.
    result[topo.switch_ns] = {
        "net/ipv6/conf/all/disable_ipv6": "1",
        "net/ipv6/conf/default/disable_ipv6": "1",
    }
    return result


def switch_sysctls_if_present() -> dict[str, str]:
    """The switch is a plain switch: no firewall on bridged frames. These exist
    only where br_netfilter is loaded (e.g. by a container runtime), which makes
    every bridge crossing run the iptables hooks: 10-20 % of a lab path's CPU."""
    return {f"net/bridge/bridge-nf-call-{t}": "0" for t in ("iptables", "ip6tables", "arptables")}


def prefix_of(namespace: str) -> str | None:
    """The lab prefix of a namespace name ("plb-3fa2c1-b1" -> "plb-3fa2c1"), if it is ours."""
    if not namespace.startswith(NAMESPACE_PREFIX):
        return None
    parts = namespace.split("-")
    return "-".join(parts[:2]) if len(parts) >= 3 and parts[1] else None
