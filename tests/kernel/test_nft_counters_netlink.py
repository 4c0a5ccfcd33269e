"""Counters read over nfnetlink match what nft itself lists (runner.read_counters)."""

from __future__ import annotations

import pytest

from passlb.dataplane.nft.objects import CounterValue, Table
from passlb.dataplane.nft.runner import NftRunner

from .conftest import MakeLab

pytestmark = pytest.mark.kernel


def _listed_by_nft(nft: NftRunner, table: Table) -> dict[str, CounterValue]:
    items = nft.list_json(f"list counters table {table.family} {table.name}")
    return {
        i["counter"]["name"]: CounterValue(i["counter"]["packets"], i["counter"]["bytes"])
        for i in items
        if "counter" in i
    }


@pytest.mark.parametrize("family", ["netdev", "inet", "ip6"])
def test_netlink_counters_equal_nft_listing(make_lab: MakeLab, family: str) -> None:
    lab = make_lab(backends=1, clients=1, ipv6=False)
    nft = NftRunner(lab.lb.ns)
    table = Table(family, "counted")
    # Enough counters that the dump spans several netlink messages and recv() calls.
    script = [f"add table {family} counted", f"add table {family} other"]
    script += [
        f"add counter {family} counted c{i} {{ packets {i * 7} bytes {i * 1_000_003} }}"
        for i in range(1500)
    ]
    script.append(f"add counter {family} other elsewhere {{ packets 9 bytes 9 }}")
    nft.run_script("\n".join(script))

    read = nft.read_counters(table)
    assert read == _listed_by_nft(nft, table)
    assert len(read) == 1500 and read["c1499"] == CounterValue(1499 * 7, 1499 * 1_000_003)
    assert "elsewhere" not in read  # filtered by table in the kernel
    assert nft.read_counters(Table(family, "absent")) == {}
