"""Edge protection on the real kernel: allow and deny lists, drop or reject, limits, and
the drop counters, in dsr and nat labs (clients -- router -- LB + backends).

Each mode gets one lab for the module; every test gets its own driver and table.
Two clients: c1 is the one the lists allow, c2 the one they refuse.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from passlb.dataplane.backend_setup import apply_backend_setup
from passlb.dataplane.base import Driver
from passlb.dataplane.nft.conntrack import NetlinkConntrack
from passlb.dataplane.nft.dsr import DsrDriver
from passlb.dataplane.nft.nat import NatDriver
from passlb.dataplane.nft.runner import NftRunner
from passlb.dataplane.nft.testing import desired, ports, service
from passlb.lab import Lab, LabSpec
from passlb.lab.client import tcp_requests, tcp_stream, udp_requests
from passlb.lab.flood_run import flood_with_clients
from passlb.lab.synflood import syn_flood
from passlb.lab.topology import Gateway
from passlb.model import Backend, ClientRules, Limits, Mode, Protocol, Refusal, Service

pytestmark = pytest.mark.kernel

ECHO, STREAM = 80, 9000


def _lab(gateway: Gateway) -> Iterator[Lab]:
    with Lab(LabSpec(backends=2, clients=2, backend_gateway=gateway)) as lab:
        for b in lab.backends:
            if gateway == "router":  # dsr: backends hold the VIPs
                for vip in (lab.vip4, lab.vip6):
                    apply_backend_setup(vip, netns=b.ns)
            lab.start_servers(b, tcp=[ECHO, STREAM], udp=[ECHO])
        yield lab


@pytest.fixture(scope="module")
def dsr_lab() -> Iterator[Lab]:
    yield from _lab("router")


@pytest.fixture(scope="module")
def nat_lab() -> Iterator[Lab]:
    yield from _lab("lb")


@pytest.fixture
def dsr(dsr_lab: Lab) -> Iterator[DsrDriver]:
    drv = DsrDriver([dsr_lab.lb.interface], NftRunner(dsr_lab.lb.ns))
    yield drv
    drv.close(cleanup=True)


@pytest.fixture
def nat(nat_lab: Lab) -> Iterator[NatDriver]:
    drv = NatDriver(NftRunner(nat_lab.lb.ns), NetlinkConntrack(nat_lab.lb.ns))
    yield drv
    drv.close(cleanup=True)


def lab_and_driver(request: pytest.FixtureRequest, mode: Mode) -> tuple[Lab, Driver]:
    """The mode's lab and a fresh driver of it (for tests parametrized by mode)."""
    lab: Lab = request.getfixturevalue("dsr_lab" if mode is Mode.DSR else "nat_lab")
    driver: Driver = request.getfixturevalue(mode.value)
    return lab, driver


def guarded(lab: Lab, mode: Mode, family: int, **changes: Any) -> Service:
    vip = lab.vip4 if family == 4 else lab.vip6
    backends = [Backend(ip_address(b.ipv4 if family == 4 else b.ipv6)) for b in lab.backends]
    svc = service(
        f"edge{family}", vip, backends, protocol=Protocol.TCP_UDP, port_set=ports(ECHO, STREAM)
    )
    return replace(svc, mode=mode, **changes)


def only(lab: Lab, client: int, family: int) -> ClientRules:
    node = lab.clients[client]
    return ClientRules(allow=(ip_network(node.ipv4 if family == 4 else node.ipv6),))


def errors(replies: list[dict[str, Any]]) -> list[str]:
    return [r["error"] for r in replies if "error" in r]


def drops(driver: Driver, name: str) -> dict[str, int]:
    return {r: n for r, n in driver.counters(active_flows=False)[name].drops.items() if n}


def new_flows(driver: Driver, name: str) -> int:
    return driver.counters(active_flows=False)[name].total.new_flows


