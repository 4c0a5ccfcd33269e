"""Splice vs. transport relay: bulk TCP through one relay on loopback (issue 7, zero-copy).

A sender pushes TOTAL bytes over one connection through a relay process to a
receiver that discards them. The relay is one of:

- protocol-asyncio / protocol-uvloop: an asyncio Protocol pair like the proxy's
  relay before it owned its sockets (data_received -> other transport's write,
  pause/resume reading on the write buffer's 256 KiB high water, EOF passed
  on as write_eof);
- splice-64k / splice-1m: os.splice socket -> pipe -> socket, non-blocking,
  driven by the uvloop loop's add_reader/add_writer, with the default 64 KiB
  pipe or a 1 MiB one: the bare technique;
- proxy: the real ProxyDriver (one service, one backend) on uvloop; the flow
  is bulk, so its relay switches to splice with 1 MiB pipes;
- proxy-no-splice: the same driver when no pipe can be made (the pipe
  factory refuses, as at EMFILE or fs.pipe-user-pages-soft): recv/send.

Each relay runs in its own process; its CPU time (user + system, from
/proc/<pid>/stat) is read just before the sender starts and once the
receiver has seen EOF. Cells are medians of RUNS runs. Writes its section of
docs/benchmarks.md.

Run: .venv/bin/python bench/bench_splice.py  (about a minute; not part of the tests)
Linux only; loopback only.

--conn-rate measures the other end instead: short connections. wrk (2 threads,
64 connections, `Connection: close`) -> the proxy driver in its own process
(uvloop) -> NGINX (1 worker, a 3-byte answer), each run CONN_SECONDS after a
1 s warm-up; reports new connections/s and the relay's CPU (user + system)
per connection, median of RUNS runs. `--baseline SRC` interleaves runs of the
driver from another source tree (a `src` directory of an older checkout), for
A/B comparisons on a VM whose speed drifts between runs. Needs wrk and nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import errno
import fcntl
import importlib.metadata
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import uvloop
from docs_section import DOC, write_section

from passlb.dataplane.proxy import ProxyDriver, tcp
from passlb.dataplane.proxy.testing import desired, proxy_service

GIB = 1024**3
TOTAL = 2 * GIB
CHUNK = 1024 * 1024  # sender's write and receiver's read size
RUNS = 3
LOCALHOST = "127.0.0.1"
MODES = (
    "protocol-asyncio",
    "protocol-uvloop",
    "splice-64k",
    "splice-1m",
    "proxy",
    "proxy-no-splice",
)
TICKS = os.sysconf("SC_CLK_TCK")
CONN_SECONDS = 3
WRK = ["wrk", "-t2", "-c64", "-H", "Connection: close"]
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
WRITE_HIGH_WATER = 256 * 1024  # the transport relay's buffer limits
WRITE_LOW_WATER = 64 * 1024


# ------------------------------------------------------------------ relays (child process)


class _ProtocolSide(asyncio.Protocol):
    """One socket of the minimal transport relay: bytes go to `peer`, pressure pauses it."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.peer: _ProtocolSide | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def protocol_relay(client: socket.socket, backend: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    front, back = _ProtocolSide(done), _ProtocolSide(done)
    front.peer, back.peer = back, front
    await loop.connect_accepted_socket(lambda: back, backend)
    await loop.connect_accepted_socket(lambda: front, client)
    await done


