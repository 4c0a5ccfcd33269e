"""Admin API contract: every endpoint, auth, bad input changing nothing, OpenAPI in sync."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from passlb.api.client import ApiClient, ApiError
from passlb.api.openapi import openapi_document
from passlb.api.server import build_app, start_api
from passlb.dataplane.base import Flow
from passlb.model import AdminState

BACKEND = "198.18.2.11"
BACKEND_PATH = f"/api/v1/services/web/backends/{BACKEND}"


def _backend(key: str) -> dict[str, Any]:
    return {"key": key, "health": "up", "weight": 1, "admin": "enabled"}


class FakeControl:
    """The daemon's side of the API, recording what it was asked to do."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, str, AdminState | None, int | None]] = []
        self.reload_result: tuple[bool, list[str]] = (True, [])
        self.resyncs = 0
        self.flow_queries: list[tuple[str | None, str | None]] = []
        self.history_queries: list[tuple[str | None, str | None, int]] = []
        self.node_drained: bool | None = False  # None: no [bgp]

    async def status(self) -> dict[str, Any]:
        return {
            "services": [
                {"name": "web", "backends": [_backend(BACKEND), _backend("198.18.2.12")]},
                {"name": "dns", "backends": []},
            ]
        }

    def events(self, since: int) -> list[dict[str, Any]]:
        return [
            {"seq": n, "at": 0.0, "kind": "health", "message": f"e{n}"}
            for n in (1, 2, 3)
            if n > since
        ]

    async def flows(self, service: str | None, backend: str | None) -> list[Flow]:
        if service not in (None, "web"):
            raise KeyError(f"service: no service {service!r}")
        self.flow_queries.append((service, backend))
        return [
            Flow(
                "web",
                BACKEND,
                "tcp",
                ip_address("198.18.1.1"),
                40000 + n,
                ip_address("198.18.0.10"),
                443,
                expires_in=10.0,
            )
            for n in range(5)
        ]

    def service_modes(self) -> dict[str, str]:
        return {"web": "dsr", "dns": "nat"}

    def history(self, service: str | None, backend: str | None, seconds: int) -> dict[str, Any]:
        if service not in (None, "web"):
            raise KeyError(f"service: no service {service!r}")
        if backend not in (None, BACKEND):
            raise KeyError(f"backend: no backend {backend!r} in service {service!r}")
        self.history_queries.append((service, backend, seconds))
        return {"step": 1, "times": [], "series": []}

    async def metrics(self) -> str:
        return "passlb_build_info 1\n"

    def update_backend(
        self, service: str, backend: str, *, state: AdminState | None, weight: int | None
    ) -> None:
        if service != "web":
            raise KeyError(f"service: no service {service!r}")
        if backend != BACKEND:
            raise KeyError(f"backend: no backend {backend!r} in service {service!r}")
        self.updates.append((service, backend, state, weight))

    async def reload(self) -> tuple[bool, list[str]]:
        return self.reload_result

    def resync(self) -> None:
        self.resyncs += 1

    def set_node_drained(self, drained: bool) -> str:
        if self.node_drained is None:
            raise LookupError("bgp: this node announces nothing (its config has no [bgp])")
        self.node_drained = drained
        return "drained" if drained else "undrained"


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


async def client_for(
    control: FakeControl, token: str | None = None, *, read_without_token: bool = False
) -> TestClient[Any, Any]:
    app = build_app(control, token, read_without_token=read_without_token)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client(control: FakeControl) -> AsyncIterator[TestClient[Any, Any]]:
    c = await client_for(control)
    yield c
    await c.close()


async def test_status(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/api/v1/status")
    assert resp.status == 200
    assert (await resp.json())["services"][0]["name"] == "web"


async def test_services_service_and_backend(client: TestClient[Any, Any]) -> None:
    names = [s["name"] for s in (await (await client.get("/api/v1/services")).json())["services"]]
    assert names == ["web", "dns"]
    web_doc = await (await client.get("/api/v1/services/web")).json()
    assert [b["key"] for b in web_doc["backends"]] == [BACKEND, "198.18.2.12"]
    backend = await (await client.get(BACKEND_PATH)).json()
    assert backend["key"] == BACKEND


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/api/v1/services/nope", "service: no service 'nope'"),
        ("/api/v1/services/nope/backends/198.18.2.11", "service: no service 'nope'"),
        ("/api/v1/services/web/backends/198.18.2.99", "backend: no backend '198.18.2.99'"),
        ("/api/v1/nothing", "path: no such endpoint /api/v1/nothing"),
    ],
)
async def test_unknown_things_are_404_json(
    client: TestClient[Any, Any], path: str, error: str
) -> None:
    resp = await client.get(path)
    assert resp.status == 404
    assert (await resp.json())["error"].startswith(error)