@pytest.mark.parametrize("mode", [Mode.DSR, Mode.NAT])
@pytest.mark.parametrize("family", [4, 6])
def test_allowed_clients_connect_others_are_rejected_and_counted(
    request: pytest.FixtureRequest, mode: Mode, family: int
) -> None:
    lab, driver = lab_and_driver(request, mode)
    rules = replace(only(lab, 0, family), refuse=Refusal.REJECT)
    svc = guarded(lab, mode, family, clients=rules)
    driver.sync(desired(svc))
    vip = lab.vip4 if family == 4 else lab.vip6
    allowed, refused = lab.clients[0].ns, lab.clients[1].ns
    assert errors(lab.call(allowed, tcp_requests, vip, ECHO, 5)) == []
    assert errors(lab.call(allowed, udp_requests, vip, ECHO, 5)) == []
    flows = new_flows(driver, svc.name)
    tcp = lab.call(refused, tcp_requests, vip, ECHO, 4)
    udp = lab.call(refused, udp_requests, vip, ECHO, 3)
    assert [e.split(":")[0] for e in errors(tcp)] == ["ConnectionRefusedError"] * 4  # a reset
    # ICMP administratively prohibited: EHOSTUNREACH (IPv4), EACCES (IPv6) on the socket
    unreachable = "OSError" if family == 4 else "PermissionError"
    assert [e.split(":")[0] for e in errors(udp)] == [unreachable] * 3
    # One SYN per refused connection (a reset ends it), one datagram per request.
    assert drops(driver, svc.name) == {"not_allowed": 7}
    assert new_flows(driver, svc.name) == flows


@pytest.mark.parametrize("mode", [Mode.DSR, Mode.NAT])
def test_denied_datagrams_are_dropped_silently_and_counted(
    request: pytest.FixtureRequest, mode: Mode
) -> None:
    lab, driver = lab_and_driver(request, mode)
    c2 = lab.clients[1]
    svc = guarded(lab, mode, 4, clients=ClientRules(deny=(ip_network(c2.ipv4),)))
    driver.sync(desired(svc))
    replies = lab.call(c2.ns, udp_requests, lab.vip4, ECHO, 3, 0.3)
    assert [e.split(":")[0] for e in errors(replies)] == ["TimeoutError"] * 3
    assert errors(lab.call(lab.clients[0].ns, udp_requests, lab.vip4, ECHO, 3)) == []
    assert drops(driver, svc.name) == {"not_allowed": 3}


@pytest.mark.parametrize("mode", [Mode.DSR, Mode.NAT])
def test_a_list_change_under_traffic_keeps_allowed_flows(
    request: pytest.FixtureRequest, mode: Mode
) -> None:
    lab, driver = lab_and_driver(request, mode)
    c1, c2 = lab.clients
    first = guarded(lab, mode, 4, clients=only(lab, 0, 4))
    driver.sync(desired(first))
    result: dict[str, Any] = {}
    stream = threading.Thread(
        target=lambda: result.update(lab.call(c1.ns, tcp_stream, lab.vip4, STREAM, 2.0))
    )
    stream.start()
    try:
        # Both clients allowed, then c2 denied by name: c1's stream never notices.
        both = ClientRules(allow=(ip_network(c1.ipv4), ip_network(c2.ipv4)))
        driver.sync(desired(replace(first, clients=both)))
        assert errors(lab.call(c2.ns, tcp_requests, lab.vip4, ECHO, 2)) == []
        driver.sync(desired(replace(first, clients=replace(both, deny=(ip_network(c2.ipv4),)))))
    finally:
        stream.join()
    assert result["errors"] == [] and result["received"] > 100_000


@pytest.mark.parametrize("mode", [Mode.DSR, Mode.NAT])
def test_a_client_over_its_new_flow_rate_is_limited_and_others_are_not(
    request: pytest.FixtureRequest, mode: Mode
) -> None:
    lab, driver = lab_and_driver(request, mode)
    rules = ClientRules(refuse=Refusal.REJECT)
    svc = guarded(lab, mode, 4, clients=rules, limits=Limits(client_new_flow_rate=5))
    driver.sync(desired(svc))
    # 60 connections as fast as one client opens them: its bucket holds 5 and
    # refills at 5/s, so all of them would pass only if opening took 11 s. TCP:
    # a reset is never rate-limited, as the kernel's ICMP errors are.
    noisy = lab.call(lab.clients[0].ns, tcp_requests, lab.vip4, ECHO, 60, 1.0)
    refused = [e for e in errors(noisy) if e.startswith("ConnectionRefusedError")]
    assert len(refused) >= 30 and len(errors(noisy)) == len(refused)
    assert errors(lab.call(lab.clients[1].ns, tcp_requests, lab.vip4, ECHO, 3)) == []
    assert drops(driver, svc.name) == {"client_rate_limited": len(refused)}


def test_a_service_over_its_new_flow_rate_limits_every_client(dsr_lab: Lab, dsr: DsrDriver) -> None:
    lab = dsr_lab
    rules = ClientRules(refuse=Refusal.REJECT)
    svc = guarded(lab, Mode.DSR, 6, clients=rules, limits=Limits(new_flow_rate=5))
    dsr.sync(desired(svc))
    both = [lab.call(c.ns, tcp_requests, lab.vip6, ECHO, 30, 1.0) for c in lab.clients]
    refused = [e for replies in both for e in errors(replies)]
    assert all(e.startswith("ConnectionRefusedError") for e in refused)
    # Both clients share one bucket of 5, refilled at 5/s: 60 pass only in 11 s.
    assert len(refused) >= 30
    assert drops(dsr, svc.name) == {"rate_limited": len(refused)}


