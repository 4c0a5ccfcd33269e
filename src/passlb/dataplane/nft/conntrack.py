"""Conntrack entries as values, and the narrow interface the nat driver reads and cuts them by.

The nat driver never parses `conntrack -L`: `NetlinkConntrack` speaks ctnetlink
(dumps over a plain netlink socket decoded by `ctnetlink`, filtered in the
kernel by family and mark; deletes by original tuple through pyroute2).
`FakeConntrack` keeps entries in memory with the same interface for unit
tests. `CtFilter` is the pure part: which entries a cut or a count is about.

An entry's original direction is client -> VIP; after DNAT its reply direction
comes from the backend, so `reply_src`/`reply_sport` name the backend that
serves the flow. The nat driver stamps each flow it balances with a ct mark
holding the backend id, so a mark also names the (service, backend) pair.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import itertools
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from passlb.dataplane.nft import ctnetlink
from passlb.dataplane.nft.ctnetlink import RawEntry
from passlb.dataplane.nft.netlink import in_netns
from passlb.dataplane.nft.nlmsg import NETLINK_NETFILTER, NetlinkError
from passlb.errors import DataplaneError
from passlb.hashing.flowkey import L4PROTO
from passlb.model import IPAddress, PortSet

T = TypeVar("T")

_PROTO_NAME = {number: name for name, number in L4PROTO.items()}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_TCP_LOOSE = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"


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

    def count(self, family: int) -> dict[tuple[int, IPAddress], int]:
        """TCP/UDP entries of one family by (mark, original destination)."""
        ...

    def require_handshakes(self) -> None:
        """Stop conntrack from picking up TCP flows it did not see start
        (nf_conntrack_tcp_loose = 0), which the SYN proxy needs."""
        ...


class FakeConntrack:
    """Conntrack in memory, keyed by the original tuple as the kernel keys it."""

    def __init__(self, entries: Iterable[CtEntry] = ()) -> None:
        self.table: dict[tuple[object, ...], CtEntry] = {}
        self.deleted: list[CtEntry] = []
        self.loose = True  # nf_conntrack_tcp_loose
        for entry in entries:
            self.add(entry)

    def add(self, entry: CtEntry) -> None:
        self.table[_orig_key(entry)] = entry

    def require_handshakes(self) -> None:
        self.loose = False

    def entries(self, where: CtFilter) -> list[CtEntry]:
        return [e for e in self.table.values() if where.matches(e)]

    def count(self, family: int) -> dict[tuple[int, IPAddress], int]:
        counts: dict[tuple[int, IPAddress], int] = {}
        for e in self.entries(CtFilter(family)):
            counts[(e.mark, e.dst)] = counts.get((e.mark, e.dst), 0) + 1
        return counts

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
    """The kernel's conntrack table over ctnetlink, here or in the named netns.

    Dumps go through a plain netlink socket decoded by `ctnetlink` (pyroute2
    costs ~0.4 ms of CPU per entry there); deletes through pyroute2.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._seq = itertools.count(1)

    def require_handshakes(self) -> None:
        def write() -> None:
            # /proc/sys/net belongs to the namespace of the thread that opens it.
            with open(_TCP_LOOSE, "w") as sysctl:
                sysctl.write("0\n")

        try:
            in_netns(self.netns, write)
        except OSError as e:
            raise DataplaneError(
                f"cannot set {_TCP_LOOSE} to 0 (the SYN proxy needs it): {e}"
            ) from e

    def entries(self, where: CtFilter) -> list[CtEntry]:
        raw: list[RawEntry] = []
        seq = next(self._seq)
        with _netlink_socket(self.netns) as sock, _dump_errors():
            for buffer in _answers(sock, _AF[where.family], seq, where.mark):
                got, done = ctnetlink.read_messages(buffer, seq)
                raw += got
                if done:
                    break
        return [e for e in _to_entries(raw) if where.matches(e)]

    def count(self, family: int) -> dict[tuple[int, IPAddress], int]:
        counts: collections.Counter[ctnetlink.FlowKey] = collections.Counter()
        seq = next(self._seq)
        with _netlink_socket(self.netns) as sock, _dump_errors():
            for buffer in _answers(sock, _AF[family], seq, None):
                got, done = ctnetlink.count_messages(buffer, seq)
                counts += got
                if done:
                    break
        found: dict[tuple[int, IPAddress], int] = {}
        for (mark, proto, dst), n in counts.items():
            if proto in _PROTO_NAME:
                key = (mark, ctnetlink.address(dst))
                found[key] = found.get(key, 0) + n
        return found

    def delete(self, entries: Iterable[CtEntry]) -> int:
        batch = list(entries)
        return _in_thread(lambda: self._delete(batch))

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
    from pyroute2.netlink.exceptions import NetlinkError as Pyroute2Error

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
    except Pyroute2Error as exc:
        if exc.code == errno.ENOENT:
            return 0  # ended (or was cut) meanwhile: what we wanted anyway
        raise DataplaneError(f"conntrack delete of {entry} failed: {exc}") from exc
    return 1


# -- dumps over a plain netlink socket ----------------------------------------------

DUMP_TIMEOUT = 10.0  # seconds without an answer before a dump is given up
_RECV_BUFFER = 1 << 16  # a dump answer comes in netlink skbs of at most a few pages


@contextlib.contextmanager
def _netlink_socket(netns: str | None) -> Iterator[socket.socket]:
    """A NETLINK_NETFILTER socket, opened in `netns` when named: a socket stays in
    the namespace it was created in, so a short-lived thread that joined the
    namespace creates it and the rest of the process stays where it is."""
    try:
        sock = in_netns(netns, _new_socket)
    except OSError as exc:
        raise DataplaneError(f"cannot open conntrack (ctnetlink): {exc}") from exc
    try:
        yield sock
    finally:
        sock.close()


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.settimeout(DUMP_TIMEOUT)
    return sock


def _answers(sock: socket.socket, family: int, seq: int, mark: int | None) -> Iterator[bytes]:
    """Send a dump request; yield the buffers of its answer until the caller has seen
    the end (`ctnetlink.read_messages`/`count_messages` say when)."""
    sock.send(ctnetlink.dump_request(family, seq, mark))
    while True:
        yield sock.recv(_RECV_BUFFER)


@contextlib.contextmanager
def _dump_errors() -> Iterator[None]:
    try:
        yield
    except (OSError, NetlinkError) as exc:
        raise DataplaneError(f"conntrack dump failed: {exc}") from exc


def _to_entries(raw: Iterable[RawEntry]) -> Iterator[CtEntry]:
    for item in raw:
        proto = _PROTO_NAME.get(item.orig.proto)
        if proto is None:
            continue  # ICMP and friends: not a balanced flow
        yield CtEntry(
            proto=proto,
            src=item.orig.src,
            sport=item.orig.sport,
            dst=item.orig.dst,
            dport=item.orig.dport,
            reply_src=item.reply.src,
            reply_sport=item.reply.sport,
            mark=item.mark,
            timeout=float(item.timeout) if item.timeout is not None else None,
            state=item.tcp_state,
        )
