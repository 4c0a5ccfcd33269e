"""The workloads of the data-plane benchmark, run from the lab's client namespace.

Every target is measured with the same functions against the address it
serves on (a backend's own address for `direct`, the VIP for the others):

- TCP bulk: iperf3, 1 and 4 streams, to the `bulk` port (a pool of ONE
  backend, because iperf3's control and data connections must meet the same
  server).
- UDP packets per second: iperf3 `-u -l 64 -b 0`, the packets the backend
  received per second (same one-backend pool).
- New TCP connections per second: wrk with `Connection: close` against the
  backends' NGINX HTTP servers, so every request is a new connection.
- Latency: sequential HTTP GETs (one at a time, no load), each on a new
  connection (connect + request + response + close) and each on one open
  keep-alive connection; percentiles over all of them.

Each measurement is bounded: tools get a fixed duration and a subprocess
timeout, the Python client a count and a deadline.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any

from passlb.lab import Lab

BULK_PORT = 5201
HTTP_PORT = 8080
UDP_PAYLOAD = 64
WRK_THREADS = 2
WRK_CONNECTIONS = 64
TOOL_GRACE = 30.0  # seconds a tool may take past its measuring time before it is killed
CONNECT_TIMEOUT = 2.0
LATENCY_WARMUP = 50  # round trips not counted: ARP, caches and the LB's first flows
MAX_RESPONSE = 65536

_WRK_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


class WorkloadError(RuntimeError):
    """A workload ran but produced no usable number."""


@dataclass(frozen=True)
class Measurement:
    value: float
    unit: str
    note: str = ""  # shown in the run log, not in the table


@dataclass(frozen=True)
class LatencyResult:
    p50_us: float
    p99_us: float
    count: int


def tcp_bulk(lab: Lab, address: str, streams: int, seconds: float) -> Measurement:
    """Receiver-side goodput of `streams` parallel iperf3 TCP streams."""
    report = _iperf3(lab, address, ["-P", str(streams)], seconds)
    bps = float(report["end"]["sum_received"]["bits_per_second"])
    retransmits = report["end"]["sum_sent"].get("retransmits", 0)
    return Measurement(bps / 1e9, "Gbit/s", f"{retransmits} retransmits")


def udp_pps(lab: Lab, address: str, seconds: float) -> Measurement:
    """Datagrams of UDP_PAYLOAD bytes the backend received per second, the
    sender going as fast as it can (`-b 0`)."""
    report = _iperf3(lab, address, ["-u", "-l", str(UDP_PAYLOAD), "-b", "0"], seconds)
    received = report["end"]["sum_received"]
    packets = received["bytes"] / UDP_PAYLOAD
    sent = report["end"]["sum_sent"]["packets"]
    duration = float(received["seconds"])
    return Measurement(
        packets / duration / 1e3,
        "kpps",
        f"sent {sent / duration / 1e3:.0f} kpps, lost {received['lost_percent']:.1f} %",
    )


def connection_rate(lab: Lab, address: str, seconds: float) -> Measurement:
    """Short-lived connections per second: wrk with `Connection: close`."""
    if shutil.which("wrk") is None:
        raise WorkloadError("wrk is not installed")
    argv = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{WRK_CONNECTIONS}",
        f"-d{max(1, round(seconds))}s",
        "-H",
        "Connection: close",
        f"http://{address}:{HTTP_PORT}/",
    ]
    done = lab.run(lab.clients[0].ns, argv, timeout=seconds + TOOL_GRACE)
    rate = _WRK_RATE.search(done.stdout)
    if rate is None:
        raise WorkloadError(f"wrk printed no rate:\n{done.stdout}{done.stderr}")
    notes = []
    errors = _WRK_ERRORS.search(done.stdout)
    if errors is not None:
        notes.append("socket errors connect/read/write/timeout " + "/".join(errors.groups()))
    non_2xx = _WRK_NON_2XX.search(done.stdout)
    if non_2xx is not None:
        notes.append(f"{non_2xx.group(1)} non-2xx responses")
    return Measurement(float(rate.group(1)), "conn/s", "; ".join(notes))


def latency(lab: Lab, address: str, count: int, *, keep_alive: bool) -> LatencyResult:
    """p50/p99 of `count` sequential HTTP round trips (see `http_round_trips`)."""
    samples = lab.call(
        lab.clients[0].ns,
        http_round_trips,
        address,
        HTTP_PORT,
        LATENCY_WARMUP + count,
        keep_alive,
        timeout=count * CONNECT_TIMEOUT + TOOL_GRACE,
    )
    if len(samples) < LATENCY_WARMUP + count:
        raise WorkloadError(
            f"only {len(samples)} of {LATENCY_WARMUP + count} round trips succeeded"
        )
    samples = samples[LATENCY_WARMUP:]
    centiles = statistics.quantiles(samples, n=100, method="inclusive")
    return LatencyResult(p50_us=centiles[49] * 1e6, p99_us=centiles[98] * 1e6, count=count)


# -- run inside a namespace (lab.call) -----------------------------------------------


def http_round_trips(host: str, port: int, count: int, keep_alive: bool) -> list[float]:
    """Seconds per request of `count` sequential GETs.

    keep_alive=False: each sample is connect + request + response + close of
    a new connection; True: each is request + response on one open connection.
    A failed request ends the run: the caller sees fewer samples than asked.
    """
    samples: list[float] = []
    connection = "keep-alive" if keep_alive else "close"
    request = f"GET / HTTP/1.1\r\nHost: bench\r\nConnection: {connection}\r\n\r\n".encode()
    sock: socket.socket | None = None
    try:
        for _ in range(count):
            started = time.perf_counter()
            if sock is None:
                sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            _read_response(sock)
            if not keep_alive:
                sock.close()
                sock = None
            samples.append(time.perf_counter() - started)
    except (OSError, WorkloadError):
        pass  # the shortfall is reported by the caller
    finally:
        if sock is not None:
            sock.close()
    return samples


def _read_response(sock: socket.socket) -> None:
    """Read one HTTP response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    if match is None:
        raise WorkloadError("response without Content-Length")
    while len(body) < int(match.group(1)):
        body += _recv(sock)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(MAX_RESPONSE)
    if not chunk:
        raise WorkloadError("connection closed mid-response")
    return chunk


def wait_until_serving(host: str, port: int, timeout: float) -> float:
    """Seconds until a TCP connection to host:port succeeds; TimeoutError after `timeout`.

    Used where a server gives no ready signal (NGINX, HAProxy, a daemon
    converging its data plane): the first accepted connection is the signal.
    """
    started = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return time.monotonic() - started
        except OSError as exc:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{host}:{port} not serving after {timeout} s: {exc}") from exc
            time.sleep(0.05)


# -- helpers -----------------------------------------------------------------------


def _iperf3(lab: Lab, address: str, options: list[str], seconds: float) -> dict[str, Any]:
    argv = ["iperf3", "-c", address, "-p", str(BULK_PORT), "-t", str(seconds), "-J", *options]
    done = lab.run(lab.clients[0].ns, argv, check=False, timeout=seconds + TOOL_GRACE)
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"iperf3 gave no JSON: {done.stderr.strip()}") from exc
    if "error" in report:
        raise WorkloadError(f"iperf3: {report['error']}")
    return report
