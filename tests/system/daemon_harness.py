"""`passlb run` as a real child process, and the loopback peers that talk to it.

Every test gets its own 127.x.y.0/24 block, so fixed ports never collide with
another test (or another engineer's suite running on the same machine).
Backends, streams of client flows and checks run on the test's own event loop;
the daemon is reached only as a user reaches it: its CLI, its admin API, its
log (JSON lines, so timestamps can be compared with the test's wall clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any, cast

from passlb.api.client import ApiClient, ApiError
from passlb.config import load_config
from passlb.control.desired import compute_desired
from passlb.control.reconciler import assume_all_healthy
from passlb.hashing.flowkey import L4PROTO, ring_slot

PORT = 8000  # the service port in every block: addresses, not ports, keep tests apart
READY_TIMEOUT = 20.0
LINE_TIMEOUT = 2.0

_blocks = itertools.count(1)
_second_octet = random.randrange(100, 250)


def address_block() -> str:
    """A fresh "127.A.B" prefix; hosts .1 (API), .10 (VIP), .11+ (backends) live in it."""
    n = next(_blocks)
    return f"127.{_second_octet + n // 250}.{n % 250}"


def passlb_command() -> list[str]:
    """The `passlb` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("passlb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "passlb.cli"]


# ------------------------------------------------------------------ backends


class EchoBackend:
    """A TCP backend: greets every connection with its name, then answers each
    line with its name again (so a long-lived connection can prove it is alive)."""

    def __init__(self, name: str, address: str, port: int = PORT) -> None:
        self.name = name
        self.address = address
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.address, self.port, reuse_address=True
        )

    async def kill(self) -> None:
        """Stop listening and reset every open connection, as a crashed server would."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        reply = self.name.encode() + b"\n"
        try:
            writer.write(reply)
            while await reader.readline():
                writer.write(reply)
                await writer.drain()
        except ConnectionError:
            pass  # the client (or the proxy) hung up first
        finally:
            self._writers.discard(writer)
            writer.close()


@dataclass
class HttpHealthEndpoint:
    """An HTTP(S) health endpoint: `status` and an optional reported weight, both changeable."""

    address: str
    port: int
    status: int = 200
    weight: int | None = None
    tls: ssl.SSLContext | None = None
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.address, self.port, ssl=self.tls, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LINE_TIMEOUT)
            headers = [f"HTTP/1.1 {self.status} X", "Content-Length: 2", "Connection: close"]
            if self.weight is not None:
                headers.append(f"X-Load-Balancing-Endpoint-Weight: {self.weight}")
            writer.write(("\r\n".join(headers) + "\r\n\r\nok").encode())
            await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a probe that hung up early gets nothing
        finally:
            writer.close()


class UdpEcho(asyncio.DatagramProtocol):
    """A DNS-like UDP backend: each request datagram gets `name:request` back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector transport does not subclass DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.name.encode() + b":" + data, addr)


async def start_udp_echo(name: str, address: str, port: int) -> asyncio.DatagramTransport:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: UdpEcho(name), local_addr=(address, port)
    )
    return transport


# ------------------------------------------------------------------ clients


@dataclass(frozen=True)
class FlowResult:
    started: float  # wall clock, comparable with the daemon's log timestamps
    src: str
    src_port: int
    backend: str | None  # the name the backend answered with
    error: str | None = None
    finished: float = 0.0  # wall clock when the answer (or the error) came


async def open_flow(vip: str, port: int = PORT) -> FlowResult:
    """One new TCP connection through the VIP: who answered, or why nobody did."""
    result = await _open_flow(vip, port)
    return replace(result, finished=time.time())


async def _open_flow(vip: str, port: int) -> FlowResult:
    started = time.time()
    # Bound before connecting: a flow reset during the handshake still has its port.
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    src, src_port = sock.getsockname()[:2]
    writer: asyncio.StreamWriter | None = None
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (vip, port)), LINE_TIMEOUT
        )
        reader, writer = await asyncio.open_connection(sock=sock)
        line = await asyncio.wait_for(reader.readline(), LINE_TIMEOUT)
        if not line:
            return FlowResult(started, src, src_port, None, "closed without an answer")
        return FlowResult(started, src, src_port, line.decode().strip())
    except (OSError, TimeoutError) as err:
        return FlowResult(started, src, src_port, None, type(err).__name__)
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()


async def open_flows(vip: str, count: int, port: int = PORT, parallel: int = 8) -> list[FlowResult]:
    """`count` new flows, at most `parallel` at a time."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> FlowResult:
        async with gate:
            return await open_flow(vip, port)

    return list(await asyncio.gather(*(one() for _ in range(count))))


class Stream:
    """A steady stream of new flows (one every `gap` seconds) until stopped."""

    def __init__(self, vip: str, port: int = PORT, gap: float = 0.01) -> None:
        self.vip = vip
        self.port = port
        self.gap = gap
        self.results: list[FlowResult] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Stream:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append(await open_flow(self.vip, self.port))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.gap)

    def errors(self) -> list[FlowResult]:
        return [r for r in self.results if r.error is not None]


class Connection:
    """A long-lived flow through the VIP: ask() proves it still reaches its backend."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: str):
        self.reader = reader
        self.writer = writer
        self.backend = backend

    @classmethod
    async def open(cls, vip: str, port: int = PORT) -> Connection:
        reader, writer = await asyncio.open_connection(vip, port)
        line = await asyncio.wait_for(reader.readline(), LINE_TIMEOUT)
        return cls(reader, writer, line.decode().strip())

    async def ask(self) -> str | None:
        """The backend's answer to one more line; None once the flow is cut."""
        try:
            self.writer.write(b"ping\n")
            await self.writer.drain()
            line = await asyncio.wait_for(self.reader.readline(), LINE_TIMEOUT)
        except (OSError, TimeoutError):
            return None
        return line.decode().strip() or None

    def close(self) -> None:
        self.writer.close()


