"""Conntrack entries as values, and the narrow interface the nat driver reads and cuts them by.

The nat driver never parses `conntrack -L`: `NetlinkConntrack` speaks ctnetlink
through pyroute2 (dumps filtered in the kernel by mark or by original
destination, deletes by original tuple). `FakeConntrack` keeps entries in
memory with the same interface for unit tests. `CtFilter` is the pure part:
which entries a cut or a count is about.

An entry's original direction is client -> VIP; after DNAT its reply direction
comes from the backend, so `reply_src`/`reply_sport` name the backend that
serves the flow. The nat driver stamps each flow it balances with a ct mark
holding the backend id, so a mark also names the (service, backend) pair.
"""

from __future__ import annotations

import concurrent.futures
import errno
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, Protocol, TypeVar

from passlb.errors import DataplaneError
from passlb.hashing.flowkey import L4PROTO
from passlb.model import IPAddress, PortSet

T = TypeVar("T")

_PROTO_NAME = {number: name for name, number in L4PROTO.items()}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True)
class CtEntry:
    proto: str  # "tcp" | "udp"
    src: IPAddress  # original direction: the client
    sport: int
    dst: IPAddress  # original direction: the VIP
    dport: int
    reply_src: IPAddress  # reply direction: the backend (after DNAT)
    reply_sport: int
    mark: int = 0
    timeout: float | None = None  # seconds until idle expiry
    state: str | None = None  # TCP state ("ESTABLISHED", ...), None for UDP

    @property
    def family(self) -> int:
        return self.src.version


@dataclass(frozen=True)
class CtFilter:
    """Which entries to read or cut; every field that is set must match."""

    family: int
    mark: int | None = None
    dst: IPAddress | None = None
    ports: PortSet | None = None  # original destination port
    protos: tuple[str, ...] = ("tcp", "udp")

    def matches(self, entry: CtEntry) -> bool:
        return (
            entry.family == self.family
            and entry.proto in self.protos
            and (self.mark is None or entry.mark == self.mark)
            and (self.dst is None or entry.dst == self.dst)
            and (self.ports is None or entry.dport in self.ports)
        )


class ConntrackTable(Protocol):
    """What the nat driver needs from conntrack: the netlink one and the fake offer it."""

    def entries(self, where: CtFilter) -> list[CtEntry]:
        """The TCP/UDP entries `where` selects."""
        ...

    def delete(self, entries: Iterable[CtEntry]) -> int:
        """Delete these entries; ones already gone are skipped. Returns how many went."""
        ...


class FakeConntrack:
    """Conntrack in memory, keyed by the original tuple as the kernel keys it."""

    def __init__(self, entries: Iterable[CtEntry] = ()) -> None:
        self.table: dict[tuple[object, ...], CtEntry] = {}
        self.deleted: list[CtEntry] = []
        for entry in entries:
            self.add(entry)

    def add(self, entry: CtEntry) -> None:
        self.table[_orig_key(entry)] = entry

    def entries(self, where: CtFilter) -> list[CtEntry]:
        return [e for e in self.table.values() if where.matches(e)]

    def delete(self, entries: Iterable[CtEntry]) -> int:
        gone = 0
        for entry in entries:
            found = self.table.pop(_orig_key(entry), None)
            if found is not None:
                self.deleted.append(found)
                gone += 1
        return gone


def _orig_key(entry: CtEntry) -> tuple[object, ...]:
    return (entry.proto, entry.src, entry.sport, entry.dst, entry.dport)


class NetlinkConntrack:
    """The kernel's conntrack table over ctnetlink (pyroute2), here or in the named netns."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def entries(self, where: CtFilter) -> list[CtEntry]:
        return _in_thread(lambda: self._entries(where))

    def delete(self, entries: Iterable[CtEntry]) -> int:
        batch = list(entries)
        return _in_thread(lambda: self._delete(batch))

    def _entries(self, where: CtFilter) -> list[CtEntry]:
        with self._socket(where.family) as ct:
            if where.mark is not None:
                # Filtered in the kernel by mark (any kernel); the rest below.
                raw: Iterable[Any] = ct.dump_entries(mark=where.mark)
            elif where.dst is not None and len(where.protos) == 1:
                raw = ct.dump_entries(tuple_orig=_tuple(where.family, where.dst, where.protos[0]))
            else:
                raw = ct.dump_entries()
            return [e for e in _decode_all(raw) if where.matches(e)]

    def _delete(self, entries: Iterable[CtEntry]) -> int:
        by_family: dict[int, list[CtEntry]] = {}
        for entry in entries:
            by_family.setdefault(entry.family, []).append(entry)
        gone = 0
        for family, batch in by_family.items():
            with self._socket(family) as ct:
                for entry in batch:
                    gone += _delete_one(ct, entry)
        return gone

    def _socket(self, family: int) -> _Socket:
        return _Socket(family, self.netns)


def _in_thread(work: Callable[[], T]) -> T:
    """Run netlink work in a short-lived thread: pyroute2 0.9 drives its sockets
    with an asyncio loop of its own, which refuses to run inside a running loop
    (the daemon's)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()


class _Socket:
    """One ctnetlink socket for one address family, closed on exit."""

    def __init__(self, family: int, netns: str | None) -> None:
        self.family, self.netns = family, netns
        self.ct: Any = None

    def __enter__(self) -> Any:
        from pyroute2 import Conntrack  # the netlink library loads only where it is used

        options: dict[str, Any] = {"nfgen_family": _AF[self.family]}
        if self.netns is not None:
            options["netns"] = self.netns
        try:
            self.ct = Conntrack(**options)
        except OSError as exc:
            raise DataplaneError(f"cannot open conntrack (ctnetlink): {exc}") from exc
        return self.ct

    def __exit__(self, *exc: object) -> None:
        self.ct.close()


def _tuple(family: int, dst: IPAddress | None, proto: str, **fields: Any) -> Any:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    return NFCTAttrTuple(
        family=_AF[family],
        daddr=str(dst) if dst is not None else None,
        proto=L4PROTO[proto],
        **fields,
    )


def _delete_one(ct: Any, entry: CtEntry) -> int:
    from pyroute2.netlink.exceptions import NetlinkError

    orig = _tuple(
        entry.family,
        entry.dst,
        entry.proto,
        saddr=str(entry.src),
        sport=entry.sport,
        dport=entry.dport,
    )
    try:
        ct.entry("del", tuple_orig=orig)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return 0  # ended (or was cut) meanwhile: what we wanted anyway
        raise DataplaneError(f"conntrack delete of {entry} failed: {exc}") from exc
    return 1


def _decode_all(raw: Iterable[Any]) -> Iterator[CtEntry]:
    for item in raw:
        proto = _PROTO_NAME.get(item.tuple_orig.proto)
        if proto is None:
            continue  # ICMP and friends: not a balanced flow
        protoinfo = item.protoinfo
        yield CtEntry(
            proto=proto,
            src=ip_address(item.tuple_orig.saddr),
            sport=int(item.tuple_orig.sport),
            dst=ip_address(item.tuple_orig.daddr),
            dport=int(item.tuple_orig.dport),
            reply_src=ip_address(item.tuple_reply.saddr),
            reply_sport=int(item.tuple_reply.sport),
            mark=int(item.mark or 0),
            timeout=float(item.timeout) if item.timeout is not None else None,
            state=protoinfo.state_name() if protoinfo is not None else None,
        )
