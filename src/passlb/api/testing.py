"""A live daemon on loopback for tests of the API, metrics, CLI and status page.

`passlb run` is started as a child process in proxy mode (no root needed) with
plain TCP backends on their own loopback addresses, each a thread in the test
process. Everything binds port 0 or a fresh 127.x.y.z address, so parallel
suites do not collide. Stop it with ``close()`` (also on failure: use it as a
context manager or from a fixture finalizer).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from passlb.api.client import ApiClient, ApiError

READY_TIMEOUT = 20.0


def loopback_block() -> str:
    """A random "127.A.B" prefix (A in 2..99: other suites use 100 and above)."""
    return f"127.{random.randrange(2, 100)}.{random.randrange(1, 255)}"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Server)
        with contextlib.suppress(OSError):
            self.request.sendall(f"hello from {server.name}\n".encode())
            # Hold the connection until the client closes it, so it stays a live flow.
            self.request.settimeout(server.hold)
            while self.request.recv(4096):
                pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], name: str, hold: float) -> None:
        self.name = name
        self.hold = hold
        super().__init__(address, _Handler)


class Backend:
    """A TCP backend: greets each connection with its name and holds it open."""

    def __init__(self, name: str, host: str, hold: float = 30.0) -> None:
        self.name = name
        self.host = host
        self._server = _Server((host, 0), name, hold)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop listening: its health check then fails (connection refused)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()


class LiveDaemon:
    """`passlb run` in proxy mode: service "web" on VIP host .10 over the backends."""

    def __init__(
        self,
        backends: int = 2,
        *,
        unix_api: bool = False,
        token: str | None = None,
        read_without_token: bool = False,
        log_format: str = "json",
    ) -> None:
        block = loopback_block()
        self.workdir = Path(tempfile.mkdtemp(prefix="passlb-api-test-"))
        self.backends = [Backend(f"b{i + 1}", f"{block}.{11 + i}") for i in range(backends)]
        self.vip = f"{block}.10"
        self.denied_client = f"{block}.99"  # deny_clients: the proxy refuses it
        self.port = free_port(self.vip)
        api_host = f"{block}.1"
        self.api = (
            f"unix:{self.workdir / 'api.sock'}" if unix_api else f"{api_host}:{free_port(api_host)}"
        )
        self.token = token
        self.read_without_token = read_without_token
        self.log_format = log_format
        self.config_path = self.workdir / "passlb.toml"
        self.log_path = self.workdir / "daemon.log"
        self.config_path.write_text(self.config_text())
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.api}"

    def client(self, timeout: float = 5.0) -> ApiClient:
        return ApiClient(self.api, token=self.token, timeout=timeout)

    def config_text(self, weight: int = 1) -> str:
        backends = "".join(
            f'\n[[services.backends]]\naddress = "{b.host}"\nport = {b.port}\nweight = {weight}\n'
            for b in self.backends
        )
        token = "" if self.token is None else f'token = "{self.token}"\n'
        if self.read_without_token:
            token += "read_without_token = true\n"
        return f"""\
[api]
listen = "{self.api}"
{token}
[log]
format = "{self.log_format}"

[[services]]
name = "web"
vip = "{self.vip}"
protocol = "tcp"
ports = [{self.port}]
mode = "proxy"
deny_clients = ["{self.denied_client}"]

[services.health]
type = "tcp"
interval = "0.3s"
timeout = "0.2s"
rise = 1
fall = 2
{backends}"""

    def start(self) -> LiveDaemon:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "passlb.cli", "run", str(self.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.wait_for(lambda doc: all(b["health"] == "up" for b in self.backends_of(doc)))
        return self

    def close(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for backend in self.backends:
            backend.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LiveDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def backends_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [b for svc in doc["services"] for b in svc["backends"]]

    def status(self) -> dict[str, Any]:
        return self.client().get("/api/v1/status")

    def wait_for(self, ready: Any, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Poll the status document until ``ready(doc)``; fail with the daemon's log."""
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise AssertionError(f"passlb exited {self._process.returncode}:\n{self.log()}")
            with contextlib.suppress(ApiError):
                doc = self.status()
                if ready(doc):
                    return doc
            time.sleep(0.1)
        raise AssertionError(f"timed out; last status {json.dumps(doc)[:2000]}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connect(self) -> tuple[socket.socket, str]:
        """One client flow through the VIP: the open socket and the greeting backend's name."""
        sock = socket.create_connection((self.vip, self.port), timeout=5)
        greeting = sock.recv(64).decode()
        return sock, greeting.removeprefix("hello from ").strip()


# One sample line of the text format 0.0.4: name{label="value",...} number
_LABEL = r'[a-zA-Z_]\w*="(?:[^"\\\n]|\\["\\n])*"'
SAMPLE = re.compile(
    rf"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{(?P<labels>{_LABEL}(?:,{_LABEL})*)\}})?"
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|Inf|NaN))$"
)

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_exposition(text: str) -> Samples:
    """Samples by metric name; ValueError for anything not in text format 0.0.4."""
    if not text.endswith("\n"):
        raise ValueError("the exposition must end with a newline")
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            _, kind, name, rest = line.split(" ", 3)
            if kind == "TYPE":
                if rest not in ("counter", "gauge", "histogram") or name in types:
                    raise ValueError(f"bad or repeated TYPE line: {line!r}")
                types[name] = rest
            continue
        match = SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a valid sample line: {line!r}")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        value = match["value"].replace("Inf", "inf")
        samples.setdefault(match["name"], []).append((labels, float(value)))
    for name in samples:
        family = name if name in types else re.sub(r"_(bucket|sum|count)$", "", name)
        if family not in types:
            raise ValueError(f"sample without a TYPE line: {name}")
    return samples
