"""What an operator reads in `passlb status`, `--json`, the events and `passlb drain`
is true: reported weights, partial reports, unknown services (a real daemon, the CLI)."""

from __future__ import annotations

import json

from passlb.api.client import ApiClient

from .daemon_harness import PORT, EchoBackend, HttpHealthEndpoint, MakeDaemon, proxy_service

HOSTS = (11, 12, 13)


async def test_reported_weights_are_shown_as_such_and_partial_reports_are_called_ignored(
    make_daemon: MakeDaemon, net: str
) -> None:
    data = [EchoBackend(f"b{h}", f"{net}.{h}") for h in HOSTS]
    checks = [
        HttpHealthEndpoint(f"{net}.{h}", 8080, weight=w)
        for h, w in zip(HOSTS, (5, 1, 1), strict=True)
    ]
    servers: list[EchoBackend | HttpHealthEndpoint] = [*data, *checks]
    for server in servers:
        await server.start()
    daemon = make_daemon(
        proxy_service(
            "web",
            f"{net}.10",
            [f'address = "{net}.{h}"\nport = {PORT}' for h in HOSTS],
            health='type = "http"\nport = 8080\ninterval = 0.2\ntimeout = 0.15\nrise = 1',
        )
    )
    keys = [f"{net}.{h}:{PORT}" for h in HOSTS]

    def ring(doc: dict[str, object]) -> list[int]:
        return [daemon.backend(doc, "web", key)["ring_weight"] for key in keys]

    try:
        await daemon.wait_for(lambda d: ring(d) == [5, 1, 1], 10.0, "reported 5:1:1")
        shown = await daemon.cli("status")
        assert shown.returncode == 0, shown.stderr
        assert "reported weights used" in shown.stdout
        rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines() if net in line}
        # backend health role admin weight reported ring share
        assert [rows[k][4:7] for k in keys] == [["1", "5", "5"], ["1", "1", "1"], ["1", "1", "1"]]
        as_json = json.loads((await daemon.cli("status", "--json")).stdout)
        backends = as_json["services"][0]["backends"]
        assert [(b["weight"], b["reported_weight"]) for b in backends] == [(1, 5), (1, 1), (1, 1)]
        assert as_json["services"][0]["reported_weights"] == "used"
        assert as_json["services"][0]["ports"] == [PORT]
        seq = as_json["last_event"]

        # A weight change is its own event: no "up".
        checks[0].weight = 3
        await daemon.wait_for(lambda d: ring(d) == [3, 1, 1], 10.0, "reported 3:1:1")
        events = ApiClient(daemon.api).get(f"/api/v1/events?since={seq}")["events"]
        assert [(e["kind"], e["message"]) for e in events] == [
            ("reported_weight", f"web/{keys[0]} reports weight 3 (was 5)")
        ]
        top = await daemon.cli("top", "--once")
        assert f"reported_weight web/{keys[0]} reports weight 3 (was 5)" in top.stdout
        assert " up: " not in top.stdout.split("recent events:")[1].splitlines()[-1]

        # Only some report: the reports are ignored, and status says so.
        checks[1].weight = None
        checks[2].weight = None
        doc = await daemon.wait_for(lambda d: ring(d) == [1, 1, 1], 10.0, "static 1:1:1")
        svc = doc["services"][0]
        assert svc["reported_weights"] == "ignored"
        shown = await daemon.cli("status")
        assert (
            "reported weights ignored: only 1 of 3 serving backends report a weight" in shown.stdout
        )
    finally:
        for backend in data:
            await backend.kill()
        for check in checks:
            await check.stop()


async def test_drain_of_an_unknown_service_names_the_service(
    make_daemon: MakeDaemon, net: str
) -> None:
    backend = EchoBackend("b11", f"{net}.11")
    await backend.start()
    daemon = make_daemon(
        proxy_service("web", f"{net}.10", [f'address = "{net}.11"\nport = {PORT}'])
    )
    try:
        await daemon.wait_ready()
        done = await daemon.cli("drain", "nope", "198.18.0.11")
        assert done.returncode == 4
        assert done.stderr.strip().endswith(": 404 service: no service 'nope'")
        assert "backend" not in done.stderr.split("404")[1]
        done = await daemon.cli("drain", "web", "198.18.0.11")
        assert done.returncode == 4
        assert "backend: no backend '198.18.0.11' in service 'web'" in done.stderr
    finally:
        await backend.kill()


async def test_a_drain_past_its_timeout_shows_as_drained(make_daemon: MakeDaemon, net: str) -> None:
    backends = [EchoBackend(f"b{h}", f"{net}.{h}") for h in (11, 12)]
    for backend in backends:
        await backend.start()
    daemon = make_daemon(
        proxy_service(
            "web",
            f"{net}.10",
            [f'address = "{net}.{h}"\nport = {PORT}' for h in (11, 12)],
            settings='drain_timeout = "1s"',
        )
    )
    key = f"{net}.12:{PORT}"
    try:
        await daemon.wait_ready()
        done = await daemon.cli("drain", "web", key)
        assert done.returncode == 0, done.stderr
        doc = await daemon.wait_for(
            lambda d: daemon.backend(d, "web", key)["role"] == "drained", 10.0, "drained"
        )
        assert daemon.backend(doc, "web", key)["drain_deadline_in"] is None
        shown = await daemon.cli("status")
        row = next(line for line in shown.stdout.splitlines() if line.strip().startswith(key))
        assert row.split()[1:4] == ["up", "drained", "drain"]
        assert "drain ends" not in shown.stdout
        as_json = json.loads((await daemon.cli("status", "--json")).stdout)
        drained = daemon.backend(as_json, "web", key)
        assert (drained["role"], drained["drain_deadline_in"]) == ("drained", None)
    finally:
        for backend in backends:
            await backend.kill()