def flow_table(svc: Service, *, size: int, syn_timeout: float) -> Service:
    return replace(
        svc,
        protocol=Protocol.TCP,
        conntrack=replace(svc.conntrack, flow_table_size=size, syn_timeout=syn_timeout),
    )


def test_dsr_records_lone_syns_briefly_and_a_handshake_for_tcp_timeout(
    dsr_lab: Lab, dsr: DsrDriver
) -> None:
    lab = dsr_lab
    svc = flow_table(guarded(lab, Mode.DSR, 4), size=4096, syn_timeout=3)
    dsr.sync(desired(svc))
    small = functools.partial(
        syn_flood, sources="198.19.0.0/24", rate=1000, seconds=5.0, packets=256
    )
    flood = lab.call(lab.clients[1].ns, small, lab.vip4, ECHO)
    assert flood.sent == 256
    assert errors(lab.call(lab.clients[0].ns, tcp_requests, lab.vip4, ECHO, 3)) == []
    flows = dsr.flows(svc.name)
    spoofed = [f for f in flows if f.src in ip_network("198.19.0.0/24")]
    handshaken = [f for f in flows if str(f.src) == lab.clients[0].ipv4]
    assert len(spoofed) == 256 and len(handshaken) == 3
    assert all(f.expires_in is not None and f.expires_in <= 3 for f in spoofed)
    assert all(f.expires_in is not None and f.expires_in > 250 for f in handshaken)


def test_dsr_under_a_syn_flood_keeps_its_flow_table_and_its_flows(
    dsr_lab: Lab, dsr: DsrDriver
) -> None:
    """20,000 SYN/s from 65,536 spoofed sources for 10 s, with established and new
    legitimate connections meanwhile. Without the protection the 200,000 lone SYNs
    would stay for tcp_timeout and fill this 131,072-entry table."""
    lab = dsr_lab
    svc = flow_table(guarded(lab, Mode.DSR, 4), size=131_072, syn_timeout=2)
    dsr.sync(desired(svc))
    run = flood_with_clients(
        lab, ECHO, lambda: dsr.counters()[svc.name].total.active_flows, stream_port=STREAM
    )
    assert run.flood.sent == 200_000
    # At most the last syn_timeout's SYNs (2 s x 20,000/s) and the legitimate flows.
    assert run.occupied < 131_072 // 2, run.occupied
    assert run.stream is not None and run.stream["errors"] == [] and run.stream["received"] > 0
    assert len(run.new) > 100 and len(run.failed) <= len(run.new) // 100, run.failed[:5]


@pytest.mark.parametrize("family", [4, 6])
def test_nat_syn_proxy_completes_handshakes_before_conntrack(
    nat_lab: Lab, nat: NatDriver, family: int
) -> None:
    lab = nat_lab
    svc = replace(guarded(lab, Mode.NAT, family), syn_proxy=True)
    nat.sync(desired(svc))
    vip = lab.vip4 if family == 4 else lab.vip6
    replies = lab.call(lab.clients[0].ns, tcp_requests, vip, ECHO, 5)
    assert errors(replies) == []
    me = lab.clients[0].ipv4 if family == 4 else lab.clients[0].ipv6
    assert {r["peer"][0] for r in replies} == {me}  # the backend still sees the client
    assert errors(lab.call(lab.clients[0].ns, udp_requests, vip, ECHO, 3)) == []  # UDP untouched
    assert drops(nat, svc.name) == {"syn_proxy": 5}  # one SYN answered by the proxy per flow
    assert new_flows(nat, svc.name) == 8


def test_nat_syn_proxy_under_a_syn_flood_keeps_conntrack_small(
    nat_lab: Lab, nat: NatDriver
) -> None:
    lab = nat_lab
    svc = replace(guarded(lab, Mode.NAT, 4), protocol=Protocol.TCP, syn_proxy=True)
    nat.sync(desired(svc))
    run = flood_with_clients(lab, ECHO, lambda: sum(nat.conntrack.count(4).values()))
    assert run.flood.sent == 200_000
    assert run.occupied < 1000, run.occupied  # the flood's SYNs never reached conntrack
    assert drops(nat, svc.name)["syn_proxy"] >= 200_000
    assert len(run.new) > 100 and len(run.failed) <= len(run.new) // 100, run.failed[:5]