def proxy_service(
    name: str,
    vip: str,
    backends: list[str],
    *,
    health: str = 'type = "tcp"',
    settings: str = "",
    protocol: str = "tcp",
) -> str:
    """A `[[services]]` table in proxy mode; `backends` are TOML bodies of
    `[[services.backends]]` (at least `address = ...`), `health` the check's body."""
    tables = "".join(f"\n[[services.backends]]\n{body}\n" for body in backends)
    return f"""
[[services]]
name = "{name}"
vip = "{vip}"
protocol = "{protocol}"
ports = [{PORT}]
mode = "proxy"
{settings}

[services.health]
{health}
{tables}"""


def where_ring_sends(config_path: Path, service: str, flow: FlowResult) -> str:
    """The backend key the ring (every backend healthy) gives a flow: the pure
    twin of the proxy's choice, from the daemon's own config file."""
    config = load_config(config_path)
    sd = compute_desired(config, assume_all_healthy(config), {}, 0.0).service(service)
    assert sd is not None and sd.ring is not None
    slot = ring_slot(
        sd.service.affinity,
        sd.seed,
        len(sd.ring),
        ip_address(flow.src),
        flow.src_port,
        sd.service.vip,
        PORT,
        L4PROTO["tcp"],
    )
    return sd.backends[sd.ring[slot]].key


# ------------------------------------------------------------------ the daemon


@dataclass
class Daemon:
    """One `passlb run CONFIG` child process with a JSON log."""

    workdir: Path
    api: str
    process: subprocess.Popen[bytes] | None = None
    config_path: Path = field(init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.workdir / "passlb.toml"
        self.log_path = self.workdir / "daemon.log"

    def write_config(self, services: str) -> None:
        """The whole file: the test's [api] and [log] tables, then its services."""
        self.config_path.write_text(
            f'[api]\nlisten = "{self.api}"\n\n[log]\nformat = "json"\n\n{services}'
        )

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*passlb_command(), "run", str(self.config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def wait_ready(self, *, checked: bool = True) -> dict[str, Any]:
        """Until the first apply succeeded and (when `checked`) every check has a verdict."""

        def ready(doc: dict[str, Any]) -> bool:
            last = doc["last_apply"]
            if last is None or last["error"] is not None:
                return False
            return not checked or all(
                b["health"] != "unknown" for s in doc["services"] for b in s["backends"]
            )

        return await self.wait_for(ready, READY_TIMEOUT, "daemon ready")

    async def status(self) -> dict[str, Any]:
        return await asyncio.to_thread(ApiClient(self.api, timeout=2.0).get, "/api/v1/status")

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """Poll the status document until `predicate` holds; fail with the log tail if not."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}):\n{self.tail()}")
            try:
                last = await self.status()
                if predicate(last):
                    return last
            except ApiError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status {last}\n{self.tail()}")

    def backend(self, doc: dict[str, Any], service: str, key: str) -> dict[str, Any]:
        svc = next(s for s in doc["services"] if s["name"] == service)
        found: dict[str, Any] = next(b for b in svc["backends"] if b["key"] == key)
        return found

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`passlb ARGS --api <ours>`, as an operator types it."""
        return await asyncio.to_thread(
            subprocess.run,
            [*passlb_command(), *args, "--api", self.api],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def log(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    async def wait_log(self, prefix: str, count: int, timeout: float) -> list[str]:
        """Until the log holds `count` messages starting with `prefix`; their texts."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e["msg"] for e in self.log() if e["msg"].startswith(prefix)]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"{len(found)} of {count} {prefix!r}\n{self.tail()}"
                return found
            await asyncio.sleep(0.05)

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(line[:400] for line in text)

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    async def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: never leaves the child behind."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


MakeDaemon = Callable[[str], Daemon]  # the make_daemon fixture (conftest.py)


def applies_changing(daemon: Daemon, backend_key: str) -> list[dict[str, Any]]:
    """The successful applies whose diff touched `backend_key` (log entries)."""
    return [
        e
        for e in daemon.log()
        if e["msg"].startswith("apply ok") and f"~{backend_key}" in e["msg"].replace(",", " ~")
    ]


def health_transitions(daemon: Daemon, service: str, backend_key: str) -> list[dict[str, Any]]:
    """The checker's up/down transitions of one backend (log entries, in order)."""
    prefix = f"health_transition service={service} backend={backend_key} "
    return [e for e in daemon.log() if e["msg"].startswith(prefix)]
