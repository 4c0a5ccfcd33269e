"""The admin API, /metrics and the CLI views against a real daemon with real traffic.

`passlb run` in proxy mode on loopback (no root): two TCP backends, real client
connections through the VIP. Counters must move exactly with the traffic.
Tests share one daemon and leave it as they found it (weights 1, all enabled,
no open flows).
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from passlb.api.testing import LiveDaemon, parse_exposition


@pytest.fixture(scope="module")
def daemon() -> Iterator[LiveDaemon]:
    live = LiveDaemon(backends=2)
    try:
        yield live.start()
    finally:
        live.close()


def metrics(daemon: LiveDaemon) -> dict[str, list[tuple[dict[str, str], float]]]:
    return parse_exposition(daemon.client().get_text("/metrics"))


def by_backend(samples: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    return {labels["backend"]: value for labels, value in samples}


def backend(doc: dict[str, Any], key: str) -> dict[str, Any]:
    return next(b for b in LiveDaemon.backends_of(doc) if b["key"] == key)


def cli(daemon: LiveDaemon, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "passlb.cli", *args, "--api", daemon.api],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def no_open_flows(daemon: LiveDaemon) -> bool:
    return all(b["active_flows"] == 0 for b in LiveDaemon.backends_of(daemon.status()))


def test_new_flow_counters_rise_by_the_flows_sent(daemon: LiveDaemon) -> None:
    before = metrics(daemon)
    sent: collections.Counter[str] = collections.Counter()
    for _ in range(20):
        sock, name = daemon.connect()
        sent[name] += 1
        sock.close()
    wait_until(lambda: no_open_flows(daemon))
    after = metrics(daemon)
    keys = {b.name: b.key for b in daemon.backends}
    new_before = by_backend(before["passlb_backend_new_flows_total"])
    new_after = by_backend(after["passlb_backend_new_flows_total"])
    assert {name: new_after[keys[name]] - new_before[keys[name]] for name in keys} == {
        name: sent[name] for name in keys
    }
    assert sum(sent.values()) == 20
    for family in ("passlb_backend_packets_total", "passlb_backend_bytes_total"):
        grew = {
            k: by_backend(after[family])[k] - by_backend(before[family])[k] for k in keys.values()
        }
        assert all(grew[keys[name]] >= count for name, count in sent.items()), (family, grew)
    assert by_backend(after["passlb_backend_up"]) == {k: 1 for k in keys.values()}


def test_active_flows_flow_table_and_cli_flows(daemon: LiveDaemon) -> None:
    held = [daemon.connect() for _ in range(6)]
    try:
        per_backend = collections.Counter(name for _, name in held)
        keys = {b.name: b.key for b in daemon.backends}
        active = by_backend(metrics(daemon)["passlb_backend_active_flows"])
        assert active == {keys[n]: float(per_backend[n]) for n in keys}

        table = daemon.client().get("/api/v1/flows?service=web")
        assert table["total"] == 6
        ports = {sock.getsockname()[1] for sock, _ in held}
        assert {f["src_port"] for f in table["flows"]} == ports
        assert collections.Counter(f["backend"] for f in table["flows"]) == {
            keys[n]: c for n, c in per_backend.items()
        }

        name, count = per_backend.most_common(1)[0]
        shown = cli(daemon, "flows", "--service", "web", "--backend", keys[name])
        assert shown.splitlines()[-1] == f"{count} flow(s)"
        mine = [s for s, n in held if n == name]
        assert all(f":{s.getsockname()[1]}" in shown for s in mine)
        as_json = json.loads(cli(daemon, "flows", "--json", "--limit", "2"))
        assert as_json["total"] == 6
        assert len(as_json["flows"]) == 2
    finally:
        for sock, _ in held:
            sock.close()
    wait_until(lambda: no_open_flows(daemon))


def test_runtime_weight_is_applied_shown_and_logged(daemon: LiveDaemon) -> None:
    first = daemon.backends[0].key
    path = f"/api/v1/services/web/backends/{first}"
    seq = daemon.status()["last_event"]
    try:
        daemon.client().post(path, {"weight": 3})
        doc = daemon.wait_for(lambda d: backend(d, first)["ring_weight"] == 3)
        assert backend(doc, first)["weight"] == 3
        assert backend(doc, first)["config_weight"] == 1
        assert by_backend(metrics(daemon)["passlb_backend_weight"])[first] == 3
        events = daemon.client().get(f"/api/v1/events?since={seq}")["events"]
        assert [(e["kind"], e["backend"], e["weight"]) for e in events] == [("weight", first, 3)]
    finally:
        daemon.client().post(path, {"weight": 1})
    daemon.wait_for(lambda d: backend(d, first)["ring_weight"] == 1)
    logged = [json.loads(line) for line in daemon.log().splitlines()]
    assert any(e.get("event") == "weight" and e.get("weight") == 3 for e in logged)


def test_drain_moves_new_flows_and_shows_a_deadline(daemon: LiveDaemon) -> None:
    b2 = daemon.backends[1]
    try:
        out = cli(daemon, "drain", "web", b2.key)
        assert out.strip() == f"web/{b2.key}: drain"
        doc = daemon.wait_for(lambda d: backend(d, b2.key)["role"] == "draining")
        assert backend(doc, b2.key)["drain_deadline_in"] > 0
        assert backend(doc, b2.key)["ring_weight"] == 0
        names = []
        for _ in range(8):
            sock, name = daemon.connect()
            names.append(name)
            sock.close()
        assert names == ["b1"] * 8
        assert by_backend(metrics(daemon)["passlb_backend_ring_weight"])[b2.key] == 0
    finally:
        cli(daemon, "enable", "web", b2.key)
    daemon.wait_for(lambda d: backend(d, b2.key)["role"] == "active")
    wait_until(lambda: no_open_flows(daemon))


def test_rates_follow_traffic(daemon: LiveDaemon) -> None:
    def busy(doc: dict[str, Any]) -> bool:
        for _ in range(3):
            daemon.connect()[0].close()
        return any(b["rates"]["new_flows"] > 0 for b in LiveDaemon.backends_of(doc))

    daemon.wait_for(busy, timeout=5.0)


def test_reloads_are_counted_and_a_bad_file_changes_nothing(daemon: LiveDaemon) -> None:
    before = daemon.status()
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace('mode = "proxy"', 'mode = "teleport"'))
    try:
        rejected = subprocess.run(
            [sys.executable, "-m", "passlb.cli", "reload", "--api", daemon.api],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert rejected.returncode == 4
        assert "services[web].mode" in rejected.stderr
    finally:
        daemon.config_path.write_text(good)
    assert cli(daemon, "reload").strip() == "reloaded"
    doc = daemon.status()
    assert doc["reloads"] == before["reloads"] + 2
    assert doc["reload_failures"] == before["reload_failures"] + 1
    assert doc["last_reload"]["ok"] is True
    samples = metrics(daemon)
    assert samples["passlb_reloads_total"][0][1] == doc["reloads"]
    assert samples["passlb_reload_failures_total"][0][1] == doc["reload_failures"]
    kinds = [
        (e["kind"], e["ok"])
        for e in daemon.client().get(f"/api/v1/events?since={before['last_event']}")["events"]
    ]
    assert kinds == [("reload", False), ("reload", True)]


def test_status_and_top_views(daemon: LiveDaemon) -> None:
    text = cli(daemon, "status")
    assert text.startswith("passlb 0.1.0: 1 service(s)")
    assert f"web  tcp {daemon.vip} ports {daemon.port}  mode proxy" in text
    for b in daemon.backends:
        row = next(line for line in text.splitlines() if line.strip().startswith(b.key))
        assert row.split()[1:4] == ["up", "active", "enabled"]
    doc = json.loads(cli(daemon, "status", "--json"))
    assert {b["key"] for b in LiveDaemon.backends_of(doc)} == {b.key for b in daemon.backends}
    top = cli(daemon, "top", "--once")
    assert "web  tcp" in top
    assert "recent events:" in top
    assert "health" in top.split("recent events:")[1]


def test_every_log_line_is_json_with_event_fields(daemon: LiveDaemon) -> None:
    entries = [json.loads(line) for line in daemon.log().splitlines()]
    health = [e for e in entries if e.get("event") == "health"]
    assert {e["backend"] for e in health} >= {b.key for b in daemon.backends}
    assert all(isinstance(e["healthy"], bool) and e["reason"] for e in health)
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)


def test_services_endpoints_match_status(daemon: LiveDaemon) -> None:
    client = daemon.client()
    services = client.get("/api/v1/services")["services"]
    assert [s["name"] for s in services] == ["web"]
    one = client.get("/api/v1/services/web")
    assert [b["key"] for b in one["backends"]] == [b.key for b in daemon.backends]
    first = daemon.backends[0].key
    assert client.get(f"/api/v1/services/web/backends/{first}")["health"] == "up"
    assert daemon.status()["state"] == {"in_sync": True, "pending": ""}


def test_refused_clients_are_counted_by_reason_in_status_metrics_and_cli(
    daemon: LiveDaemon,
) -> None:
    def drops() -> dict[str, int]:
        return dict(daemon.status()["services"][0]["drops"])

    def new_flows() -> float:
        return sum(by_backend(metrics(daemon)["passlb_backend_new_flows_total"]).values())

    before, flows_before = drops(), new_flows()
    for _ in range(3):
        # Refused before any backend speaks: reset during our connect, or just after.
        with contextlib.suppress(ConnectionResetError), socket.socket() as sock:
            sock.settimeout(5)
            sock.bind((daemon.denied_client, 0))
            sock.connect((daemon.vip, daemon.port))
            assert sock.recv(64) == b""
    wait_until(lambda: drops().get("not_allowed", 0) == before.get("not_allowed", 0) + 3)
    after = drops()
    assert {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)} == {
        "not_allowed": 3
    }
    assert new_flows() == flows_before
    samples = metrics(daemon)["passlb_service_drops_total"]
    assert ({"service": "web", "reason": "not_allowed"}, after["not_allowed"]) in samples
    shown = cli(daemon, "status")
    assert f"dropped: not_allowed {after['not_allowed']}" in shown
    assert "protection: deny 1 CIDRs, refuse drop" in shown
    protection = daemon.status()["services"][0]["protection"]
    assert protection["deny_clients"] == [f"{daemon.denied_client}/32"]
