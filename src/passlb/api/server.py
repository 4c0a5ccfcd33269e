"""The admin HTTP API, embedded in the daemon's event loop (aiohttp runner + site).

Bound to 127.0.0.1 by default; on any other address a bearer token is required
(the config validator refuses to start without one). Every bad request gets a
4xx JSON body {"error": "..."} naming the field, and changes nothing.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from passlb.model import AdminState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Control(Protocol):
    """What the API may ask of the daemon."""

    def status(self) -> dict[str, Any]: ...

    def set_admin(self, service: str, backend: str, state: AdminState) -> None: ...

    async def reload(self) -> tuple[bool, list[str]]: ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body: not valid JSON"}), content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body: expected a JSON object"}),
            content_type="application/json",
        )
    return body


def build_app(control: Control, token: str | None = None) -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "Authorization: a valid bearer token is required")
        return await handler(request)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(control.status())

    async def backend_admin(request: web.Request) -> web.Response:
        service = request.match_info["service"]
        backend = request.match_info["backend"]
        body = await _json_body(request)
        unknown = sorted(set(body) - {"state"})
        if unknown:
            return _error(400, f"{unknown[0]}: unknown field (allowed: state)")
        if "state" not in body:
            return _error(400, "state: required (enabled, drain or disabled)")
        try:
            state = AdminState(body["state"])
        except ValueError:
            return _error(400, f"state: must be enabled, drain or disabled, got {body['state']!r}")
        try:
            control.set_admin(service, backend, state)
        except KeyError as err:
            return _error(404, str(err.args[0]))
        return web.json_response({"message": f"{service}/{backend}: {state.value}"})

    async def reload(request: web.Request) -> web.Response:
        ok, errors = await control.reload()
        if not ok:
            return web.json_response(
                {"error": "config rejected; the running configuration stays", "issues": errors},
                status=422,
            )
        return web.json_response({"message": "reloaded"})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/api/v1/services/{service}/backends/{backend}", backend_admin)
    app.router.add_post("/api/v1/reload", reload)
    return app


async def start_api(app: web.Application, listen: str) -> web.AppRunner:
    """Serve `app` on "host:port" or "unix:/path" inside the running loop."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if listen.startswith("unix:"):
        site = web.UnixSite(runner, listen.removeprefix("unix:"))
    else:
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
    await site.start()
    return runner
