"""Admin API contract: every endpoint, auth, and bad input changing nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from passlb.api.server import build_app
from passlb.model import AdminState


class FakeControl:
    def __init__(self) -> None:
        self.admin: list[tuple[str, str, AdminState]] = []
        self.reload_result: tuple[bool, list[str]] = (True, [])

    def status(self) -> dict[str, Any]:
        return {"services": [{"name": "web"}]}

    def set_admin(self, service: str, backend: str, state: AdminState) -> None:
        if (service, backend) != ("web", "198.18.2.11"):
            raise KeyError(f"no backend {backend!r} in service {service!r}")
        self.admin.append((service, backend, state))

    async def reload(self) -> tuple[bool, list[str]]:
        return self.reload_result


@pytest.fixture
async def control() -> FakeControl:
    return FakeControl()


async def client_for(control: FakeControl, token: str | None = None) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(control, token)))
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


@pytest.mark.parametrize("state", ["drain", "enabled", "disabled"])
async def test_backend_admin_states(
    client: TestClient[Any, Any], control: FakeControl, state: str
) -> None:
    resp = await client.post("/api/v1/services/web/backends/198.18.2.11", json={"state": state})
    assert resp.status == 200
    assert control.admin == [("web", "198.18.2.11", AdminState(state))]


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("web/backends/198.18.2.11", {"state": "off"}, 400, "state: must be enabled, drain or"),
        ("web/backends/198.18.2.11", {}, 400, "state: required"),
        ("web/backends/198.18.2.11", {"state": "drain", "x": 1}, 400, "x: unknown field"),
        ("web/backends/198.18.2.11", [1], 400, "body: expected a JSON object"),
        ("web/backends/198.18.2.99", {"state": "drain"}, 404, "no backend '198.18.2.99'"),
        ("api/backends/198.18.2.11", {"state": "drain"}, 404, "in service 'api'"),
    ],
)
async def test_bad_admin_requests_change_nothing(
    client: TestClient[Any, Any],
    control: FakeControl,
    path: str,
    body: object,
    status: int,
    error: str,
) -> None:
    resp = await client.post(f"/api/v1/services/{path}", json=body)
    assert resp.status == status
    assert error in (await resp.json())["error"]
    assert control.admin == []


async def test_invalid_json_body(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/api/v1/services/web/backends/198.18.2.11", data=b"{nope")
    assert resp.status == 400
    assert (await resp.json())["error"] == "body: not valid JSON"


async def test_reload_ok_and_rejected(client: TestClient[Any, Any], control: FakeControl) -> None:
    resp = await client.post("/api/v1/reload", json={})
    assert resp.status == 200
    control.reload_result = (False, ["services[web].vip: not an IP address"])
    resp = await client.post("/api/v1/reload", json={})
    assert resp.status == 422
    body = await resp.json()
    assert body["issues"] == ["services[web].vip: not an IP address"]
    assert "running configuration stays" in body["error"]


async def test_token_required_when_configured(control: FakeControl) -> None:
    c = await client_for(control, token="s3cret")
    try:
        assert (await c.get("/api/v1/status")).status == 401
        bad = await c.get("/api/v1/status", headers={"Authorization": "Bearer nope"})
        assert bad.status == 401
        ok = await c.get("/api/v1/status", headers={"Authorization": "Bearer s3cret"})
        assert ok.status == 200
        refused = await c.post("/api/v1/services/web/backends/198.18.2.11", json={"state": "drain"})
        assert refused.status == 401
        assert control.admin == []
    finally:
        await c.close()
