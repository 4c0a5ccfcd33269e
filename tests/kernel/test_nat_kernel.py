"""The nat driver on the real kernel: a lab whose backends route through the LB.

    client c1 ── router ── LB (passlb_nat, conntrack) ── b1 b2 b3 (default route: the LB)

Every test builds its own lab (torn down by the `make_lab` fixture, pass or
fail) and drives a NatDriver inside the LB's namespace: nft through a
libnftables context opened there, conntrack through a ctnetlink socket there.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

import pytest

from passlb.control.desired import compute_desired
from passlb.dataplane.nft.conntrack import CtFilter, NetlinkConntrack
from passlb.dataplane.nft.nat import NatDriver
from passlb.dataplane.nft.runner import NftRunner
from passlb.dataplane.nft.testing import NO_CHECK, ports
from passlb.lab import Lab, LabSpec
from passlb.lab.client import tcp_requests, tcp_stream, tls_requests, udp_requests, udp_stream
from passlb.model import (
    AdminState,
    Backend,
    Config,
    ConnTracking,
    Mode,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import DesiredState

pytestmark = pytest.mark.kernel

GOLDEN = Path(__file__).parent.parent / "golden" / "nat_multi_service.nft"
VIP_ALL = "198.18.0.11"  # routed to the LB with the rest of 198.18.0.0/24
T = TypeVar("T")
MakeLab = Callable[..., Lab]


@dataclass
class NatLab:
    lab: Lab
    driver: NatDriver

    @property
    def client(self) -> str:
        return self.lab.clients[0].ns

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.lab.call(self.client, fn, *args)

    def address_of(self, backend_name: str) -> str:
        return self.lab.backend(backend_name).ipv4

    def new_driver(self) -> NatDriver:
        return NatDriver(NftRunner(self.lab.lb.ns), NetlinkConntrack(self.lab.lb.ns))


@pytest.fixture
def nat_lab(make_lab: MakeLab) -> Iterator[NatLab]:
    lab = make_lab(LabSpec(backends=3, backend_gateway="lb"))
    for backend in lab.backends:
        lab.start_servers(backend, tcp=[8080, 7000, 7001], udp=[53, 7000], tls=[8443])
    setup = NatLab(lab, NatDriver(NftRunner(lab.lb.ns), NetlinkConntrack(lab.lb.ns)))
    yield setup
    setup.driver.close()


def nat(
    name: str,
    vip: str,
    backends: list[str],
    *,
    protocol: Protocol = Protocol.TCP,
    port_set: PortSet | None = None,
    target_port: int | None = None,
    drain_timeout: float = 5.0,
) -> Service:
    return Service(
        name=name,
        vip=ip_address(vip),
        protocol=protocol,
        ports=port_set if port_set is not None else ports(80),
        mode=Mode.NAT,
        backends=tuple(Backend(ip_address(b)) for b in backends),
        health=NO_CHECK,
        target_port=target_port,
        drain_timeout=drain_timeout,
        ring_size=1009,
        hash_seed=0x5EED,
        conntrack=ConnTracking(udp_timeout=30.0),
    )


def desired(*services: Service, drains: dict[tuple[str, str], float] | None = None) -> DesiredState:
    return compute_desired(Config(services=services), {}, drains or {}, now=time.monotonic())


def backends_of(replies: list[dict[str, Any]]) -> set[str]:
    assert all("error" not in r for r in replies), replies
    return {r["backend"] for r in replies}


def test_golden_ruleset_loads_into_the_kernel(make_lab: MakeLab) -> None:
    lab = make_lab(LabSpec(backends=1, clients=1, ipv6=False))
    lab.run(lab.lb.ns, ["nft", "-f", str(GOLDEN)])
    listed = lab.run(lab.lb.ns, ["nft", "-j", "list", "maps", "inet"]).stdout
    assert '"ring_web"' in listed and '"endpoints4"' in listed


def test_client_ip_tls_udp_and_ipv6_reach_the_backends(nat_lab: NatLab) -> None:
    lab = nat_lab.lab
    addrs = [b.ipv4 for b in lab.backends]
    addrs6 = [b.ipv6 for b in lab.backends]
    nat_lab.driver.sync(
        desired(
            nat("web", lab.vip4, addrs, target_port=8080),
            nat("tls", lab.vip4, addrs, port_set=ports(443), target_port=8443),
            nat("dns", lab.vip4, addrs, protocol=Protocol.UDP, port_set=ports(53)),
            nat("web6", lab.vip6, addrs6, target_port=8080),
        )
    )
    client = lab.clients[0]
    tcp = nat_lab.call(tcp_requests, lab.vip4, 80, 30)
    assert len(backends_of(tcp)) == 3
    assert {r["peer"][0] for r in tcp} == {client.ipv4}  # the real client address
    assert {r["local"][1] for r in tcp} == {8080}
    tls = nat_lab.call(tls_requests, lab.vip4, 443, 6, "vip.lab.test", lab.ca_file)
    assert backends_of(tls) and {r["tls_version"] for r in tls} <= {"TLSv1.3", "TLSv1.2"}
    assert {r["peer"][0] for r in tls} == {client.ipv4}
    udp = nat_lab.call(udp_requests, lab.vip4, 53, 20)
    assert len(backends_of(udp)) >= 2
    assert {r["peer"][0] for r in udp} == {client.ipv4}
    six = nat_lab.call(tcp_requests, lab.vip6, 80, 20)
    assert len(backends_of(six)) >= 2
    assert {ip_address(r["peer"][0]) for r in six} == {ip_address(client.ipv6)}
    counters = nat_lab.driver.counters()
    assert sum(b.new_flows for b in counters["web"].backends.values()) == 30
    assert sum(b.new_flows for b in counters["dns"].backends.values()) == 20
    assert all(b.packets > 0 and b.bytes > 0 for b in counters["web"].backends.values())
    flows = nat_lab.driver.flows("web")
    assert len(flows) == 30 and {str(f.src) for f in flows} == {client.ipv4}


def test_port_ranges_and_all_ports_keep_the_port(nat_lab: NatLab) -> None:
    lab = nat_lab.lab
    addrs = [b.ipv4 for b in lab.backends]
    nat_lab.driver.sync(
        desired(
            nat(
                "range",
                lab.vip4,
                addrs,
                protocol=Protocol.TCP_UDP,
                port_set=ports((7000, 7001)),
            ),
            nat("all", VIP_ALL, addrs, port_set=PortSet(all_ports=True)),
        )
    )
    for port in (7000, 7001):
        replies = nat_lab.call(tcp_requests, lab.vip4, port, 6)
        assert backends_of(replies) and {r["local"][1] for r in replies} == {port}
    udp = nat_lab.call(udp_requests, lab.vip4, 7000, 6)
    assert backends_of(udp) and {r["local"][1] for r in udp} == {7000}
    for port in (8080, 7001):
        replies = nat_lab.call(tcp_requests, VIP_ALL, port, 6)
        assert backends_of(replies) and {r["local"][1] for r in replies} == {port}


def test_hairpin_a_backend_reaches_its_own_vip(nat_lab: NatLab) -> None:
    lab = nat_lab.lab
    nat_lab.driver.sync(
        desired(nat("web", lab.vip4, [b.ipv4 for b in lab.backends], target_port=8080))
    )
    b1 = lab.backends[0]
    replies = lab.call(b1.ns, tcp_requests, lab.vip4, 80, 30)
    # Some land on b1 itself, some on its neighbours: all work, answering the LB.
    assert backends_of(replies) == {"b1", "b2", "b3"}
    assert {r["peer"][0] for r in replies} == {lab.lb.ipv4}


def test_twenty_pool_changes_under_a_tcp_and_a_udp_stream(nat_lab: NatLab) -> None:
    lab = nat_lab.lab
    addrs = [b.ipv4 for b in lab.backends]
    # b1..b3 serve throughout; an absent b4 and changing weights move ring slots.
    spare = "198.18.2.99"

    def pool(step: int) -> DesiredState:
        web = nat("web", lab.vip4, addrs + ([spare] if step % 2 else []), target_port=8080)
        weighted = tuple(replace(b, weight=1 + (step + i) % 3) for i, b in enumerate(web.backends))
        dns = nat("dns", lab.vip4, addrs, protocol=Protocol.UDP, port_set=ports(53))
        dns = replace(dns, backends=weighted[:3])
        return desired(replace(web, backends=weighted), dns)

    nat_lab.driver.sync(pool(0))
    with ThreadPoolExecutor(2) as pool_threads:
        tcp: Future[dict[str, Any]] = pool_threads.submit(
            nat_lab.call, tcp_stream, lab.vip4, 80, 5.0
        )
        udp: Future[dict[str, Any]] = pool_threads.submit(
            nat_lab.call, udp_stream, lab.vip4, 53, 5.0, 0.02
        )
        time.sleep(0.5)
        for step in range(1, 21):
            nat_lab.driver.sync(pool(step))
            time.sleep(0.2)
        tcp_result, udp_result = tcp.result(), udp.result()
    assert tcp_result["errors"] == [] and tcp_result["rounds"] > 100, tcp_result
    assert udp_result["errors"] == [] and udp_result["lost"] == [], udp_result
    assert len(udp_result["by_backend"]) == 1  # conntrack kept the flow on its backend


def held_connection(host: str, port: int, seconds: float, interval: float) -> dict[str, Any]:
    """One TCP connection used every `interval`: when it last worked and how it ended."""
    out: dict[str, Any] = {"backend": None, "last_ok": None, "error": None, "error_at": None}
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, port), timeout=2.0) as sock:
        out["backend"] = sock.recv(4096).split(b'"backend": "')[1].split(b'"')[0].decode()
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"ping\n")
                if sock.recv(64) != b"ping\n":
                    raise ConnectionError("echo differs")
                out["last_ok"] = time.monotonic()
            except OSError as exc:
                out["error"] = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                out["error_at"] = time.monotonic()
                return out
            time.sleep(interval)
    return out


def test_drain_keeps_the_flow_until_the_deadline_then_resets_it(nat_lab: NatLab) -> None:
    lab = nat_lab.lab
    web = nat("web", lab.vip4, [b.ipv4 for b in lab.backends], target_port=8080)
    nat_lab.driver.sync(desired(web))
    with ThreadPoolExecutor(1) as threads:
        held: Future[dict[str, Any]] = threads.submit(
            nat_lab.call, held_connection, lab.vip4, 80, 9.0, 0.1
        )
        time.sleep(0.5)
        (flow,) = nat_lab.driver.flows("web")
        victim = flow.backend
        drained = replace(
            web,
            backends=tuple(
                replace(b, admin=AdminState.DRAIN) if b.key == victim else b for b in web.backends
            ),
        )
        drain_start = time.monotonic()
        drains = {("web", victim): drain_start}
        nat_lab.driver.sync(desired(drained, drains=drains))
        fresh = nat_lab.call(tcp_requests, lab.vip4, 80, 30)
        time.sleep(max(0.0, drain_start + 5.0 - time.monotonic()))
        state = desired(drained, drains=drains)
        assert state.services[0].backend(victim).cut_flows  # type: ignore[union-attr]
        cutting = time.monotonic()  # the cut happens inside the sync: the reset may come first
        nat_lab.driver.sync(state)
        cut_at = time.monotonic()
        result = held.result()
    victim_name = next(b.name for b in lab.backends if b.ipv4 == victim)
    assert result["backend"] == victim_name
    assert victim_name not in backends_of(fresh)  # no new flow from the moment of the drain
    assert result["last_ok"] >= drain_start + 4.5  # kept working through the drain
    # After the cut the next segment is a new conntrack flow, balanced to a backend
    # without that connection, which answers with a reset.
    assert result["error"] == "ECONNRESET", result
    assert cutting <= result["error_at"] <= cut_at + 1.0


def test_udp_failover_within_one_datagram_interval(nat_lab: NatLab) -> None:
    lab = nat_lab.lab
    addrs = [b.ipv4 for b in lab.backends]
    dns = nat("dns", lab.vip4, addrs, protocol=Protocol.UDP, port_set=ports(53))
    nat_lab.driver.sync(desired(dns))
    with ThreadPoolExecutor(1) as threads:
        stream: Future[dict[str, Any]] = threads.submit(
            nat_lab.call, udp_stream, lab.vip4, 53, 3.0, 0.1
        )
        time.sleep(1.0)
        (flow,) = nat_lab.driver.flows("dns")
        survivors = [a for a in addrs if a != flow.backend]
        smaller = tuple(Backend(ip_address(a)) for a in survivors)
        nat_lab.driver.sync(desired(replace(dns, backends=smaller)))
        result = stream.result()
    first = result["backends"][0]
    assert nat_lab.address_of(first) == flow.backend
    switched = [i for i, b in enumerate(result["backends"]) if b not in (first, None)]
    assert switched, result
    # At most the datagram in flight at the removal is lost; every later one is served.
    assert len(result["lost"]) <= 1, result
    assert all(b not in (first, None) for b in result["backends"][switched[0] :]), result
    assert result["errors"] == []
    ct = NetlinkConntrack(lab.lb.ns)
    udp_entries = ct.entries(CtFilter(4, protos=("udp",)))
    assert [e for e in udp_entries if str(e.reply_src) == flow.backend] == []


def test_a_new_driver_adopts_the_table_without_disturbing_a_flow(nat_lab: NatLab) -> None:
    lab = nat_lab.lab
    state = desired(nat("web", lab.vip4, [b.ipv4 for b in lab.backends], target_port=8080))
    nat_lab.driver.sync(state)
    nat_lab.call(tcp_requests, lab.vip4, 80, 10)
    before = nat_lab.driver.counters()["web"].total.new_flows
    with ThreadPoolExecutor(1) as threads:
        stream: Future[dict[str, Any]] = threads.submit(nat_lab.call, tcp_stream, lab.vip4, 80, 3.0)
        time.sleep(1.0)
        successor = nat_lab.new_driver()  # the daemon restarted: same config
        result = successor.sync(state)
        streamed = stream.result()
    assert result.full and result.operations < 50  # rules rewritten, no ring or map rewrite
    assert streamed["errors"] == [] and streamed["rounds"] > 50, streamed
    assert successor.counters()["web"].total.new_flows == before + 1  # counters kept


def test_conntrack_dumps_agree_with_pyroute2(nat_lab: NatLab) -> None:
    from pyroute2 import Conntrack  # the reference decoder (too slow for the daemon)

    lab = nat_lab.lab
    addrs = [b.ipv4 for b in lab.backends]
    nat_lab.driver.sync(
        desired(
            nat("web", lab.vip4, addrs, target_port=8080),
            nat("dns", lab.vip4, addrs, protocol=Protocol.UDP, port_set=ports(53)),
            nat("web6", lab.vip6, [b.ipv6 for b in lab.backends], target_port=8080),
        )
    )
    nat_lab.call(tcp_requests, lab.vip4, 80, 10)
    nat_lab.call(udp_requests, lab.vip4, 53, 10)
    nat_lab.call(tcp_requests, lab.vip6, 80, 10)
    ours = NetlinkConntrack(lab.lb.ns)
    for family, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        with Conntrack(nfgen_family=af, netns=lab.lb.ns) as reference:
            expected = {
                (
                    e.tuple_orig.proto,
                    ip_address(e.tuple_orig.saddr),
                    e.tuple_orig.sport,
                    ip_address(e.tuple_orig.daddr),
                    e.tuple_orig.dport,
                    ip_address(e.tuple_reply.saddr),
                    e.tuple_reply.sport,
                    e.mark or 0,
                )
                for e in reference.dump_entries()
                if e.tuple_orig.proto in (6, 17)
            }
        got = {
            (
                6 if e.proto == "tcp" else 17,
                e.src,
                e.sport,
                e.dst,
                e.dport,
                e.reply_src,
                e.reply_sport,
                e.mark,
            )
            for e in ours.entries(CtFilter(family))
        }
        assert len(got) >= 10 and got == expected
        tally = Counter((e[-1], e[3]) for e in expected)
        assert ours.count(family) == dict(tally)
        marked = next(iter(got))[-1]
        assert {e.mark for e in ours.entries(CtFilter(family, mark=marked))} == {marked}
