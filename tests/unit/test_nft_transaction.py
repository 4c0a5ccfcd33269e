"""Transaction rendering, error latching, converge, and the fake's kernel-like refusals."""

from __future__ import annotations

import pytest

from passlb.dataplane.nft.fake import FakeNft
from passlb.dataplane.nft.objects import Chain, Counter, Element, Rule, Set, Table
from passlb.dataplane.nft.ruleset import Ruleset, converge
from passlb.dataplane.nft.transaction import Transaction
from passlb.errors import DataplaneError

T = Table("netdev", "t")


def test_render_one_script_and_batches_elements() -> None:
    tx = Transaction(T)
    tx.add(T)
    tx.add(
        Chain("in", type="filter", hook="ingress", priority=-100, device="eth0", policy="accept")
    )
    tx.add(Set("m", "meta mark", "ip daddr", flags=("interval",), size=8, comment="x"))
    tx.add(Element("m", ("1",), "198.18.2.11"))
    tx.add(Element("m", ("2",), "198.18.2.12", comment="b2"))
    tx.delete(Element("m", ("3",), "198.18.2.13"))
    tx.add(Rule("in", "ip daddr 198.18.0.10 drop"))
    assert tx.render().splitlines() == [
        "add table netdev t",
        'add chain netdev t in { type filter hook ingress device "eth0" priority -100 ; '
        "policy accept ; }",
        "add map netdev t m { typeof meta mark : ip daddr ; flags interval ; size 8 ; "
        'comment "x" ; }',
        'add element netdev t m { 1 : 198.18.2.11, 2 comment "b2" : 198.18.2.12 }',
        "delete element netdev t m { 3 }",
        "add rule netdev t in ip daddr 198.18.0.10 drop",
    ]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda tx: tx.add(Chain("bad name")), "chain name"),
        (lambda tx: tx.add(Chain("c", hook="ingress")), "needs a type and a priority"),
        (lambda tx: tx.delete(Rule("c", "drop")), "rules can only be added"),
        (lambda tx: tx.add(Set("s", "ip daddr", timeout=5)), "timeout flag"),
        (lambda tx: tx.add(Element("s", ())), "empty key"),
    ],
)
def test_first_error_is_latched_and_raised_at_apply(build: object, message: str) -> None:
    tx = Transaction(T)
    build(tx)  # type: ignore[operator]
    tx.add(Chain("fine"))  # later valid operations do not clear the error
    fake = FakeNft()
    assert tx.error is not None and message in str(tx.error)
    with pytest.raises(DataplaneError, match=message):
        fake.apply(tx)
    assert fake.tables == {}


def _base() -> FakeNft:
    fake = FakeNft()
    tx = Transaction(T)
    tx.add(T)
    tx.add(Chain("c"))
    tx.add(Chain("d"))
    tx.add(Counter("k"))
    tx.add(Set("m", "mark", "counter", typeof=False))
    tx.add(Element("m", ("1",), '"k"'))
    tx.add(Set("v", "ip daddr", "verdict"))
    tx.add(Element("v", ("198.18.0.10",), "goto d"))
    tx.add(Set("f", "ip saddr", "meta mark", flags=("dynamic", "timeout"), size=1))
    tx.add(Rule("c", "counter name meta mark map @m"))
    fake.apply(tx)
    return fake


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (lambda tx: tx.delete(Set("nope", "ip daddr")), "No such file"),
        (lambda tx: tx.delete(Element("v", ("198.18.0.99",))), "No such file"),
        (lambda tx: tx.add(Element("missing", ("1",), "2")), "No such file"),
        (lambda tx: tx.add(Element("v", ("198.18.0.10",), "goto c")), "File exists"),
        (lambda tx: tx.add(Element("v", ("198.18.0.11",), "goto nochain")), "chain nochain"),
        (lambda tx: tx.delete(Set("m", "mark", "counter", typeof=False)), "used by a rule"),
        (lambda tx: tx.delete(Counter("k")), "is in a map"),
        (lambda tx: tx.delete(Chain("d")), "is referenced"),
        (lambda tx: tx.create(Chain("c")), "File exists"),
        (lambda tx: tx.add(Rule("c", "ip saddr @nope drop")), "set nope"),
        (lambda tx: tx.add(Element("f", ("198.18.1.1",), "1")), "full"),
    ],
)
def test_fake_refuses_like_the_kernel_and_keeps_old_state(op: object, message: str) -> None:
    fake = _base()
    before = fake.dump(T)
    tx = Transaction(T)
    tx.add(Element("f", ("198.18.1.9",), "1"))  # fills the size-1 flow set first
    op(tx)  # type: ignore[operator]
    with pytest.raises(DataplaneError, match=message):
        fake.apply(tx)
    assert fake.dump(T) == before  # all or nothing


def test_converge_writes_only_the_difference_and_never_touches_dynamic_sets() -> None:
    def want(addr: str, extra_chain: bool) -> Ruleset:
        rs = Ruleset(T)
        rs.add_set(Set("b", "meta mark", "ip daddr"), [Element("b", ("1",), addr)])
        rs.add_set(Set("f", "ip saddr", "meta mark", flags=("dynamic", "timeout"), size=4))
        rs.add_chain(Chain("c"), ["ip saddr @f drop"])
        if extra_chain:
            rs.add_chain(Chain("x"), ["accept"])
        return rs

    fake = FakeNft()
    first = want("198.18.2.11", True)
    fake.apply(converge(None, first))
    flows = Transaction(T)
    flows.add(Element("f", ("198.18.1.10",), "1"))  # as the packet path would
    fake.apply(flows)

    second = want("198.18.2.12", False)
    tx = converge(first, second)
    script = tx.render()
    assert "delete element netdev t b { 1 }" in script
    assert "add element netdev t b { 1 : 198.18.2.12 }" in script
    assert "delete chain netdev t x" in script
    assert "flush chain netdev t c" not in script  # its rules did not change
    assert " f" not in script.replace("@f", "")  # the flow table is left alone
    fake.apply(tx)
    assert list(fake.ruleset(T).elements["f"]) == [("198.18.1.10",)]

    # From a kernel read (rules opaque), every chain is rewritten, sets are kept.
    read = fake.read(T)
    assert read is not None and not read.rules_known
    again = converge(read, second).render()
    assert "flush chain netdev t c" in again and "add map" not in again
    fake.apply(converge(read, second))
    assert list(fake.ruleset(T).elements["f"]) == [("198.18.1.10",)]
