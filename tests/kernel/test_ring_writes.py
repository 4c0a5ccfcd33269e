"""Ring slots written as binary nfnetlink batches, and tables read back over nfnetlink.

Random sequences of ring changes (pools, weights, ring sizes; dsr and nat)
are synced to a real table; after every sync the kernel's rings, resolved
through its id maps, equal the desired rings slot for slot. A writer killed
with SIGKILL in the middle of its changes leaves one whole state behind (one
transaction per sync), which a new driver adopts without a flush.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from passlb.dataplane.nft.objects import Chain, Rule, Table
from passlb.dataplane.nft.ruleset import converge
from passlb.dataplane.nft.runner import NftRunner
from passlb.dataplane.nft.testing import desired, ports, service
from passlb.lab import Lab, LabSpec
from passlb.model import Mode, PortSet, Protocol, Service

from .ring_churn import desired_rings, kernel_rings, make_driver, states

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(LabSpec(backends=1, clients=1, ipv6=False)) as built:
        yield built


@pytest.mark.parametrize("mode", ["dsr", "nat"])
def test_random_ring_changes_read_back_equal_the_desired_rings(lab: Lab, mode: str) -> None:
    seed = random.randrange(1 << 30)
    driver = make_driver(mode, lab.lb.ns, f"rings_{mode}")
    runner = NftRunner(lab.lb.ns)
    try:
        for step, wanted in enumerate(states(seed, mode)):
            driver.sync(wanted, full=step % 5 == 4)
            rs = runner.read(driver.table)
            assert rs is not None
            assert kernel_rings(rs, driver.owner_maps) == desired_rings(wanted), (seed, step)
    finally:
        driver.close(cleanup=True)


def _flags(runner: NftRunner, family: str, table: str) -> list[str]:
    for item in runner.list_json(f"list tables {family}"):
        if "table" in item and item["table"]["name"] == table:
            return list(item["table"].get("flags", []))
    raise AssertionError(f"no table {table}")


@pytest.mark.parametrize("mode", ["dsr", "nat"])
def test_a_writer_killed_mid_change_leaves_one_whole_state_that_a_new_driver_adopts(
    lab: Lab, mode: str
) -> None:
    seed = random.randrange(1 << 30)
    table = f"churn_{mode}"
    wanted = states(seed, mode)
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.kernel.ring_churn", lab.lb.ns, table, mode, str(seed)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    runner = NftRunner(lab.lb.ns)
    adopter = make_driver(mode, lab.lb.ns, table)
    try:
        assert writer.stdout is not None
        for _ in range(random.randint(3, 8)):  # some whole syncs, then a kill within the next
            assert writer.stdout.readline(), "the writer died"
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        rs = runner.read(adopter.table)
        assert rs is not None
        left = kernel_rings(rs, adopter.owner_maps)
        assert left in [desired_rings(s) for s in wanted], seed  # one whole state, not a mix
        assert "dormant" not in _flags(runner, adopter.table.family, table)
        ids_before = {
            o: int(e.key[0])
            for name in adopter.owner_maps
            for e in rs.elements.get(name, {}).values()
            for o in [e.comment]
        }
        target = wanted[-1] if left != desired_rings(wanted[-1]) else wanted[0]
        result = adopter.sync(target)
        assert result.full
        after = runner.read(adopter.table)
        assert after is not None
        assert kernel_rings(after, adopter.owner_maps) == desired_rings(target), seed
        kept = {
            o: int(e.key[0])
            for name in adopter.owner_maps
            for e in after.elements.get(name, {}).values()
            for o in [e.comment]
        }
        # Adopted, not flushed: a backend in both states keeps the id it had.
        assert all(kept[o] == bid for o, bid in ids_before.items() if o in kept), seed
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        adopter.close(cleanup=True)


def _services(mode: str) -> list[Service]:
    """Every kind of element passlb writes: IPv4 and IPv6, single ports, ranges,
    all ports, TCP and UDP, mapped ports and snat (nat)."""
    v4 = ["198.18.2.11", "198.18.2.12", "198.18.2.13"]
    v6 = ["2001:2:0:2::11", "2001:2:0:2::12"]
    chosen = [
        service("one", "198.18.0.10", v4, protocol=Protocol.TCP_UDP, port_set=ports(443)),
        service("span", "198.18.0.10", v4[:2], port_set=ports(80, (1000, 2000))),
        service("six", "2001:2::10", v6, protocol=Protocol.UDP, port_set=ports(53)),
        service("all", "198.18.0.20", v4[1:], port_set=PortSet(all_ports=True)),
    ]
    if mode == "nat":
        chosen = [replace(s, mode=Mode.NAT) for s in chosen]
        chosen[0] = replace(chosen[0], target_port=8443, snat=True)
    return chosen


@pytest.mark.parametrize("mode", ["dsr", "nat"])
def test_a_table_read_over_netlink_is_what_the_driver_wrote(lab: Lab, mode: str) -> None:
    driver = make_driver(mode, lab.lb.ns, f"read_{mode}")
    runner = NftRunner(lab.lb.ns)
    try:
        wanted = desired(*_services(mode))
        driver.sync(wanted)
        rs = runner.read(driver.table)
        assert rs is not None
        # Every set, element, comment, ring slot and counter decoded as the driver
        # renders it: converging the read table to the rendered one writes nothing.
        # (Rules come back opaque, so their chains are flushed and rewritten.)
        tx = converge(rs, driver.render(wanted), rewrite_rules=False)
        drift = [
            op
            for op in tx.rest()
            if not isinstance(op.obj, Rule)
            and not (op.verb == "flush" and isinstance(op.obj, Chain))
        ]
        assert drift == [] and tx.ring_writes() == [], drift[:20]
        assert driver.sync(wanted, full=True).operations > 0  # rules rewritten, nothing else
        assert runner.read(driver.table) is not None
    finally:
        driver.close(cleanup=True)


def test_flow_entries_read_over_netlink_name_their_client_ports_and_backend(lab: Lab) -> None:
    driver = make_driver("dsr", lab.lb.ns, "read_flows")
    runner = NftRunner(lab.lb.ns)
    try:
        driver.sync(desired(*_services("dsr")[:1]))
        bid = driver.ids.ids[("one", "198.18.2.12")]
        runner.run_script(
            f"add element netdev read_flows flows_one_tcp {{ 198.18.1.7 . 40000 . 443 "
            f"timeout 300s : {bid}, 198.18.1.8 . 40001 . 443 timeout 300s : {bid} }}"
        )
        found = runner.read_elements(driver.table, "flows_one_tcp")
        assert sorted((e.key, e.value) for e in found) == [
            (("198.18.1.7", "40000", "443"), str(bid)),
            (("198.18.1.8", "40001", "443"), str(bid)),
        ]
        assert all(e.timeout == 300 and e.expires is not None and e.expires <= 300 for e in found)
        flows = driver.flows("one")
        assert {(str(f.src), f.src_port, f.backend) for f in flows} == {
            ("198.18.1.7", 40000, "198.18.2.12"),
            ("198.18.1.8", 40001, "198.18.2.12"),
        }
    finally:
        driver.close(cleanup=True)


def test_cidr_interval_sets_read_over_netlink_as_nft_lists_them(lab: Lab) -> None:
    runner = NftRunner(lab.lb.ns)
    table = Table("netdev", "read_cidrs")
    v4 = ["198.18.0.0/15", "198.20.5.7", "10.0.0.0/8", "192.0.2.128/25"]
    v6 = ["2001:2::/48", "2001:db8::1"]
    runner.run_script(
        f"add table netdev read_cidrs\n"
        f"add set netdev read_cidrs a4 {{ type ipv4_addr ; flags interval ; }}\n"
        f"add set netdev read_cidrs a6 {{ type ipv6_addr ; flags interval ; }}\n"
        f"add element netdev read_cidrs a4 {{ {', '.join(v4)} }}\n"
        f"add element netdev read_cidrs a6 {{ {', '.join(v6)} }}\n"
    )
    try:
        rs = runner.read(table)
        assert rs is not None
        assert sorted(k for (k,) in rs.elements["a4"]) == sorted(v4)
        assert sorted(k for (k,) in rs.elements["a6"]) == sorted(v6)
    finally:
        runner.run_script("delete table netdev read_cidrs\n")
