"""The admin HTTP API, embedded in the daemon's event loop (aiohttp runner + site).

Bound to 127.0.0.1 by default (or a unix socket); on any other address a bearer
token is required (the config validator refuses to start without one). With a
token set, everything but the status page's static files and /api/v1/access
needs it, /metrics included; with ``read_without_token`` only changes (POST)
need it. Every bad request gets a 4xx JSON body {"error": "<field>: <reason>"}
and changes nothing. openapi.py describes every route (a test keeps them equal).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from passlb.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from passlb.api.openapi import openapi_document
from passlb.api.views import flow_document
from passlb.dataplane.base import Flow
from passlb.model import MAX_WEIGHT, MIN_WEIGHT, AdminState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_FLOW_LIMIT = 1000
MAX_FLOW_LIMIT = 100_000
DEFAULT_HISTORY_SECONDS = 600
MAX_HISTORY_SECONDS = 6 * 3600  # what the daemon keeps (telemetry.HISTORY_TIERS)


class Control(Protocol):
    """What the API may ask of the daemon.

    ``update_backend``, ``flows``, ``history`` raise KeyError naming a missing
    service or backend; ``update_backend`` raises ValueError for a weight out of bounds,
    and changes nothing when it raises.
    """

    async def status(self) -> dict[str, Any]: ...

    def events(self, since: int) -> list[dict[str, Any]]: ...

    async def flows(self, service: str | None, backend: str | None) -> list[Flow]: ...

    def service_modes(self) -> dict[str, str]: ...

    def history(self, service: str | None, backend: str | None, seconds: int) -> dict[str, Any]: ...

    async def metrics(self) -> str: ...

    def update_backend(
        self, service: str, backend: str, *, state: AdminState | None, weight: int | None
    ) -> None: ...

    async def reload(self) -> tuple[bool, list[str]]: ...

    def resync(self) -> None: ...
    def set_node_drained(self, drained: bool) -> str:
        """LookupError when this node announces nothing."""


class BadRequest(Exception):
    """A client error: the message is "<field>: <reason>"."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except ValueError:
        raise BadRequest("body: not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    return body


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown query parameter (allowed: {', '.join(allowed)})")
    return {k: request.query[k] for k in allowed if k in request.query}


def _int_param(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"{name}: must be an integer between {low} and {high}, got {raw!r}")
    return int(raw)


def _parse_backend_update(body: dict[str, Any]) -> tuple[AdminState | None, int | None]:
    unknown = sorted(set(body) - {"state", "weight"})
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (allowed: state, weight)")
    if not body:
        raise BadRequest("state: required (enabled, drain or disabled), or weight")
    state = None
    if "state" in body:
        try:
            state = AdminState(body["state"])
        except ValueError:
            raise BadRequest(
                f"state: must be enabled, drain or disabled, got {body['state']!r}"
            ) from None
    weight = body.get("weight")
    if "weight" in body and (
        not isinstance(weight, int)
        or isinstance(weight, bool)
        or not MIN_WEIGHT <= weight <= MAX_WEIGHT
    ):
        raise BadRequest(
            f"weight: must be an integer between {MIN_WEIGHT} and {MAX_WEIGHT}, got {weight!r}"
        )
    return state, weight


def _find_service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for svc in doc["services"]:
        if svc["name"] == name:
            result: dict[str, Any] = svc
            return result
    raise BadRequest(f"service: no service {name!r}", status=404)


def build_app(
    control: Control, token: str | None = None, *, read_without_token: bool = False
) -> web.Application:
    public = {"/", "/favicon.ico", "/api/v1/access"}

    def authorized(request: web.Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every refusal as JSON naming the field, including the router's own 404/405."""
        try:
            return await handler(request)
        except BadRequest as err:
            return _error(err.status, str(err))
        except web.HTTPMethodNotAllowed as err:
            allowed = ", ".join(sorted(err.allowed_methods))
            return _error(405, f"method: {request.method} not allowed (allowed: {allowed})")
        except web.HTTPNotFound:
            return _error(404, f"path: no such endpoint {request.path}")

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        static = request.path in public or request.path.startswith("/static/")
        reading = request.method in ("GET", "HEAD") and read_without_token
        if not (static or reading or authorized(request)):
            return _error(401, "Authorization: a valid bearer token is required")
        return await handler(request)

    async def access(request: web.Request) -> web.Response:
        """What this client may do, so the status page knows whether to offer actions."""
        can_change = authorized(request)
        return web.json_response(
            {
                "token_required": token is not None,
                "read": can_change or read_without_token,
                "change": can_change,
            }
        )

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def favicon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=(await control.metrics()).encode(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def status(request: web.Request) -> web.Response:
        _query(request, ())
        return web.json_response(await control.status())

    async def services(request: web.Request) -> web.Response:
        _query(request, ())
        return web.json_response({"services": (await control.status())["services"]})

    async def service(request: web.Request) -> web.Response:
        _query(request, ())
        return web.json_response(
            _find_service(await control.status(), request.match_info["service"])
        )

    async def backend(request: web.Request) -> web.Response:
        _query(request, ())
        svc = _find_service(await control.status(), request.match_info["service"])
        key = request.match_info["backend"]
        for b in svc["backends"]:
            if b["key"] == key:
                return web.json_response(b)
        raise BadRequest(f"backend: no backend {key!r} in service {svc['name']!r}", status=404)

    async def update_backend(request: web.Request) -> web.Response:
        service = request.match_info["service"]
        key = request.match_info["backend"]
        state, weight = _parse_backend_update(await _json_body(request))
        try:
            control.update_backend(service, key, state=state, weight=weight)
        except KeyError as err:
            raise BadRequest(str(err.args[0]), status=404) from None
        except ValueError as err:
            raise BadRequest(f"weight: {err}") from None
        changes = [state.value] if state is not None else []
        if weight is not None:
            changes.append(f"weight {weight}")
        return web.json_response({"message": f"{service}/{key}: {', '.join(changes)}"})

    async def events(request: web.Request) -> web.Response:
        query = _query(request, ("since",))
        since = _int_param(query, "since", 0, 0, 2**63 - 1)
        return web.json_response({"events": control.events(since)})

    async def flows(request: web.Request) -> web.Response:
        query = _query(request, ("service", "backend", "limit"))
        limit = _int_param(query, "limit", DEFAULT_FLOW_LIMIT, 1, MAX_FLOW_LIMIT)
        try:
            found = await control.flows(query.get("service"), query.get("backend"))
        except KeyError as err:
            raise BadRequest(str(err.args[0]), status=404) from None
        modes = control.service_modes()
        return web.json_response(
            {
                "total": len(found),
                "flows": [flow_document(f, modes.get(f.service)) for f in found[:limit]],
            }
        )

    async def history(request: web.Request) -> web.Response:
        query = _query(request, ("service", "backend", "seconds"))
        seconds = _int_param(query, "seconds", DEFAULT_HISTORY_SECONDS, 10, MAX_HISTORY_SECONDS)
        if "backend" in query and "service" not in query:
            raise BadRequest("backend: needs service")
        try:
            found = control.history(query.get("service"), query.get("backend"), seconds)
        except KeyError as err:
            raise BadRequest(str(err.args[0]), status=404) from None
        return web.json_response(found)

    async def node_drain(request: web.Request) -> web.Response:
        _query(request, ())
        drained = request.path.endswith("/drain")
        try:
            return web.json_response({"message": control.set_node_drained(drained)})
        except LookupError as err:
            raise BadRequest(str(err.args[0]), status=409) from None

    async def reload(request: web.Request) -> web.Response:
        ok, issues = await control.reload()
        if not ok:
            return _error(422, "config: rejected; the running configuration stays", issues=issues)
        return web.json_response({"message": "reloaded"})

    async def resync(request: web.Request) -> web.Response:
        _query(request, ())
        control.resync()
        return web.json_response({"message": "full resync requested"})

    app = web.Application(middlewares=[errors, auth])
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/access", access)
    app.router.add_get("/api/v1/status", status)
    app.router.add_get("/api/v1/services", services)
    app.router.add_get("/api/v1/services/{service}", service)
    app.router.add_get("/api/v1/services/{service}/backends/{backend}", backend)
    app.router.add_post("/api/v1/services/{service}/backends/{backend}", update_backend)
    app.router.add_get("/api/v1/events", events)
    app.router.add_get("/api/v1/flows", flows)
    app.router.add_get("/api/v1/history", history)
    app.router.add_post("/api/v1/reload", reload)
    app.router.add_post("/api/v1/resync", resync)
    app.router.add_post("/api/v1/node/drain", node_drain)
    app.router.add_post("/api/v1/node/undrain", node_drain)
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