async def test_wrong_method_is_405_json(client: TestClient[Any, Any]) -> None:
    resp = await client.delete("/api/v1/status")
    assert resp.status == 405
    assert (await resp.json())["error"] == "method: DELETE not allowed (allowed: GET, HEAD)"


@pytest.mark.parametrize("state", ["drain", "enabled", "disabled"])
async def test_backend_admin_states(
    client: TestClient[Any, Any], control: FakeControl, state: str
) -> None:
    resp = await client.post(BACKEND_PATH, json={"state": state})
    assert resp.status == 200
    assert control.updates == [("web", BACKEND, AdminState(state), None)]


async def test_backend_weight_and_state_together(
    client: TestClient[Any, Any], control: FakeControl
) -> None:
    resp = await client.post(BACKEND_PATH, json={"weight": 65535, "state": "drain"})
    assert resp.status == 200
    assert (await resp.json())["message"] == f"web/{BACKEND}: drain, weight 65535"
    assert control.updates == [("web", BACKEND, AdminState.DRAIN, 65535)]


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        (BACKEND, {"state": "off"}, 400, "state: must be enabled, drain or disabled, got 'off'"),
        (BACKEND, {}, 400, "state: required"),
        (BACKEND, {"state": "drain", "x": 1}, 400, "x: unknown field (allowed: state, weight)"),
        (BACKEND, [1], 400, "body: expected a JSON object"),
        (BACKEND, {"weight": 0}, 400, "weight: must be an integer between 1 and 65535, got 0"),
        (BACKEND, {"weight": 65536}, 400, "weight: must be an integer between 1 and 65535"),
        (BACKEND, {"weight": "5"}, 400, "weight: must be an integer between 1 and 65535"),
        (BACKEND, {"weight": True}, 400, "weight: must be an integer"),
        (BACKEND, {"weight": 2.5}, 400, "weight: must be an integer"),
        # a valid state with a bad weight: nothing applies, not even the state
        (BACKEND, {"state": "drain", "weight": -1}, 400, "weight: must be an integer"),
        ("198.18.2.99", {"state": "drain"}, 404, "backend: no backend '198.18.2.99'"),
        ("198.18.2.99", {"weight": 3}, 404, "backend: no backend '198.18.2.99'"),
    ],
)
async def test_bad_backend_updates_change_nothing(
    client: TestClient[Any, Any],
    control: FakeControl,
    path: str,
    body: object,
    status: int,
    error: str,
) -> None:
    resp = await client.post(f"/api/v1/services/web/backends/{path}", json=body)
    assert resp.status == status
    assert (await resp.json())["error"].startswith(error)
    assert control.updates == []


async def test_unknown_service_update_is_404(
    client: TestClient[Any, Any], control: FakeControl
) -> None:
    resp = await client.post(f"/api/v1/services/api/backends/{BACKEND}", json={"state": "drain"})
    assert resp.status == 404
    assert (await resp.json())["error"] == "service: no service 'api'"
    assert control.updates == []


async def test_invalid_json_body(client: TestClient[Any, Any], control: FakeControl) -> None:
    resp = await client.post(BACKEND_PATH, data=b"{nope")
    assert resp.status == 400
    assert (await resp.json())["error"] == "body: not valid JSON"
    assert control.updates == []


async def test_events_since(client: TestClient[Any, Any]) -> None:
    all_events = (await (await client.get("/api/v1/events")).json())["events"]
    assert [e["seq"] for e in all_events] == [1, 2, 3]
    newer = (await (await client.get("/api/v1/events?since=2")).json())["events"]
    assert [e["seq"] for e in newer] == [3]


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("since=-1", "since: must be an integer between 0 and"),
        ("since=abc", "since: must be an integer"),
        ("after=1", "after: unknown query parameter (allowed: since)"),
    ],
)
async def test_bad_event_queries(client: TestClient[Any, Any], query: str, error: str) -> None:
    resp = await client.get(f"/api/v1/events?{query}")
    assert resp.status == 400
    assert (await resp.json())["error"].startswith(error)


