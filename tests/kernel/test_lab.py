"""The network-namespace lab: topology, echo servers, clients, life cycle."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from passlb.lab import Lab, LabCallError, LabError, LabSpec
from passlb.lab.client import (
    ping,
    tcp_requests,
    tcp_stream,
    tls_requests,
    udp_requests,
    udp_stream,
)

pytestmark = pytest.mark.kernel

MakeLab = Callable[..., Lab]

TCP, UDP, TLS, HTTP = 8080, 5353, 8443, 8081


def netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def ours(prefix: str) -> set[str]:
    return {ns for ns in netns_names() if ns.startswith(prefix + "-")}


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 30.0) -> bool:
    """Whether `pid` exits; the bound only keeps a hung test finite (a busy machine is slow)."""
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def link_info(lab: Lab, ns: str, interface: str) -> dict[str, object]:
    shown = lab.run(ns, ["ip", "-j", "-s", "link", "show", interface]).stdout
    info: dict[str, object] = json.loads(shown)[0]
    return info


def tx_packets(lab: Lab, ns: str, interface: str) -> int:
    stats = link_info(lab, ns, interface)["stats64"]
    assert isinstance(stats, dict)
    return int(stats["tx"]["packets"])


@pytest.fixture
def served(make_lab: MakeLab) -> Lab:
    """A router-gateway lab whose b1 runs every kind of echo server."""
    lab = make_lab(LabSpec(backends=3, clients=1))
    lab.start_servers(lab.backends[0], tcp=[TCP], udp=[UDP], tls=[TLS], http=[HTTP])
    return lab


def test_builds_quickly_with_prefixed_namespaces_and_planned_interfaces(
    make_lab: MakeLab,
) -> None:
    started = time.monotonic()
    lab = make_lab(LabSpec(backends=3))
    build_seconds = time.monotonic() - started

    assert build_seconds < 1.5
    expected = {f"{lab.prefix}-{n}" for n in ("sw", "c1", "rt", "lb", "b1", "b2", "b3")}
    assert ours(lab.prefix) == expected
    assert lab.lb.interface == "eth0"
    lb_eth0 = lab.run(lab.lb.ns, ["ip", "-j", "addr", "show", "eth0"]).stdout
    assert {a["local"] for a in json.loads(lb_eth0)[0]["addr_info"]} >= {
        "198.18.2.2",
        lab.lb.ipv6,
    }
    assert [b.ipv4 for b in lab.backends] == ["198.18.2.11", "198.18.2.12", "198.18.2.13"]
    for backend in lab.backends:
        assert link_info(lab, backend.ns, "eth0")["address"] == backend.mac
    # Nothing of the lab lives in the root namespace.
    root_links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    assert not {"front", "back"} & {link["ifname"] for link in json.loads(root_links.stdout)}


def test_switch_runs_no_firewall_on_bridged_frames(lab: Lab) -> None:
    # Only where br_netfilter is loaded do these exist; then the lab turns them off.
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if not os.path.exists(path):
        pytest.skip("br_netfilter is not loaded: bridged frames skip iptables anyway")
    got = lab.run(lab.topology.switch_ns, ["cat", path]).stdout.strip()
    assert got == "0"


def test_client_reaches_router_and_lb_over_both_families(lab: Lab) -> None:
    client = lab.clients[0].ns
    targets = [lab.router.ipv4, lab.router.ipv6, lab.lb.ipv4, lab.lb.ipv6]
    for target in targets:
        assert None not in lab.call(client, ping, target, 2, 1.0), target
    # An address nobody has stays unanswered, so the check above can fail.
    assert lab.call(client, ping, "198.18.2.99", 1, 0.3) == [None]


def test_direct_path_tcp_shows_the_client_as_peer(served: Lab) -> None:
    client, b1 = served.clients[0], served.backends[0]
    for host, client_address in ((b1.ipv4, client.ipv4), (b1.ipv6, client.ipv6)):
        replies = served.call(client.ns, tcp_requests, host, TCP, 3)
        assert [r.get("backend") for r in replies] == ["b1"] * 3, replies
        assert {r["proto"] for r in replies} == {"tcp"}
        assert {r["peer"][0] for r in replies} == {client_address}
        assert {tuple(r["local"]) for r in replies} == {(host, TCP)}
        assert len({r["peer"][1] for r in replies}) == 3  # a new source port each time


def test_direct_path_udp_answers_each_datagram(served: Lab) -> None:
    client, b1 = served.clients[0], served.backends[0]
    for host, client_address in ((b1.ipv4, client.ipv4), (b1.ipv6, client.ipv6)):
        replies = served.call(client.ns, udp_requests, host, UDP, 3)
        assert [r.get("echo") for r in replies] == ["seq=0", "seq=1", "seq=2"], replies
        assert {r["peer"][0] for r in replies} == {client_address}
        assert {tuple(r["local"]) for r in replies} == {(host, UDP)}


def test_closed_port_gives_error_entries(served: Lab) -> None:
    client, b2 = served.clients[0], served.backends[1]
    tcp = served.call(client.ns, tcp_requests, b2.ipv4, TCP, 2, 1.0)
    udp = served.call(client.ns, udp_requests, b2.ipv4, UDP, 1, 0.5)
    assert all("ConnectionRefused" in r["error"] for r in tcp), tcp
    assert "error" in udp[0]


def test_vip_routed_to_a_backend_is_the_local_address_and_udp_answers_from_it(
    make_lab: MakeLab,
) -> None:
    """A DSR path without the LB: the router sends the VIP prefix straight to
    b1, which holds the VIP on lo and answers the client directly."""
    lab = make_lab(LabSpec(backends=1))
    b1, client = lab.backends[0], lab.clients[0]
    lab.run(b1.ns, ["ip", "addr", "add", f"{lab.vip4}/32", "dev", "lo"])
    lab.run(b1.ns, ["ip", "addr", "add", f"{lab.vip6}/128", "dev", "lo"])
    lab.run(lab.router.ns, ["ip", "route", "replace", "198.18.0.0/24", "via", b1.ipv4])
    lab.run(lab.router.ns, ["ip", "route", "replace", "2001:2:0:ff00::/56", "via", b1.ipv6])
    lab.start_servers(b1, tcp=[443], udp=[53])

    for vip in (lab.vip4, lab.vip6):
        tcp = lab.call(client.ns, tcp_requests, vip, 443, 2)
        # The UDP client is connected to the VIP: a reply from b1's own
        # address would be dropped and show up as a timeout.
        udp = lab.call(client.ns, udp_requests, vip, 53, 2, 1.0)
        for reply in tcp + udp:
            assert reply.get("local") == [vip, reply.get("local", [None, None])[1]], reply
            assert reply["backend"] == "b1"


def test_tls_verifies_against_the_lab_ca(served: Lab) -> None:
    client, b1 = served.clients[0], served.backends[0]
    for name in ("b1.lab.test", "vip.lab.test"):
        replies = served.call(client.ns, tls_requests, b1.ipv4, TLS, 1, name, served.ca_file)
        assert replies[0].get("proto") == "tls", replies
        assert replies[0]["peer"][0] == client.ipv4
    wrong = served.call(client.ns, tls_requests, b1.ipv6, TLS, 1, "b2.lab.test", served.ca_file)
    assert "CERTIFICATE_VERIFY_FAILED" in wrong[0]["error"]


def test_http_health_names_the_backend_and_reads_the_weight_file(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(LabSpec(backends=1))
    weight_file = tmp_path / "weight"
    lab.start_servers(lab.backends[0], http=[HTTP], weight_file=weight_file)
    url = f"http://{lab.backends[0].ipv4}:{HTTP}"
    client = lab.clients[0].ns

    before = lab.run(client, ["curl", "-si", "--max-time", "2", f"{url}/health"]).stdout
    weight_file.write_text("37\n")
    after = lab.run(client, ["curl", "-si", "--max-time", "2", f"{url}/health"]).stdout
    missing = lab.run(client, ["curl", "-s", "-o/dev/null", "-w%{http_code}", f"{url}/nope"])

    assert before.startswith("HTTP/1.1 200")
    # text mode turned the CRLFs into "\n"
    assert json.loads(before.split("\n\n", 1)[1]) == {"backend": "b1", "status": "ok"}
    assert "weight" not in before.lower()
    assert "X-Load-Balancing-Endpoint-Weight: 37\n" in after
    assert missing.stdout == "404"


def test_lb_gateway_sends_backend_replies_through_the_lb(make_lab: MakeLab) -> None:
    lab = make_lab(LabSpec(backends=2, backend_gateway="lb"))
    b1, client = lab.backends[0], lab.clients[0]
    route = lab.run(b1.ns, ["ip", "route", "show", "default"]).stdout
    assert f"via {lab.lb.ipv4}" in route
    lab.start_servers(b1, tcp=[TCP])

    sent_before = tx_packets(lab, lab.lb.ns, "eth0")
    replies = lab.call(client.ns, tcp_requests, b1.ipv4, TCP, 10)
    forwarded = tx_packets(lab, lab.lb.ns, "eth0") - sent_before

    assert [r.get("peer", [None])[0] for r in replies] == [client.ipv4] * 10, replies
    # SYN-ACK, greeting and FIN of each connection went out through the LB.
    assert forwarded >= 30


def test_router_gateway_bypasses_the_lb(served: Lab) -> None:
    client, b1 = served.clients[0], served.backends[0]
    sent_before = tx_packets(served, served.lb.ns, "eth0")
    served.call(client.ns, tcp_requests, b1.ipv4, TCP, 10)
    assert tx_packets(served, served.lb.ns, "eth0") - sent_before < 5


def test_streams_stay_on_one_backend_without_loss(served: Lab) -> None:
    client, b1 = served.clients[0], served.backends[0]
    tcp = served.call(client.ns, tcp_stream, b1.ipv4, TCP, 0.3, 4096)
    udp = served.call(client.ns, udp_stream, b1.ipv6, UDP, 0.3, 0.01)

    assert tcp["backend"] == "b1" and tcp["errors"] == []
    assert tcp["received"] == tcp["sent"] > 0
    assert udp["sent"] >= 10 and udp["lost"] == [] and udp["errors"] == []
    assert udp["by_backend"] == {"b1": udp["sent"]}


def test_udp_stream_counts_losses(lab: Lab) -> None:
    """No server listens: every datagram is lost and reported so."""
    udp = lab.call(lab.clients[0].ns, udp_stream, lab.backends[0].ipv4, UDP, 0.1, 0.02, 0.2)
    assert udp["sent"] >= 3
    assert udp["lost"] == list(range(udp["sent"])) and udp["received"] == 0


def _address_seen_by_router(router_ip: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((router_ip, 9))
        return str(sock.getsockname()[0])


class Unpicklable(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def _raise_unpicklable() -> None:
    raise Unpicklable(7, "needs two arguments to rebuild")


def test_call_runs_inside_the_namespace_and_returns_values(lab: Lab) -> None:
    client = lab.clients[0]
    assert lab.call(client.ns, _address_seen_by_router, lab.router.ipv4) == client.ipv4
    # fn is not pickled (the child is a fork), so a lambda works too.
    names = lab.call(lab.lb.ns, lambda: sorted(n for _, n in socket.if_nameindex()))
    assert names == ["eth0", "lo"]


def test_call_reraises_the_child_exception_with_its_traceback(lab: Lab) -> None:
    def fail() -> None:
        raise ValueError("no such thing in here")

    with pytest.raises(ValueError, match="no such thing") as raised:
        lab.call(lab.clients[0].ns, fail)
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert lab.clients[0].ns in notes and 'raise ValueError("no such thing' in notes

    with pytest.raises(LabCallError, match="needs two arguments"):
        lab.call(lab.clients[0].ns, _raise_unpicklable)


def test_call_times_out_and_kills_the_child(lab: Lab) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        lab.call(lab.clients[0].ns, time.sleep, 20, timeout=0.3)
    assert time.monotonic() - started < 2


def test_teardown_on_error_leaves_no_namespace_and_no_process() -> None:
    with pytest.raises(RuntimeError, match="test body failed"), Lab(LabSpec(backends=1)) as lab:
        tracked = lab.spawn(lab.backends[0].ns, ["sleep", "30"])
        servers = lab.start_servers(lab.backends[0], tcp=[TCP])
        # A process that left the tracked process group: found by its namespace.
        lab.run(lab.clients[0].ns, ["sh", "-c", "setsid sleep 30 >/dev/null 2>&1 &"])
        escaped = _pids_of(lab.clients[0].ns)
        prefix = lab.prefix
        assert escaped and ours(prefix)
        raise RuntimeError("test body failed")

    assert ours(prefix) == set()
    for pid in (tracked.pid, servers.pid, *escaped):
        assert wait_gone(pid), pid
    assert not Path(f"/run/passlb-lab/{prefix}.pid").exists()


def _pids_of(ns: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in listed.stdout.split()]


ORPHAN_SCRIPT = """
import sys, time
from passlb.lab import Lab, LabSpec
lab = Lab(LabSpec(backends=1)).build()
sleeper = lab.spawn(lab.backends[0].ns, ["sleep", "30"])
print(lab.prefix, sleeper.pid, flush=True)
time.sleep(30)
"""


@pytest.fixture
def orphan_owner() -> Iterator[subprocess.Popen[str]]:
    """A separate process that builds a lab and then waits to be killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _read_owner_line(proc: subprocess.Popen[str]) -> tuple[str, int]:
    assert proc.stdout is not None
    prefix, sleeper = proc.stdout.readline().split()
    return prefix, int(sleeper)


