"""Daemon scale benchmark: 1,000 backends in 100 services, each checked every second.

Run: .venv/bin/python bench/bench_daemon.py [--seconds 30]   (about a minute; not a test)

`passlb run` starts as a child process in proxy mode on loopback (no root
needed): 100 services on VIPs 127.2.S.1:9000, each with 10 backends that are
real TCP listeners on 127.1.S.B:9000, accepted and closed by a thread of this
process. Once every check has a verdict the daemon's CPU time (utime + stime
from /proc/<pid>/stat) and RSS are read over the window, while a few
backends' listeners are closed one by one: detection is the time from the close
to the daemon's log line of the apply that took the backend out of its ring.
Results go to docs/benchmarks.md between the daemon markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from docs_section import DOC, write_section

SERVICES = 100
BACKENDS_PER_SERVICE = 10
PORT = 9000
API = "127.2.255.1:19280"
INTERVAL = 1.0
TIMEOUT = 0.5
FALL = 3
FAILURES = 8  # backends failed during the window, one at a time
TARGET_CPU = 10.0  # % of one core
TARGET_RSS_MB = 200.0
TARGET_DETECTION = INTERVAL * FALL + 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def backend_address(service: int, backend: int) -> str:
    return f"127.1.{service}.{backend + 1}"


def config_text() -> str:
    parts = [f'[api]\nlisten = "{API}"\n\n[log]\nformat = "json"\n']
    for s in range(SERVICES):
        parts.append(
            f'\n[[services]]\nname = "svc{s}"\nvip = "127.2.{s}.1"\nports = [{PORT}]\n'
            f'mode = "proxy"\n[services.health]\ntype = "tcp"\ninterval = {INTERVAL}\n'
            f"timeout = {TIMEOUT}\nfall = {FALL}\n"
        )
        for b in range(BACKENDS_PER_SERVICE):
            parts.append(
                f'[[services.backends]]\naddress = "{backend_address(s, b)}"\nport = {PORT}\n'
            )
    return "".join(parts)


class Listeners:
    """The backends: listening sockets; a thread accepts and closes every probe."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        for s in range(SERVICES):
            for b in range(BACKENDS_PER_SERVICE):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((backend_address(s, b), PORT))
                sock.listen(128)
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ)
                self.sockets[f"{backend_address(s, b)}:{PORT}"] = sock
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ready = self.selector.select(timeout=0.05)
                for key, _ in ready:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                        sock.accept()[0].close()

    def fail(self, key: str) -> float:
        """Close one backend's listener; the wall-clock moment it stopped listening."""
        with self._lock:
            sock = self.sockets.pop(key)
            self.selector.unregister(sock)
            sock.close()
            return time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.sockets.values():
            sock.close()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def status() -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{API}/api/v1/status", timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def wait_all_checked(daemon: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}")
        try:
            doc = status()
            if all(b["health"] == "up" for s in doc["services"] for b in s["backends"]):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the daemon did not check every backend in time")