class _SpliceDirection:
    """src -> pipe -> dst by splice; src is not read while dst refuses the pipe's bytes."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, pipe_size: int, done: asyncio.Future[None]
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.src, self.dst, self.done = src, dst, done
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, pipe_size)
        self.pipe_size = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
        self.in_pipe = 0
        self.loop.add_reader(src.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            n = os.splice(
                self.src.fileno(), self.pipe_w, self.pipe_size - self.in_pipe, flags=SPLICE_FLAGS
            )
        except BlockingIOError:
            return
        if n == 0:  # EOF: pass it on once the pipe is empty (it is: see _flush)
            self.loop.remove_reader(self.src.fileno())
            self.dst.shutdown(socket.SHUT_WR)
            self._close()
            return
        self.in_pipe += n
        self._flush()

    def _flush(self) -> None:
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(
                    self.pipe_r, self.dst.fileno(), self.in_pipe, flags=SPLICE_FLAGS
                )
            except BlockingIOError:
                # dst is full: stop reading src until it drains (back-pressure).
                self.loop.remove_reader(self.src.fileno())
                self.loop.add_writer(self.dst.fileno(), self._on_writable)
                return

    def _on_writable(self) -> None:
        self._flush()
        if not self.in_pipe:
            self.loop.remove_writer(self.dst.fileno())
            self.loop.add_reader(self.src.fileno(), self._on_readable)

    def _close(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)
        if not self.done.done():
            self.done.set_result(None)


async def splice_relay(client: socket.socket, backend: socket.socket, pipe_size: int) -> None:
    """Both directions, as the proxy would need (a pipe each); only client -> backend has data."""
    loop = asyncio.get_running_loop()
    upstream: asyncio.Future[None] = loop.create_future()
    downstream: asyncio.Future[None] = loop.create_future()
    _SpliceDirection(client, backend, pipe_size, upstream)
    _SpliceDirection(backend, client, pipe_size, downstream)
    await asyncio.gather(upstream, downstream)


async def serve_one(mode: str, listen_port: int, backend_port: int) -> None:
    listener = socket.create_server((LOCALHOST, listen_port))
    print("ready", flush=True)
    client, _ = await asyncio.get_running_loop().sock_accept(listener)
    backend = socket.create_connection((LOCALHOST, backend_port))
    for s in (client, backend):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode.startswith("protocol"):
        await protocol_relay(client, backend)
    else:
        await splice_relay(client, backend, 64 * 1024 if mode == "splice-64k" else 1024 * 1024)
    await asyncio.sleep(3600)  # the parent reads our CPU time, then ends us


def refuse_pipes() -> tuple[int, int]:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


async def serve_proxy(listen_port: int, backend_port: int) -> None:
    driver = ProxyDriver()
    driver.sync(desired(proxy_service("bench", listen_port, [(LOCALHOST, backend_port)])))
    print("ready", flush=True)
    await asyncio.sleep(3600)


def relay_main(mode: str, listen_port: int, backend_port: int) -> None:
    if mode.startswith("proxy"):
        if mode == "proxy-no-splice":
            tcp.open_pipe = refuse_pipes  # what the relay sees when no pipe can be had
        uvloop.run(serve_proxy(listen_port, backend_port))
    elif mode == "protocol-asyncio":
        asyncio.run(serve_one(mode, listen_port, backend_port))
    else:
        uvloop.run(serve_one(mode, listen_port, backend_port))


# ------------------------------------------------------------------ harness (parent process)


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu_seconds: float

    @property
    def gbit_per_s(self) -> float:
        return TOTAL * 8 / self.seconds / 1e9

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu_seconds / (TOTAL / GIB)


def cpu_seconds(pid: int) -> float:
    return sum(user_system_seconds(pid))


def user_system_seconds(pid: int) -> tuple[float, float]:
    # Fields after the ")" that closes comm: utime and stime are the 12th and 13th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


def receive_all(listener: socket.socket, received: list[int]) -> None:
    conn, _ = listener.accept()
    buf = bytearray(CHUNK)
    total = 0
    with conn:
        while n := conn.recv_into(buf):
            total += n
    received.append(total)


def send_all(port: int) -> None:
    payload = memoryview(b"x" * CHUNK)
    with socket.create_connection((LOCALHOST, port)) as s:
        for _ in range(TOTAL // CHUNK):
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the relay's EOF, so we do not reset it


def run_once(mode: str) -> Run:
    receiver = socket.create_server((LOCALHOST, 0))
    listen_port, backend_port = free_port(), receiver.getsockname()[1]
    relay = subprocess.Popen(
        [sys.executable, __file__, "--relay", mode, str(listen_port), str(backend_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        received: list[int] = []
        receiving = threading.Thread(target=receive_all, args=(receiver, received))
        receiving.start()
        cpu_before = cpu_seconds(relay.pid)
        started = time.perf_counter()
        send_all(listen_port)
        receiving.join()
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(relay.pid) - cpu_before
        if received != [TOTAL]:
            raise RuntimeError(f"{mode}: receiver got {received}, not {TOTAL}")
        return Run(elapsed, cpu)
    finally:
        relay.kill()
        relay.wait()
        receiver.close()


def median_of(runs: list[Run], metric: Callable[[Run], float]) -> float:
    return statistics.median(metric(r) for r in runs)


def verdict(results: dict[str, list[Run]]) -> str:
    """The driver's own splice path against its recv/send fallback, and the bare techniques."""

    def cpu(mode: str) -> float:
        return median_of(results[mode], lambda r: r.cpu_per_gib)

    def gbps(mode: str) -> float:
        return median_of(results[mode], lambda r: r.gbit_per_s)

    cpu_saved = 1 - cpu("proxy") / cpu("proxy-no-splice")
    bare_saved = 1 - cpu("splice-1m") / cpu("protocol-uvloop")
    wins = cpu_saved > 0.2 or gbps("proxy") / gbps("proxy-no-splice") > 1.2
    return (
        f"The driver with splice (proxy) vs. the same driver on recv/send (proxy-no-splice): "
        f"{cpu_saved:.0%} less relay CPU per GiB, throughput "
        f"{gbps('proxy') / gbps('proxy-no-splice') - 1:+.0%}; the bare splice-1m relay vs. the "
        f"transport relay: {bare_saved:.0%} less (throughput is bound by the sender and receiver "
        f"sharing the {os.cpu_count()} vCPUs, so CPU per GiB is the figure that tells). "
        "Bar (> 20 % less CPU per GiB or more throughput): "
        + ("**met**" if wins else "**not met**")
        + ". Caveats: one bulk stream on loopback; a bulk flow's relay holds 2 pipes (4 more "
        "descriptors) made lazily on its first full 256 KiB read, so short flows pay nothing; "
        "a 1 MiB pipe may pin up to 1 MiB of kernel memory per direction while full. "
        'Design: src/passlb/dataplane/proxy/README.md, "Zero-copy".'
    )


