"""`passlb cleanup` removes what the kernel drivers installed, and only that."""

from __future__ import annotations

import sys

import pytest

from passlb.lab import Lab

pytestmark = pytest.mark.kernel


def test_cleanup_removes_passlb_tables_only(lab: Lab) -> None:
    ns = lab.lb.ns
    for family, name in (("netdev", "passlb"), ("inet", "passlb_nat"), ("inet", "other")):
        lab.run(ns, ["nft", "add", "table", family, name])
    out = lab.run(ns, [sys.executable, "-m", "passlb.cli", "cleanup"]).stdout
    assert out.splitlines() == ["removed table netdev passlb", "removed table inet passlb_nat"]
    assert lab.run(ns, ["nft", "list", "tables"]).stdout.split() == ["table", "inet", "other"]
    again = lab.run(ns, [sys.executable, "-m", "passlb.cli", "cleanup"]).stdout
    assert again.strip() == "no passlb tables to remove"