def ring_removals(log_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """From the JSON log, per backend key: the timestamp of the first apply that
    changed it, and of the health transition to down that the apply followed."""
    applied: dict[str, float] = {}
    went_down: dict[str, float] = {}
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "health_transition" and entry.get("current") == "down":
            went_down.setdefault(entry["backend"], entry["ts"])
        msg = entry.get("msg", "")
        if not msg.startswith("apply ok"):
            continue
        for word in msg.replace(",", " ~").replace(")", " ").split():
            if word.startswith("~") and ":" in word:
                applied.setdefault(word[1:], entry["ts"])
    return applied, went_down


def measure(seconds: float) -> dict[str, Any]:
    listeners = Listeners()
    workdir = Path(tempfile.mkdtemp(prefix="passlb-bench-daemon-"))
    config, log_path = workdir / "passlb.toml", workdir / "daemon.log"
    config.write_text(config_text())
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "passlb.cli", "run", str(config)], stdout=log, stderr=log
        )
    try:
        started = time.monotonic()
        wait_all_checked(daemon)
        ready_after = time.monotonic() - started
        time.sleep(3.0)  # let the start-up burst (ring builds, first verdicts) settle
        load_before = os.getloadavg()[0]
        cpu_before, window_start = cpu_seconds(daemon.pid), time.monotonic()
        rss_samples = []
        victims = [f"{backend_address(s * 13 % SERVICES, s % 10)}:{PORT}" for s in range(FAILURES)]
        failed_at: dict[str, float] = {}
        step = seconds / (FAILURES + 1)
        for n in range(FAILURES + 1):
            time.sleep(max(0.0, window_start + n * step - time.monotonic()))
            rss_samples.append(rss_mb(daemon.pid))
            if n < FAILURES:
                failed_at[victims[n]] = listeners.fail(victims[n])
        time.sleep(max(0.0, window_start + seconds - time.monotonic()))
        user, system = cpu_seconds(daemon.pid)
        elapsed = time.monotonic() - window_start
        cpu_user = (user - cpu_before[0]) / elapsed * 100
        cpu_system = (system - cpu_before[1]) / elapsed * 100
        rss_samples.append(rss_mb(daemon.pid))
        peak = rss_mb(daemon.pid, "VmHWM")
        removed, went_down = ring_removals(log_path)
        detection = {k: removed[k] - t for k, t in failed_at.items() if k in removed}
        # The part after the verdict: coalescing, the desired state, the driver.
        verdict_to_apply = [
            removed[k] - went_down[k] for k in failed_at if k in removed and k in went_down
        ]
        return {
            "ready_after": ready_after,
            "cpu": cpu_user + cpu_system,
            "cpu_user": cpu_user,
            "cpu_system": cpu_system,
            "rss": max(rss_samples),
            "rss_peak": peak,
            "detection": detection,
            "verdict_to_apply": sorted(verdict_to_apply),
            "missed": sorted(set(failed_at) - set(detection)),
            "seconds": seconds,
            "load": (load_before, os.getloadavg()[0]),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        listeners.close()


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def section(result: dict[str, Any]) -> str:
    detection = sorted(result["detection"].values())
    worst = max(detection) if detection else float("nan")
    detection_ok = bool(detection) and worst <= TARGET_DETECTION and not result["missed"]
    latencies = result["verdict_to_apply"]
    after_verdict = (
        " / ".join(
            f"{1000 * x:.0f}" for x in (latencies[0], statistics.median(latencies), latencies[-1])
        )
        + " ms"
        if latencies
        else "n/a"
    )
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return "\n".join(
        [
            "## Daemon at scale",
            "",
            f"`bench/bench_daemon.py`, {datetime.date.today()}, {os.cpu_count()} CPUs "
            f"({cpu_model}), Python {platform.python_version()}.",
            f"{SERVICES} proxy-mode services x {BACKENDS_PER_SERVICE} backends = "
            f"{SERVICES * BACKENDS_PER_SERVICE} backends, tcp checks every {INTERVAL:g} s "
            f"(timeout {TIMEOUT:g} s, fall {FALL}); backends are real TCP listeners on "
            "127.1.x.y. Every check had a verdict "
            f"{result['ready_after']:.1f} s after start; then a {result['seconds']:.0f} s "
            f"window during which {FAILURES} backends' listeners were closed one by one. "
            f"Machine load average {result['load'][0]:.1f} → {result['load'][1]:.1f} "
            "(other work shares the 2 CPUs).",
            "",
            "| measure | result | target | |",
            "|---|---:|---:|---|",
            f"| daemon CPU (user {result['cpu_user']:.1f} + system "
            f"{result['cpu_system']:.1f}) | {result['cpu']:.1f} % of one core "
            f"| < {TARGET_CPU:g} % | {verdict(result['cpu'] < TARGET_CPU)} |",
            f"| daemon RSS (max sampled; peak VmHWM {result['rss_peak']:.0f} MB) "
            f"| {result['rss']:.0f} MB | < {TARGET_RSS_MB:g} MB "
            f"| {verdict(result['rss'] < TARGET_RSS_MB)} |",
            f"| failure → ring change (min / median / max of {len(detection)}) "
            f"| {min(detection, default=float('nan')):.2f} / "
            f"{statistics.median(detection) if detection else float('nan'):.2f} / "
            f"{worst:.2f} s | ≤ {TARGET_DETECTION:.1f} s | {verdict(detection_ok)} |",
            f"| of which verdict → ring change (min / median / max) | {after_verdict} | | |",
            "",
            "Detection runs from closing the listener to the log timestamp of the apply",
            "that changed the backend (the driver has applied it by then). A failure lands",
            "at a random point of the check cycle, so it takes between (fall - 1) and fall",
            "intervals, plus what follows the verdict (the row below it): 5 ms of event",
            "coalescing, the desired state computed in a worker thread, the diff and the",
            "driver. The ring without the backend is already built by then: the first of",
            "its `fall` failed checks has it built in the background.",
            "",
            "How it got here (profiled with py-spy and cProfile): a tcp probe is a bare",
            "socket connect instead of an asyncio stream, without uvloop's per-call",
            "getaddrinfo; one timer wakes per 10 ms window and starts every check due in",
            "it, and a loopback connect is decided inside the call, so a check costs no",
            "timer, future or task (interleaved A/B: 11.4-15.7 % -> 6.8-7.3 % CPU);",
            "backend keys and ring member counts are computed once, not on every apply",
            "(an apply with no change: ~45 ms -> ~12 ms); ring builds (35-45 ms each)",
            "run off the event loop and ahead of the transition (verdict -> ring change:",
            "91-137 ms -> 17-34 ms). Most of the CPU left is the loopback handshake",
            "inside connect() (system time) and the ring builds themselves.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement window")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    result = measure(args.seconds)
    text = section(result)
    print(text)
    if result["missed"]:
        print(f"no ring change seen for: {', '.join(result['missed'])}")
    if not args.no_write:
        write_section("daemon", text)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