def section(results: dict[str, list[Run]]) -> str:
    rows = []
    for mode, runs in results.items():
        gbps = ", ".join(f"{r.gbit_per_s:.1f}" for r in runs)
        rows.append(
            f"| {mode} | {median_of(runs, lambda r: r.gbit_per_s):.1f} ({gbps}) "
            f"| {median_of(runs, lambda r: r.cpu_per_gib):.2f} |"
        )
    return "\n".join(
        [
            "## Proxy relay: splice vs. transports (issue 7, zero-copy)",
            "",
            f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} vCPU, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"uvloop {importlib.metadata.version('uvloop')}, by `bench/bench_splice.py`: "
            f"{TOTAL // GIB} GiB over one "
            "loopback TCP connection, sender -> relay process -> receiver that discards; "
            f"median of {RUNS} runs (the runs' Gbit/s in parentheses). CPU is the relay "
            "process's user + system time.",
            "",
            "| relay | Gbit/s | relay CPU s per GiB |",
            "|---|---:|---:|",
            *rows,
            "",
            verdict(results),
            "",
        ]
    )


# ------------------------------------------------------------------ --conn-rate


@dataclass(frozen=True)
class ConnRun:
    connections: int
    seconds: float
    user: float
    system: float

    @property
    def per_second(self) -> float:
        return self.connections / self.seconds

    @property
    def cpu_us(self) -> float:
        return (self.user + self.system) / self.connections * 1e6

    @property
    def user_us(self) -> float:
        return self.user / self.connections * 1e6


def start_nginx(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(
        f"worker_processes 1; daemon off; pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; server {{ listen {LOCALHOST}:{port} backlog=1024; "
        'location / { return 200 "ok\\n"; } } }\n'
    )
    nginx = subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(config)])
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection((LOCALHOST, port), timeout=1).close()
            return nginx, port
        except OSError:
            if time.monotonic() > deadline or nginx.poll() is not None:
                nginx.kill()
                raise RuntimeError(f"nginx did not start: see {workdir}/error.log") from None
            time.sleep(0.05)


def wrk(port: int, seconds: int) -> int:
    """Completed requests (= connections, one request each)."""
    argv = [*WRK, f"-d{seconds}s", f"http://{LOCALHOST}:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors through the relay:\n{out}")
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise RuntimeError(f"no request count in wrk's output:\n{out}")
    return int(found.group(1))


