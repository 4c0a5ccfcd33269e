"""The dsr driver on the real kernel, in a lab: clients -- router -- LB + backends.

One lab serves the whole module (building it is the slow part); every test
gets its own driver and table, deleted afterwards. The driver runs in this
process and talks to the LB's namespace through NftRunner(netns=...).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

import pytest

from passlb.control.explain import explain_flow
from passlb.dataplane.backend_setup import apply_backend_setup
from passlb.dataplane.nft.dsr import DsrDriver
from passlb.dataplane.nft.runner import NftRunner
from passlb.dataplane.nft.testing import desired, ports, service
from passlb.lab import Lab, LabSpec
from passlb.lab.client import tcp_requests, tcp_stream, tls_requests, udp_requests, udp_stream
from passlb.model import AdminState, Backend, PortSet, Protocol, Service
from passlb.state import DesiredState

pytestmark = pytest.mark.kernel

ALL_PORTS_VIP = "198.18.0.20"
ECHO, TLS, MULTI_TCP, MULTI_UDP, STREAM = 80, 443, 8050, 53, 9000


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(LabSpec(backends=3, clients=1, backend_gateway="router")) as built:
        for b in built.backends:
            for vip in (built.vip4, built.vip6, ALL_PORTS_VIP):
                apply_backend_setup(vip, netns=b.ns)
            built.start_servers(
                b, tcp=[ECHO, MULTI_TCP, STREAM], udp=[ECHO, MULTI_UDP, STREAM], tls=[TLS]
            )
        yield built


@pytest.fixture
def driver(lab: Lab) -> Iterator[DsrDriver]:
    drv = DsrDriver([lab.lb.interface], NftRunner(lab.lb.ns))
    yield drv
    drv.close(cleanup=True)


def pool(lab: Lab, *names: str, weights: dict[str, int] | None = None) -> list[Backend]:
    chosen = [b for b in lab.backends if not names or b.name in names]
    return [Backend(ip_address(b.ipv4), weight=(weights or {}).get(b.name, 1)) for b in chosen]


def pool6(lab: Lab) -> list[Backend]:
    return [Backend(ip_address(b.ipv6)) for b in lab.backends]


def client(lab: Lab) -> str:
    return lab.clients[0].ns


def backends_of(replies: list[dict[str, Any]]) -> Counter[str]:
    errors = [r for r in replies if "error" in r]
    assert not errors, errors[:3]
    return Counter(r["backend"] for r in replies)


def test_passthrough_tcp_udp_ipv4_ipv6(lab: Lab, driver: DsrDriver) -> None:
    web4 = service("web4", lab.vip4, pool(lab), protocol=Protocol.TCP_UDP, port_set=ports(ECHO))
    web6 = service("web6", lab.vip6, pool6(lab), protocol=Protocol.TCP_UDP, port_set=ports(ECHO))
    driver.sync(desired(web4, web6))
    c = lab.clients[0]
    for vip, me, request in (
        (lab.vip4, c.ipv4, tcp_requests),
        (lab.vip4, c.ipv4, udp_requests),
        (lab.vip6, c.ipv6, tcp_requests),
        (lab.vip6, c.ipv6, udp_requests),
    ):
        replies = lab.call(c.ns, request, vip, ECHO, 30)
        assert len(backends_of(replies)) > 1, f"{request.__name__} to {vip}: one backend only"
        for r in replies:
            assert r["peer"][0] == me  # the backend sees the client itself
            assert r["local"] == [vip, ECHO]  # ... talking to the VIP
    counters = driver.counters()
    assert counters["web4"].total.new_flows == 60
    assert counters["web6"].total.new_flows == 60


def _lb_bytes(lab: Lab) -> tuple[int, int]:
    shown = lab.run(lab.lb.ns, ["ip", "-s", "-j", "link", "show", lab.lb.interface])
    stats = json.loads(shown.stdout)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def test_replies_return_directly_not_through_the_lb(lab: Lab, driver: DsrDriver) -> None:
    svc = service("stream", lab.vip4, pool(lab), protocol=Protocol.TCP, port_set=ports(STREAM))
    driver.sync(desired(svc))
    rx0, tx0 = _lb_bytes(lab)
    result = lab.call(client(lab), tcp_stream, lab.vip4, STREAM, 1.5)
    rx1, tx1 = _lb_bytes(lab)
    assert result["errors"] == [] and result["received"] > 1_000_000
    # The LB sees the client's bytes once (in, then out to the backend); had the
    # echoed bytes come back through it, both counters would roughly double.
    assert rx1 - rx0 < result["sent"] * 1.25
    assert tx1 - tx0 < result["sent"] * 1.25
    assert driver.counters()["stream"].total.bytes >= result["sent"]


def test_tls_verifies_the_backend_certificate_through_the_vip(lab: Lab, driver: DsrDriver) -> None:
    driver.sync(desired(service("tls", lab.vip4, pool(lab), port_set=ports(TLS))))
    shown = subprocess.run(
        ["ip", "netns", "exec", client(lab),
         "openssl", "s_client", "-connect", f"{lab.vip4}:{TLS}", "-servername", "vip.lab.test",
         "-CAfile", lab.ca_file, "-verify_return_error", "-verify_hostname", "vip.lab.test"],
        input="", capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in shown.stdout  # the handshake crossed the VIP
    replies = lab.call(client(lab), tls_requests, lab.vip4, TLS, 12, "vip.lab.test", lab.ca_file)
    assert len(backends_of(replies)) > 1
    assert all(r["proto"] == "tls" and r["peer"][0] == lab.clients[0].ipv4 for r in replies)


def test_distribution_follows_weights_and_explain_predicts_each_flow(
    lab: Lab, driver: DsrDriver
) -> None:
    weights = {"b1": 1, "b2": 2, "b3": 3}
    svc = service(
        "dist", lab.vip4, pool(lab, weights=weights), protocol=Protocol.UDP,
        port_set=ports(ECHO), ring_size=65537,
    )  # fmt: skip
    state = desired(svc)
    driver.sync(state)
    replies = lab.call(client(lab), udp_requests, lab.vip4, ECHO, 3000, timeout=120)
    seen = backends_of(replies)
    for name, weight in weights.items():
        share = seen[name] / 3000
        assert abs(share - weight / 6) <= 0.1 * weight / 6, (name, seen)
    by_address = {b.ipv4: b.name for b in lab.backends}
    for r in replies[::50]:
        why = explain_flow(state, r["peer"][0], r["peer"][1], lab.vip4, ECHO, "udp")
        assert why.backend is not None and by_address[str(why.backend.address)] == r["backend"]


def _streams(lab: Lab, seconds: float) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:
    """Start a TCP and a UDP stream to the STREAM port; returns a holder and a join."""
    results: dict[str, Any] = {}

    def run(kind: str, fn: Callable[..., dict[str, Any]]) -> None:
        results[kind] = lab.call(client(lab), fn, lab.vip4, STREAM, seconds, timeout=seconds + 30)

    threads = [
        threading.Thread(target=run, args=("tcp", tcp_stream)),
        threading.Thread(target=run, args=("udp", udp_stream)),
    ]
    for t in threads:
        t.start()

    def join() -> dict[str, Any]:
        for t in threads:
            t.join()
        return results

    return results, join


def _serving(driver: DsrDriver, service_name: str, count: int) -> set[str]:
    """Backends of the service's flows, once `count` flows are in the flow table."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        flows = driver.flows(service_name)
        if len(flows) >= count:
            return {f.backend for f in flows}
        time.sleep(0.05)
    raise AssertionError(f"{service_name}: fewer than {count} flows appeared")


