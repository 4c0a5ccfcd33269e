"""The control channel between the daemon and its relay worker processes.

One AF_UNIX stream socketpair per worker. A message is a header (body
length, descriptor count) carrying the descriptors (SCM_RIGHTS; at most 253
per sendmsg, further ones on one-byte markers), then the body: a pickle.
Pickle is acceptable here only because both ends are passlb: the peer is
our own child (or parent) on a socketpair nobody else holds. A stream rather
than SOCK_SEQPACKET: a desired state with 65537-slot rings is larger than
one datagram may be.

Every request gets exactly one reply, in order.
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

from passlb.dataplane.base import ApplyResult, Flow, ServiceCounters
from passlb.dataplane.proxy.driver import ListenerKey
from passlb.state import DesiredState

_HEADER: Final = struct.Struct("!QI")  # body length, descriptors attached
SCM_MAX_FD: Final = 253  # the kernel's limit of descriptors in one sendmsg


class ChannelClosed(ConnectionError):
    """The other end has gone (its process exited)."""


# -- requests (daemon -> worker) ----------------------------------------------


@dataclass(frozen=True)
class SyncRequest:
    desired: DesiredState
    full: bool
    keys: tuple[ListenerKey, ...]  # the listener sockets attached, in this order


@dataclass(frozen=True)
class ReadRequest:
    """Counters (with the drops by reason)."""


@dataclass(frozen=True)
class FlowsRequest:
    service: str | None
    backend: str | None


@dataclass(frozen=True)
class CloseRequest:
    """Reset every connection, close every socket, exit."""


Request = SyncRequest | ReadRequest | FlowsRequest | CloseRequest


# -- replies (worker -> daemon) -----------------------------------------------


@dataclass(frozen=True)
class SyncReply:
    listening: tuple[ListenerKey, ...]  # what the worker listens on now, failure or not
    result: ApplyResult | None = None
    error: str | None = None  # DataplaneError text: the worker's sync changed nothing


@dataclass(frozen=True)
class ReadReply:
    counters: dict[str, ServiceCounters] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowsReply:
    flows: list[Flow]


@dataclass(frozen=True)
class Closed:
    pass


Reply = SyncReply | ReadReply | FlowsReply | Closed


def send(sock: socket.socket, message: Request | Reply, fds: list[int] | None = None) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    fds = fds or []
    chunks = [fds[i : i + SCM_MAX_FD] for i in range(0, len(fds), SCM_MAX_FD)]
    header = _HEADER.pack(len(body), len(fds))
    if chunks:
        socket.send_fds(sock, [header], chunks[0])
        for chunk in chunks[1:]:  # one marker byte carries each further chunk
            socket.send_fds(sock, [b"\0"], chunk)
    else:
        sock.sendall(header)
    sock.sendall(body)


def receive(sock: socket.socket) -> tuple[Request | Reply, list[socket.socket]]:
    """One message and the sockets that came with it; ChannelClosed at EOF."""
    sockets: list[socket.socket] = []
    try:
        header, fds, flags, _ = socket.recv_fds(sock, _HEADER.size, SCM_MAX_FD)
        if not header:
            raise ChannelClosed("the other end closed the channel")
        sockets += _adopt(fds, flags)
        # A header is one write of a few bytes: a short read only when a peer died mid-way.
        header += _read_exactly(sock, _HEADER.size - len(header))
        length, fd_count = _HEADER.unpack(header)
        while len(sockets) < fd_count:
            marker, fds, flags, _ = socket.recv_fds(sock, 1, SCM_MAX_FD)
            if not marker:
                raise ChannelClosed("the other end closed the channel")
            sockets += _adopt(fds, flags)
        message = pickle.loads(_read_exactly(sock, length))
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return message, sockets


def _adopt(fds: list[int], flags: int) -> list[socket.socket]:
    sockets = [socket.socket(fileno=fd) for fd in fds]
    if flags & socket.MSG_CTRUNC:
        for s in sockets:
            s.close()
        raise ChannelClosed("descriptors lost in transit (control message truncated)")
    return sockets


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ChannelClosed("the other end closed the channel")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