def hold_then_try(host: str, port: int, hold: int) -> list[str]:
    """Open `hold` connections and keep them while one more is tried; each one's
    outcome ("ok" or the error's type), in order. Runs in a client namespace."""
    held: list[socket.socket] = []
    outcomes = []
    try:
        for _ in range(hold + 1):
            sock = socket.socket(socket.AF_INET)
            sock.settimeout(3.0)
            try:
                sock.connect((host, port))
                sock.recv(1)  # the server's greeting: the backend took the connection
                outcomes.append("ok")
                held.append(sock)
            except OSError as exc:
                outcomes.append(type(exc).__name__)
                sock.close()
    finally:
        for sock in held:
            sock.close()
    return outcomes


@pytest.mark.parametrize(
    ("limits", "backend_max", "reason"),
    [
        (Limits(client_max_flows=2), None, "client_max_flows"),
        (Limits(max_flows=2), None, "max_flows"),
        (Limits(), 2, "backend_full"),
    ],
)
def test_nat_concurrent_flow_limits_refuse_the_flow_over_them(
    nat_lab: Lab, nat: NatDriver, limits: Limits, backend_max: int | None, reason: str
) -> None:
    lab = nat_lab
    backend = Backend(ip_address(lab.backends[0].ipv4), max_connections=backend_max)
    svc = replace(
        service("lim", lab.vip4, [backend], port_set=ports(ECHO)),
        mode=Mode.NAT,
        limits=limits,
        clients=ClientRules(refuse=Refusal.REJECT),
    )
    nat.sync(desired(svc))
    c1, c2 = lab.clients
    refused = ["ok", "ok", "ConnectionRefusedError"]  # the third is over the limit: a reset
    assert lab.call(c1.ns, hold_then_try, lab.vip4, ECHO, 2) == refused
    if reason == "client_max_flows":  # another client has its own count
        assert lab.call(c2.ns, hold_then_try, lab.vip4, ECHO, 1) == ["ok", "ok"]
    assert drops(nat, svc.name) == {reason: 1}


@pytest.mark.parametrize("mode", [Mode.DSR, Mode.NAT])
def test_a_restarted_driver_adopts_the_guard_without_rewriting_its_sets(
    request: pytest.FixtureRequest, mode: Mode
) -> None:
    lab, driver = lab_and_driver(request, mode)
    c1, c2 = lab.clients
    rules = ClientRules(
        allow=(ip_network("198.18.1.0/24"), ip_network(c1.ipv4)),  # overlapping: merged
        deny=(ip_network(c2.ipv4),),
        refuse=Refusal.REJECT,
    )
    svc = guarded(lab, mode, 4, clients=rules, limits=Limits(client_new_flow_rate=1000))
    if mode is Mode.NAT:
        svc = replace(svc, syn_proxy=True)
    driver.sync(desired(svc))
    runner = NftRunner(lab.lb.ns)
    again: Driver = (
        DsrDriver([lab.lb.interface], runner)
        if mode is Mode.DSR
        else NatDriver(runner, NetlinkConntrack(lab.lb.ns))
    )
    again.sync(desired(svc))  # reads the table back over netlink and converges it
    # A periodic full resync finds what it wrote: the guard objects read back as rendered.
    assert again.sync(desired(svc), full=True).repairs == {}
    table = again.table  # type: ignore[attr-defined]
    held = runner.read(table)
    assert held is not None
    assert set(held.elements["allowed_edge4"]) == {("198.18.1.0/24",)}  # c1's /32 merged
    assert set(held.elements["denied_edge4"]) == {(c2.ipv4,)}
    assert errors(lab.call(c1.ns, tcp_requests, lab.vip4, ECHO, 3)) == []
    refused = lab.call(c2.ns, tcp_requests, lab.vip4, ECHO, 1)
    assert [e.split(":")[0] for e in errors(refused)] == ["ConnectionRefusedError"]


def test_dsr_a_full_flow_table_forwards_and_counts_what_it_cannot_record(
    dsr_lab: Lab, dsr: DsrDriver
) -> None:
    lab = dsr_lab
    svc = guarded(lab, Mode.DSR, 4)
    svc = replace(svc, protocol=Protocol.UDP, conntrack=replace(svc.conntrack, flow_table_size=4))
    dsr.sync(desired(svc))
    # Six datagrams from six ports: six new flows, room for four.
    assert errors(lab.call(lab.clients[0].ns, udp_requests, lab.vip4, ECHO, 6)) == []
    assert drops(dsr, svc.name) == {"flow_table_full": 2}
    assert len(dsr.flows(svc.name)) == 4
    assert new_flows(dsr, svc.name) == 6