async def test_flows_filters_and_limit(client: TestClient[Any, Any], control: FakeControl) -> None:
    resp = await client.get(f"/api/v1/flows?service=web&backend={BACKEND}&limit=2")
    assert resp.status == 200
    body = await resp.json()
    assert body["total"] == 5
    assert len(body["flows"]) == 2
    assert body["flows"][0] == {
        "service": "web",
        "mode": "dsr",
        "backend": BACKEND,
        "protocol": "tcp",
        "src": "198.18.1.1",
        "src_port": 40000,
        "dst": "198.18.0.10",
        "dst_port": 443,
        "expires_in": 10.0,
        "src_hash": None,
    }
    assert control.flow_queries == [("web", BACKEND)]


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        ("service=nope", 404, "service: no service 'nope'"),
        ("limit=0", 400, "limit: must be an integer between 1 and 100000, got '0'"),
        ("limit=x", 400, "limit: must be an integer"),
        ("proto=tcp", 400, "proto: unknown query parameter"),
    ],
)
async def test_bad_flow_queries(
    client: TestClient[Any, Any], query: str, status: int, error: str
) -> None:
    resp = await client.get(f"/api/v1/flows?{query}")
    assert resp.status == status
    assert (await resp.json())["error"].startswith(error)


async def test_history_of_a_service_and_backend(
    client: TestClient[Any, Any], control: FakeControl
) -> None:
    for query in ("", "?service=web", f"?service=web&backend={BACKEND}&seconds=3600"):
        resp = await client.get(f"/api/v1/history{query}")
        assert resp.status == 200
        assert await resp.json() == {"step": 1, "times": [], "series": []}
    assert control.history_queries == [
        (None, None, 600),
        ("web", None, 600),
        ("web", BACKEND, 3600),
    ]


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        ("service=nope", 404, "service: no service 'nope'"),
        ("service=web&backend=198.18.2.99", 404, "backend: no backend '198.18.2.99'"),
        (f"backend={BACKEND}", 400, "backend: needs service"),
        ("seconds=5", 400, "seconds: must be an integer between 10 and 21600, got '5'"),
        ("seconds=99999", 400, "seconds: must be an integer between 10 and 21600"),
        ("step=1", 400, "step: unknown query parameter"),
    ],
)
async def test_bad_history_queries(
    client: TestClient[Any, Any], control: FakeControl, query: str, status: int, error: str
) -> None:
    resp = await client.get(f"/api/v1/history?{query}")
    assert resp.status == status
    assert (await resp.json())["error"].startswith(error)
    assert control.history_queries == []


