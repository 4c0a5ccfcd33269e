"""Echo servers for a lab backend.

    python -m passlb.lab.servers --name b1 --tcp 80,443 --udp 53 --tls 8443 \
        --cert b1.crt --key b1.key --http 8080 --weight-file /run/w

Each TCP or TLS connection and each UDP datagram is answered with one JSON line

    {"backend": "b1", "proto": "tcp", "peer": ["198.18.1.10", 40312], "local": ["198.18.0.10", 443]}

and TCP/TLS then echo whatever else arrives. `local` is the address the
client reached: with direct server return that is the VIP, not the backend's
own address. UDP replies are sent *from* that address too (IP_PKTINFO), as a
DSR client only accepts replies from the VIP it sent to. The UDP reply also
carries "echo": the datagram's text, so a client can match replies to requests.

HTTP ports answer `GET /health` with 200 and a JSON body naming the backend,
plus an X-Load-Balancing-Endpoint-Weight header holding the content of the
weight file when that file exists (read on every request).

Prints "ready" on stdout once every port listens; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

# Not exported by Python's socket module on 3.11 (linux/in.h).
IP_PKTINFO = 8
ANCILLARY_SPACE = socket.CMSG_SPACE(20)  # fits in_pktinfo (12) and in6_pktinfo (20)
HTTP_READ_TIMEOUT = 5.0
ECHO_PREVIEW = 512


def hello(
    name: str, proto: str, peer: Sequence[object], local: Sequence[object]
) -> dict[str, object]:
    return {"backend": name, "proto": proto, "peer": list(peer[:2]), "local": list(local[:2])}


def json_line(value: dict[str, object]) -> bytes:
    return json.dumps(value).encode() + b"\n"


async def greet_and_echo(
    name: str, proto: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    writer.write(json_line(hello(name, proto, peer, local)))
    try:
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass  # the client went away: nothing left to echo to
    finally:
        writer.close()
        # The peer may have dropped the connection already.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def health(
    name: str, weight_file: Path | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_READ_TIMEOUT)
        method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if method == "GET" and path == "/health":
            status, body = "200 OK", {"backend": name, "status": "ok"}
        else:
            status, body = "404 Not Found", {"backend": name, "error": f"no {method} {path}"}
        payload = json.dumps(body).encode()
        headers = [
            f"HTTP/1.1 {status}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
            "Connection: close",
        ]
        weight = _read_weight(weight_file)
        if weight is not None:
            headers.append(f"X-Load-Balancing-Endpoint-Weight: {weight}")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
    except (ConnectionError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        pass  # a broken or half request gets no answer, like from a real server
    finally:
        writer.close()
        # The peer may have dropped the connection already.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def _read_weight(weight_file: Path | None) -> str | None:
    if weight_file is None:
        return None
    try:
        return weight_file.read_text().strip() or None
    except FileNotFoundError:
        return None


class UdpResponder:
    """One UDP socket bound to the wildcard address that learns each datagram's
    destination address and replies from it."""

    def __init__(self, name: str, family: socket.AddressFamily, port: int) -> None:
        self.name = name
        self.family = family
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            self.sock.bind(("::", port))
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.sock.bind(("0.0.0.0", port))
        self.port = port

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self.on_readable)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def on_readable(self) -> None:
        while True:
            try:
                data, ancdata, _, peer = self.sock.recvmsg(65535, ANCILLARY_SPACE)
            except BlockingIOError:
                return
            local = self._destination(ancdata)
            reply = hello(self.name, "udp", peer, (local, self.port))
            reply["echo"] = data[:ECHO_PREVIEW].decode(errors="replace")
            try:
                self.sock.sendmsg([json_line(reply)], [self._source(local)], 0, peer)
            except OSError as exc:  # e.g. no route back: the client sees a loss
                print(f"udp reply to {peer} failed: {exc}", file=sys.stderr)

    def _destination(self, ancdata: list[tuple[int, int, bytes]]) -> str:
        for level, kind, data in ancdata:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
                return socket.inet_ntop(socket.AF_INET, data[8:12])
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                # struct in6_pktinfo { in6_addr addr; unsigned int ifindex; }
                return socket.inet_ntop(socket.AF_INET6, data[:16])
        raise RuntimeError("no packet info on a datagram although it was asked for")

    def _source(self, local: str) -> tuple[int, int, bytes]:
        if self.family == socket.AF_INET6:
            info = struct.pack("@16sI", socket.inet_pton(socket.AF_INET6, local), 0)
            return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info
        info = struct.pack("@i4s4s", 0, socket.inet_aton(local), bytes(4))
        return socket.IPPROTO_IP, IP_PKTINFO, info


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m passlb.lab.servers", description=__doc__)
    parser.add_argument("--name", required=True, help="backend name reported in every reply")
    for proto in ("tcp", "udp", "tls", "http"):
        parser.add_argument(f"--{proto}", type=_ports, default=[], help="comma-separated ports")
    parser.add_argument("--cert", help="PEM certificate chain for --tls")
    parser.add_argument("--key", help="PEM private key for --tls")
    parser.add_argument("--weight-file", type=Path, help="value of the weight header, if present")
    parser.add_argument("--ipv4-only", action="store_true", help="do not listen on ::")
    args = parser.parse_args(argv)
    if args.tls and not (args.cert and args.key):
        parser.error("--tls needs --cert and --key")
    return args


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    hosts = ["0.0.0.0"] if args.ipv4_only else ["0.0.0.0", "::"]
    families = [socket.AF_INET] if args.ipv4_only else [socket.AF_INET, socket.AF_INET6]

    tls_context = None
    if args.tls:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.cert, args.key)

    servers: list[asyncio.Server] = []
    for port in args.tcp:
        handler = functools.partial(greet_and_echo, args.name, "tcp")
        servers.append(await asyncio.start_server(handler, hosts, port))
    for port in args.tls:
        handler = functools.partial(greet_and_echo, args.name, "tls")
        servers.append(await asyncio.start_server(handler, hosts, port, ssl=tls_context))
    for port in args.http:
        handler = functools.partial(health, args.name, args.weight_file)
        servers.append(await asyncio.start_server(handler, hosts, port))
    responders = [UdpResponder(args.name, f, port) for port in args.udp for f in families]
    for responder in responders:
        responder.start(loop)

    print("ready", flush=True)
    await stop.wait()

    for responder in responders:
        responder.close(loop)
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
