"""`passlb run` inside a lab's load-balancer namespace, for kernel tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from passlb.api.client import ApiClient, ApiError
from passlb.lab import Lab

API = "127.0.0.1:9180"  # the LB namespace's own loopback


def lab_config(lab: Lab, mode: str, services: list[tuple[str, str, int]], health: str) -> str:
    """A daemon config for the lab: one service per (name, protocol, port) on
    the lab's VIP, every backend in each, `health` as the [services.health] body."""
    backends = "".join(f'\n[[services.backends]]\naddress = "{b.ipv4}"\n' for b in lab.backends)
    text = f'interfaces = ["{lab.lb.interface}"]\n\n[api]\nlisten = "{API}"\n'
    for name, protocol, port in services:
        text += f"""
[[services]]
name = "{name}"
vip = "{lab.vip4}"
protocol = "{protocol}"
ports = [{port}]
mode = "{mode}"
ring_size = 1009

[services.health]
{health}
{backends}"""
    return text


def status() -> dict[str, Any]:
    return ApiClient(API, timeout=5.0).get("/api/v1/status")


def start_daemon(lab: Lab, config_file: Path, log: Path) -> subprocess.Popen[Any]:
    """Start the daemon (stopped by the lab's teardown) and wait for its first apply."""
    with open(log, "a") as err:
        daemon = lab.spawn(
            lab.lb.ns, [sys.executable, "-m", "passlb.cli", "run", str(config_file)], stderr=err
        )
    wait_for(lab, lambda doc: bool(doc["applies"]) and doc["last_apply"]["error"] is None, 30)
    assert daemon.poll() is None, log.read_text()
    return daemon


def wait_for(lab: Lab, condition: Callable[[dict[str, Any]], bool], timeout: float) -> float:
    """Poll the daemon's status until `condition` holds; the wall-clock time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition(lab.call(lab.lb.ns, status)):
                return time.time()
        except ApiError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the daemon's status did not reach the condition in {timeout} s")


def role(doc: dict[str, Any], service: str, backend: str) -> str:
    for svc in doc["services"]:
        for b in svc["backends"]:
            if svc["name"] == service and b["key"] == backend:
                return str(b["role"])
    raise KeyError(f"{service}/{backend}")