def _stream_service(lab: Lab, backends: list[Backend]) -> Service:
    return service(
        "stream", lab.vip4, backends, protocol=Protocol.TCP_UDP, port_set=ports(STREAM),
        ring_size=1009,
    )  # fmt: skip


def test_streams_survive_twenty_pool_changes(lab: Lab, driver: DsrDriver) -> None:
    everyone = pool(lab)
    driver.sync(desired(_stream_service(lab, everyone)))
    _, join = _streams(lab, seconds=4.0)
    serving = _serving(driver, "stream", 2)
    others = [b for b in everyone if str(b.address) not in serving]
    spare = Backend(ip_address("198.18.2.99"))  # nobody there: only new flows would notice
    changes = 0
    while changes < 20:
        for step in range(4):
            movable = [replace(b, admin=AdminState.DRAIN) if step == 1 else b for b in others]
            if step == 2:
                movable = []  # removed
            if step == 3:
                movable = [*others, spare]
            kept = [b for b in everyone if str(b.address) in serving]
            driver.sync(desired(_stream_service(lab, kept + movable)))
            changes += 1
            time.sleep(0.1)
    results = join()
    assert results["tcp"]["errors"] == [] and results["tcp"]["rounds"] > 10
    assert results["udp"]["lost"] == [] and results["udp"]["errors"] == []
    assert len(results["udp"]["by_backend"]) == 1


def _sync_in_child(state: DesiredState, interface: str) -> int:
    """Runs in a forked child inside the LB namespace, which then exits without cleanup."""
    drv = DsrDriver([interface])
    return drv.sync(state).operations