async def test_metrics_is_prometheus_text(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert await resp.text() == "passlb_build_info 1\n"


async def test_reload_ok_and_rejected(client: TestClient[Any, Any], control: FakeControl) -> None:
    resp = await client.post("/api/v1/reload", json={})
    assert resp.status == 200
    control.reload_result = (False, ["services[web].vip: not an IP address"])
    resp = await client.post("/api/v1/reload", json={})
    assert resp.status == 422
    body = await resp.json()
    assert body["issues"] == ["services[web].vip: not an IP address"]
    assert body["error"] == "config: rejected; the running configuration stays"


async def test_status_page_and_assets_are_served(client: TestClient[Any, Any]) -> None:
    page = await client.get("/")
    assert page.status == 200
    html = await page.text()
    assert "<title>passlb status</title>" in html
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        resp = await client.get(asset)
        assert resp.status == 200, asset
    assert "http" not in html.replace("http-equiv", ""), "no external resources"


async def test_token_required_when_configured(control: FakeControl) -> None:
    c = await client_for(control, token="s3cret")
    try:
        for path in (
            "/api/v1/status",
            "/metrics",
            "/api/v1/events",
            "/api/v1/flows",
            "/api/v1/history",
        ):
            assert (await c.get(path)).status == 401, path
        access = await c.get("/api/v1/access")
        assert await access.json() == {"token_required": True, "read": False, "change": False}
        access = await c.get("/api/v1/access", headers={"Authorization": "Bearer s3cret"})
        assert await access.json() == {"token_required": True, "read": True, "change": True}
        bad = await c.get("/api/v1/status", headers={"Authorization": "Bearer nope"})
        assert bad.status == 401
        assert (await bad.json())["error"].startswith("Authorization:")
        ok = await c.get("/api/v1/status", headers={"Authorization": "Bearer s3cret"})
        assert ok.status == 200
        refused = await c.post(BACKEND_PATH, json={"state": "drain"})
        assert refused.status == 401
        assert (await c.post("/api/v1/reload", json={})).status == 401
        assert control.updates == []
        # The page itself holds no data: it loads, then asks for the token.
        assert (await c.get("/")).status == 200
        assert (await c.get("/static/app.js")).status == 200
    finally:
        await c.close()


async def test_read_without_token_opens_reads_only(control: FakeControl) -> None:
    c = await client_for(control, token="s3cret", read_without_token=True)
    try:
        for path in ("/api/v1/status", "/metrics", "/api/v1/events", "/api/v1/history"):
            assert (await c.get(path)).status == 200, path
        access = await c.get("/api/v1/access")
        assert await access.json() == {"token_required": True, "read": True, "change": False}
        refused = await c.post(BACKEND_PATH, json={"state": "drain"})
        assert refused.status == 401
        assert (await c.post("/api/v1/reload", json={})).status == 401
        assert control.updates == []
        ok = await c.post(
            BACKEND_PATH, json={"state": "drain"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status == 200
        assert control.updates == [("web", BACKEND, AdminState.DRAIN, None)]
    finally:
        await c.close()


async def test_access_without_a_token_configured(client: TestClient[Any, Any]) -> None:
    access = await client.get("/api/v1/access")
    assert await access.json() == {"token_required": False, "read": True, "change": True}


def _routes(app: web.Application) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if path is None or route.method == "HEAD":
            continue  # the static directory; HEAD comes with every GET
        routes.add((str(path), route.method.lower()))
    return routes


def test_openapi_describes_every_route_and_nothing_else(control: FakeControl) -> None:
    document = openapi_document()
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == _routes(build_app(control))
    assert document["openapi"].startswith("3.")


def test_openapi_refs_resolve() -> None:
    document = openapi_document()
    text = repr(document)
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in document["components"]["schemas"], name


async def test_openapi_is_served(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200
    assert (await resp.json())["paths"].keys() == openapi_document()["paths"].keys()


async def test_unix_socket_listen_and_client(control: FakeControl, tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    runner = await start_api(build_app(control), f"unix:{socket_path}")
    try:
        client = ApiClient(f"unix:{socket_path}", timeout=2.0)
        doc = await asyncio.to_thread(client.get, "/api/v1/status")
        assert doc["services"][0]["name"] == "web"
        await asyncio.to_thread(client.post, BACKEND_PATH, {"weight": 7})
        assert control.updates == [("web", BACKEND, None, 7)]
        with pytest.raises(ApiError, match=re.escape("404 backend: no backend '198.18.2.99'")):
            await asyncio.to_thread(
                client.post, "/api/v1/services/web/backends/198.18.2.99", {"weight": 7}
            )
    finally:
        await runner.cleanup()


def test_client_names_an_unreachable_daemon(tmp_path: Path) -> None:
    client = ApiClient(f"unix:{tmp_path / 'absent.sock'}", timeout=1.0)
    with pytest.raises(ApiError, match="cannot reach the passlb daemon"):
        client.get("/api/v1/status")


async def test_node_drain_and_undrain(client: TestClient[Any, Any], control: FakeControl) -> None:
    response = await client.post("/api/v1/node/drain")
    assert response.status == 200 and (await response.json())["message"] == "drained"
    assert control.node_drained is True
    response = await client.post("/api/v1/node/undrain")
    assert response.status == 200 and control.node_drained is False
    control.node_drained = None
    response = await client.post("/api/v1/node/drain")
    assert response.status == 409
    assert (await response.json())["error"].startswith("bgp: this node announces nothing")
