"""A packet tracer over a fake ruleset: what would nft do with this packet?

Interprets the rule vocabulary our renderers write (kube-proxy's tracer habit:
test behaviour, not text): header matches, concatenated lookups in maps and
verdict maps (intervals included), address literals, `jhash ... mod N seed S`
with the kernel twin, `update @set { key [timeout T] : value }` (which fails
on a full set), named and mapped counters, `fwd`, `goto`/`jump`,
`accept`/`drop`/`reject`, set membership (`ip saddr [!=] @set`, CIDR
intervals included), `limit rate over` (alone or per key in `update @set`)
and `tcp flags & (a | b) ==|!= a`.
A failed lookup ends the rule and the packet moves to the next one, as in the
kernel. Limits run in a time that never passes: each bucket starts full with
its burst and does not refill, so the packet after the burst is over the rate;
the caller keeps the buckets between packets (`trace(..., buckets=)`).
It mutates the ruleset it traces through: flow tables fill, counters count.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_network

from passlb.dataplane.nft.objects import CounterValue, Element
from passlb.dataplane.nft.ruleset import Ruleset
from passlb.hashing.flowkey import L4PROTO
from passlb.hashing.jhash import nft_jhash

_MAX_JUMPS = 16


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str  # "tcp" | "udp"
    sport: int
    dport: int
    iif: str = "eth0"
    length: int = 100
    tcp_flags: frozenset[str] = frozenset({"ack"})  # nft's names: "syn", "ack", "fin", ...

    @property
    def family(self) -> int:
        return ip_address(self.src).version


@dataclass
class Trace:
    verdict: str = "accept"  # "accept" | "drop" | "fwd" | "reject"
    reject_with: str | None = None  # "tcp reset", "icmpx admin-prohibited"
    fwd_to: str | None = None
    fwd_device: str | None = None
    mark: int = 0
    chains: list[str] = field(default_factory=list)


class TraceError(Exception):
    """The tracer met rule text outside its vocabulary."""


class _Break(Exception):
    """A failed lookup or a full set: the rule stops, the next one runs."""


class _Verdict(Exception):
    def __init__(self, verdict: str, target: str | None = None) -> None:
        self.verdict, self.target = verdict, target


# (rule text, per-key bucket key) -> packets the bucket let through so far
Buckets = dict[tuple[str, tuple[str, ...]], int]


def trace(rs: Ruleset, packet: Packet, base_chain: str, *, buckets: Buckets | None = None) -> Trace:
    """Run `packet` through `base_chain` (and the chains it reaches)."""
    result = Trace()
    _Tracer(rs, packet, result, {} if buckets is None else buckets).run_chain(base_chain, 0)
    return result


class _Tracer:
    def __init__(self, rs: Ruleset, packet: Packet, result: Trace, buckets: Buckets) -> None:
        self.rs, self.pkt, self.result, self.buckets = rs, packet, result, buckets

    def run_chain(self, name: str, depth: int) -> bool:
        """True when a terminal verdict was reached."""
        if depth > _MAX_JUMPS:
            raise TraceError("chain nesting too deep")
        self.result.chains.append(name)
        for rule in self.rs.rules[name]:
            try:
                _RuleRun(self, rule.rule).run()
            except _Break:
                continue
            except _Verdict as v:
                if v.verdict in ("goto", "jump") and v.target is not None:
                    if self.run_chain(v.target, depth + 1) or v.verdict == "goto":
                        return True
                    continue
                self.result.verdict = v.verdict
                if v.verdict == "reject":
                    self.result.reject_with = v.target
                return True
        return False

    # -- header fields ----------------------------------------------------------

    def field(self, name: str) -> tuple[str, bytes]:
        """(canonical text, bytes as nft's registers hold them) of a packet field."""
        p = self.pkt
        family = p.family
        if name in ("ip saddr", "ip6 saddr", "ip daddr", "ip6 daddr"):
            if (name.startswith("ip6")) != (family == 6):
                raise _Break
            addr = ip_address(p.src if name.endswith("saddr") else p.dst)
            return str(addr), addr.packed
        if name in ("th sport", "th dport"):
            port = p.sport if name == "th sport" else p.dport
            return str(port), port.to_bytes(2, "big") + b"\0\0"
        if name == "meta l4proto":
            return p.proto, bytes([L4PROTO[p.proto]]) + b"\0\0\0"
        if name == "meta protocol":
            return ("ip" if family == 4 else "ip6"), b""
        if name == "meta mark":
            return str(self.result.mark), self.result.mark.to_bytes(4, "big")
        if name == "iif":
            return p.iif, b""
        raise TraceError(f"unknown field {name!r}")


class _RuleRun:
    """Statements of one rule, read left to right from its tokens."""

    def __init__(self, tracer: _Tracer, text: str) -> None:
        self.t = tracer
        self.text = text
        self.tokens = text.split()
        self.i = 0

    def peek(self, offset: int = 0) -> str | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise TraceError(f"expected {expected!r} at {tok!r} in {' '.join(self.tokens)!r}")
        self.i += 1
        return tok

    def run(self) -> None:
        while self.peek() is not None:
            self.statement()

    # -- expressions ------------------------------------------------------------

    def concat(self) -> list[tuple[str, bytes]]:
        parts = [self.term()]
        while self.peek() == ".":
            self.take(".")
            parts.append(self.term())
        return parts

    def term(self) -> tuple[str, bytes]:
        tok = self.take()
        if tok == "jhash":
            fields = self.concat()
            self.take("mod")
            modulus = int(self.take(), 0)
            seed = 0
            if self.peek() == "seed":
                self.take("seed")
                seed = int(self.take(), 0)
            value = nft_jhash(b"".join(b for _, b in fields), modulus, seed)
            return str(value), value.to_bytes(4, "big")
        if tok in ("ip", "ip6", "th", "meta"):
            return self.t.field(f"{tok} {self.take()}")
        if tok == "iif":
            return self.t.field("iif")
        try:
            literal = ip_address(tok)  # `fwd ip to 198.18.2.11`
        except ValueError:
            raise TraceError(f"unknown expression {tok!r}") from None
        return str(literal), literal.packed

    def set_ref(self) -> str:
        tok = self.take()
        if not tok.startswith("@"):
            raise TraceError(f"expected @set, got {tok!r}")
        return tok[1:]

    def lookup(self, set_name: str, key: list[tuple[str, bytes]]) -> Element:
        texts = tuple(k for k, _ in key)
        ring = self.t.rs.rings.get(set_name)
        if ring is not None:
            slot = int(texts[0])
            if slot >= len(ring) or not ring[slot]:
                raise _Break
            return Element(set_name, texts, str(ring[slot]))
        elements = self.t.rs.elements[set_name]
        found = elements.get(texts)
        if found is None:
            found = next((e for e in elements.values() if _interval_match(e.key, texts)), None)
        if found is None:
            raise _Break
        return found

    # -- statements -------------------------------------------------------------

    def statement(self) -> None:
        tok = self.peek()
        if tok in ("accept", "drop"):
            raise _Verdict(self.take())
        if tok == "reject":
            self.take()
            if self.peek() == "with":
                self.take("with")
                kind = self.take()  # "tcp" (reset) or "icmp"/"icmpv6"/"icmpx" (type ...)
                if self.peek() == "type":
                    self.take("type")
                raise _Verdict("reject", f"{kind} {self.take()}")
            raise _Verdict("reject")
        if tok == "limit":
            self.limit(())
            return
        if tok == "tcp" and self.peek(1) == "flags":
            self.tcp_flags()
            return
        if tok in ("goto", "jump"):
            verdict = self.take()
            raise _Verdict(verdict, self.take())
        if tok == "counter":
            self.counter()
        elif tok == "update":
            self.update()
        elif tok == "fwd":
            self.fwd()
        elif tok == "meta" and self.peek(1) == "mark" and self.peek(2) == "set":
            self.i += 3
            key = self.concat()
            if self.peek() == "map":
                self.take("map")
                value = self.lookup(self.set_ref(), key).value
            else:
                value = key[0][0]
            self.t.result.mark = int(value or 0)
        else:
            self.match()

    def match(self) -> None:
        key = self.concat()
        negated = self.peek() == "!="
        if negated:
            self.take("!=")
        if (self.peek() or "").startswith("@"):
            try:
                self.lookup(self.set_ref(), key)
                member = True
            except _Break:
                member = False
            if member == negated:
                raise _Break
            return
        if self.peek() == "vmap":
            self.take("vmap")
            verdict = self.lookup(self.set_ref(), key).value or ""
            raise _Verdict(*verdict.split())
        if self.peek() == "{":
            self.take("{")
            wanted: set[str] = set()
            while self.peek() != "}":
                wanted.add(self.take().rstrip(","))
            self.take("}")
        else:
            wanted = {self.take()}
        if key[0][0] not in wanted:
            raise _Break

    def counter(self) -> None:
        self.take("counter")
        if self.peek() != "name":
            return  # an anonymous counter: nothing to look at
        self.take("name")
        if self.peek() == "meta":
            key = self.concat()
            self.take("map")
            name = (self.lookup(self.set_ref(), key).value or "").strip('"')
        else:
            name = self.take().strip('"')
        values = self.t.rs.counter_values
        if name not in self.t.rs.counters:
            raise _Break
        before = values.get(name, CounterValue())
        values[name] = CounterValue(before.packets + 1, before.bytes + self.t.pkt.length)

    def tcp_flags(self) -> None:
        """`tcp flags & (syn | ack) == syn`: the masked flags equal (or not) the value."""
        self.i += 2
        self.take("&")
        mask: set[str] = set()
        while not self.tokens[self.i - 1].endswith(")"):
            name = self.take().strip("()")
            if name != "|":
                mask.add(name)
        negated = self.take() == "!="
        wanted = set(self.take().split("|"))
        if self.t.pkt.proto != "tcp":
            raise _Break  # nft matches the transport first
        if (set(self.t.pkt.tcp_flags) & mask == wanted) == negated:
            raise _Break

    def limit(self, key: tuple[str, ...]) -> None:
        """`limit rate over R/second burst B packets`: over once B packets went through."""
        self.take("limit")
        self.take("rate")
        self.take("over")
        self.take()  # R/second: no time passes here
        self.take("burst")
        burst = int(self.take())
        self.take("packets")
        bucket = (self.text, key)
        passed = self.t.buckets.get(bucket, 0)
        if passed < burst:
            self.t.buckets[bucket] = passed + 1
            raise _Break  # under the rate: the rest of the rule does not apply

    def update(self) -> None:
        self.take("update")
        name = self.set_ref()
        self.take("{")
        key = self.concat()
        if self.peek() == "limit":
            self.limit(tuple(k for k, _ in key))
            self.take("}")
            return
        timeout = None
        if self.peek() == "timeout":
            self.take("timeout")
            timeout = float(self.take().rstrip("s"))
        self.take(":")
        value = self.concat()[0][0]
        self.take("}")
        s = self.t.rs.sets[name]
        elements = self.t.rs.elements[name]
        texts = tuple(k for k, _ in key)
        if texts in elements:
            elements[texts] = replace(elements[texts], expires=timeout)
            return
        if s.size is not None and len(elements) >= s.size:
            raise _Break  # the kernel's dynset fails on a full set: the rule ends here
        elements[texts] = Element(name, texts, value, timeout=timeout, expires=timeout)

    def fwd(self) -> None:
        self.take("fwd")
        self.take()  # "ip" | "ip6": the address family of the next hop
        self.take("to")
        key = self.concat()
        if self.peek() == "map":
            self.take("map")
            address = self.lookup(self.set_ref(), key).value
        else:
            address = key[0][0]
        self.take("device")
        device = self.concat()[0][0].strip('"')
        self.t.result.fwd_to, self.t.result.fwd_device = address, device
        raise _Verdict("fwd")


def _interval_match(element_key: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if len(element_key) != len(key):
        return False
    for want, have in zip(element_key, key, strict=True):
        if want == have:
            continue
        if "/" in want:
            try:
                if ip_address(have) in ip_network(want):
                    continue
            except ValueError:
                pass
            return False
        first, sep, last = want.partition("-")
        if not (sep and first.isdigit() and last.isdigit() and have.isdigit()):
            return False
        if not int(first) <= int(have) <= int(last):
            return False
    return True