def test_crash_and_adopt_keep_established_flows(lab: Lab, driver: DsrDriver) -> None:
    state = desired(_stream_service(lab, pool(lab)))
    lab.call(lab.lb.ns, _sync_in_child, state, lab.lb.interface)  # that process is gone
    _, join = _streams(lab, seconds=3.0)
    runner = NftRunner(lab.lb.ns)

    def flow_table() -> dict[tuple[str, ...], str | None]:
        return {
            e.key: e.value
            for transport in ("tcp", "udp")
            for e in runner.read_elements(driver.table, f"flows_stream_{transport}")
        }

    deadline = time.monotonic() + 5
    while len(before := flow_table()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(before) >= 2, before
    result = driver.sync(state)  # a new driver adopts the table
    assert result.full and result.operations < 100  # rules rewritten, ring and flows kept
    assert flow_table() == before  # same entries, same backend ids
    assert len(driver.flows("stream")) == len(before)
    results = join()
    assert results["tcp"]["errors"] == [] and results["udp"]["lost"] == []


def test_all_ports_and_multi_service_vip(lab: Lab, driver: DsrDriver) -> None:
    everything = service(
        "all", ALL_PORTS_VIP, pool(lab, "b2"), protocol=Protocol.TCP_UDP,
        port_set=PortSet(all_ports=True),
    )  # fmt: skip
    dns = service("dns", lab.vip4, pool(lab, "b3"), protocol=Protocol.UDP, port_set=ports(53))
    web = service("web", lab.vip4, pool(lab, "b1"), port_set=ports((8000, 8100)))
    driver.sync(desired(everything, dns, web))
    c = client(lab)
    assert backends_of(lab.call(c, tcp_requests, ALL_PORTS_VIP, STREAM, 5)) == {"b2": 5}
    assert backends_of(lab.call(c, udp_requests, ALL_PORTS_VIP, MULTI_UDP, 5)) == {"b2": 5}
    assert backends_of(lab.call(c, udp_requests, lab.vip4, MULTI_UDP, 5)) == {"b3": 5}
    assert backends_of(lab.call(c, tcp_requests, lab.vip4, MULTI_TCP, 5)) == {"b1": 5}
    missed = lab.call(c, tcp_requests, lab.vip4, ECHO, 1, 0.5)  # no service on port 80 now
    assert "error" in missed[0]


def test_full_flow_table_still_forwards_new_flows(lab: Lab, driver: DsrDriver) -> None:
    svc = service("tiny", lab.vip4, pool(lab), port_set=ports(ECHO), flow_table_size=4)
    driver.sync(desired(svc))
    replies = lab.call(client(lab), tcp_requests, lab.vip4, ECHO, 20)
    assert sum(backends_of(replies).values()) == 20
    assert len(driver.flows("tiny")) == 4
    assert driver.counters()["tiny"].dropped == 0


def test_drain_keeps_the_established_flow_and_cut_removes_it(lab: Lab, driver: DsrDriver) -> None:
    everyone = pool(lab)
    svc = service("stream", lab.vip4, everyone, port_set=ports(STREAM))
    driver.sync(desired(svc))
    results: dict[str, Any] = {}
    stream = threading.Thread(
        target=lambda: results.update(
            lab.call(client(lab), tcp_stream, lab.vip4, STREAM, 2.5, timeout=40)
        )
    )
    stream.start()
    (serving,) = _serving(driver, "stream", 1)

    def with_admin(admin: AdminState) -> Service:
        marked = [replace(b, admin=admin) if str(b.address) == serving else b for b in everyone]
        return replace(svc, backends=tuple(marked))

    driver.sync(desired(with_admin(AdminState.DRAIN)))
    name = next(b.name for b in lab.backends if b.ipv4 == serving)
    fresh = backends_of(lab.call(client(lab), tcp_requests, lab.vip4, STREAM, 30))
    assert name not in fresh
    stream.join()
    assert results["errors"] == [] and results["backend"] == name
    assert driver.counters()["stream"].backends[serving].active_flows >= 1
    driver.sync(desired(with_admin(AdminState.DISABLED)))
    assert driver.flows("stream", serving) == []
    assert driver.counters()["stream"].backends[serving].active_flows == 0


def test_golden_ruleset_loads_into_the_kernel(lab: Lab) -> None:
    from pathlib import Path

    golden = Path(__file__).parent.parent / "golden" / "dsr_multi_service.nft"
    runner = NftRunner(lab.lb.ns)
    runner.run_script(golden.read_text())
    try:
        listed = runner.list_json("list table netdev passlb_t")
        assert any("chain" in i and i["chain"]["name"] == "svc_web" for i in listed)
    finally:
        runner.run_script("delete table netdev passlb_t\n")


def test_backend_setup_is_idempotent_and_undoes(lab: Lab) -> None:
    ns = lab.backends[0].ns
    vip = "198.18.0.77"
    apply_backend_setup(vip, netns=ns)
    apply_backend_setup(vip, netns=ns)  # twice: still fine
    shown = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-j", "addr", "show", "dev", "lo"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert vip in shown.stdout
    apply_backend_setup(vip, undo=True, netns=ns)
    apply_backend_setup(vip, undo=True, netns=ns)
    shown = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-j", "addr", "show", "dev", "lo"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert vip not in shown.stdout
    for vip_ in (lab.vip4,):  # restore the module's setup (undo reset the sysctls)
        apply_backend_setup(vip_, netns=ns)