def conn_rate_once(backend_port: int, src: str | None) -> ConnRun:
    listen_port = free_port()
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    relay = subprocess.Popen(
        [sys.executable, __file__, "--relay", "proxy", str(listen_port), str(backend_port)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        wrk(listen_port, 1)  # warm-up: parsed client addresses cached, allocator grown
        user_before, system_before = user_system_seconds(relay.pid)
        started = time.perf_counter()
        connections = wrk(listen_port, CONN_SECONDS)
        elapsed = time.perf_counter() - started
        user_after, system_after = user_system_seconds(relay.pid)
        return ConnRun(connections, elapsed, user_after - user_before, system_after - system_before)
    finally:
        relay.kill()
        relay.wait()


def conn_rate_section(results: dict[str, list[ConnRun]]) -> str:
    rows = []
    for name, runs in results.items():
        cpu = [r.cpu_us for r in runs]
        rows.append(
            f"| {name} | {statistics.median(r.per_second for r in runs):,.0f} "
            f"| {statistics.median(cpu):.0f} ({min(cpu):.0f}-{max(cpu):.0f}) "
            f"| {statistics.median(r.user_us for r in runs):.0f} |"
        )
    return "\n".join(
        [
            "## Proxy relay: CPU per short connection (issue 7, connection rate)",
            "",
            f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} vCPU, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"uvloop {importlib.metadata.version('uvloop')}, by "
            "`bench/bench_splice.py --conn-rate`: wrk (2 threads, 64 connections, "
            f"`Connection: close`, {CONN_SECONDS} s) -> the proxy driver in its own process -> "
            f"NGINX (1 worker), all on loopback and the same CPUs; median of {RUNS} runs (range "
            "in parentheses). CPU is the relay process's user + system time per connection; "
            "the kernel's part includes the loopback TCP work the relay's calls run inline.",
            "",
            "| relay | connections/s | relay CPU µs per connection | of which user |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            'Design: src/passlb/dataplane/proxy/README.md, "Connection rate".',
            "",
        ]
    )


def conn_rate_main(baseline: str | None, write: bool) -> None:
    trees: dict[str, str | None] = {"proxy": None}
    if baseline is not None:
        trees = {"baseline": baseline, "proxy": None}
    results: dict[str, list[ConnRun]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="passlb-conn-rate-") as workdir:
        nginx, backend_port = start_nginx(Path(workdir))
        try:
            for round_ in range(RUNS):  # interleaved, so a slow patch of the VM hits both
                for name, src in trees.items():
                    run = conn_rate_once(backend_port, src)
                    results[name].append(run)
                    print(
                        f"round {round_ + 1} {name:8} {run.per_second:8,.0f} conn/s "
                        f"{run.cpu_us:6.1f} µs CPU/conn (user {run.user_us:.1f})",
                        flush=True,
                    )
        finally:
            nginx.terminate()
            nginx.wait()
    text = conn_rate_section(results)
    print(text)
    if write:
        write_section("proxy-conn-rate", text)
        print(f"\nwritten to {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relay", nargs=3, metavar=("MODE", "LISTEN_PORT", "BACKEND_PORT"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--conn-rate", action="store_true", help="short connections, not bulk")
    parser.add_argument(
        "--baseline", metavar="SRC", help="--conn-rate: also run the driver from this src tree"
    )
    args = parser.parse_args()
    if args.relay:
        relay_main(args.relay[0], int(args.relay[1]), int(args.relay[2]))
        return
    if args.conn_rate:
        conn_rate_main(args.baseline, write=not args.no_write)
        return
    results: dict[str, list[Run]] = {mode: [] for mode in MODES}
    for round_ in range(RUNS):  # modes take turns, so a slow patch of the VM hits them all
        for mode in MODES:
            run = run_once(mode)
            results[mode].append(run)
            print(
                f"round {round_ + 1} {mode:17} {run.gbit_per_s:5.1f} Gbit/s "
                f"{run.cpu_per_gib:5.2f} CPU s/GiB",
                flush=True,
            )
    text = section(results)
    print(text)
    if not args.no_write:
        write_section("splice", text)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