def test_stale_lab_of_a_killed_run_is_removed_and_live_labs_are_kept(
    make_lab: MakeLab, orphan_owner: subprocess.Popen[str]
) -> None:
    live = make_lab(LabSpec(backends=1))
    stale_prefix, sleeper = _read_owner_line(orphan_owner)
    orphan_owner.kill()
    orphan_owner.wait()
    assert ours(stale_prefix), "SIGKILL leaves the lab behind"
    live_namespaces = ours(live.prefix)

    make_lab(LabSpec(backends=1))

    assert ours(stale_prefix) == set()
    assert wait_gone(sleeper)
    assert ours(live.prefix) == live_namespaces


def test_sigterm_of_the_owner_tears_its_lab_down(orphan_owner: subprocess.Popen[str]) -> None:
    prefix, sleeper = _read_owner_line(orphan_owner)
    assert ours(prefix)
    orphan_owner.send_signal(signal.SIGTERM)

    assert orphan_owner.wait(10) == -signal.SIGTERM
    assert ours(prefix) == set()
    assert wait_gone(sleeper)


def test_ipv4_only_lab(make_lab: MakeLab) -> None:
    lab = make_lab(LabSpec(backends=1, ipv6=False))
    b1 = lab.backends[0]
    lab.start_servers(b1, tcp=[TCP], udp=[UDP])
    assert lab.call(lab.clients[0].ns, tcp_requests, b1.ipv4, TCP, 1)[0]["backend"] == "b1"
    assert lab.call(lab.clients[0].ns, udp_requests, b1.ipv4, UDP, 1)[0]["backend"] == "b1"
    with pytest.raises(LabError, match="ipv6=False"):
        _ = b1.ipv6
    with pytest.raises(LabError, match="ipv6=False"):
        _ = lab.vip6


def test_lab_specs_and_nodes_pickle(lab: Lab) -> None:
    """Nodes cross into `lab.call` children and back."""
    assert pickle.loads(pickle.dumps(lab.backends)) == lab.backends
    assert os.path.exists(lab.ca_file)
