"""The OpenAPI 3 description of the admin API, served at /api/v1/openapi.json.

Hand-written next to the routes in server.py; a test checks that every route
is described here and that nothing here lacks a route.
"""

from __future__ import annotations

from typing import Any

from passlb import __version__
from passlb.model import MAX_WEIGHT, MIN_WEIGHT

_ERROR = {
    "description": 'Refused; nothing changed. {"error": "<field>: <reason>"}',
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_SERVICE = _path_param("service", "service name")
_BACKEND = _path_param("backend", "backend key: address, or address:port ([v6]:port)")

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "example": "weight: must be an integer between 1 and"},
            "issues": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Message": {"type": "object", "properties": {"message": {"type": "string"}}},
    "Rates": {
        "type": "object",
        "description": "per second, between the daemon's last two counter reads (1 s apart)",
        "properties": {k: {"type": "number"} for k in ("packets", "bytes", "new_flows")},
    },
    "Backend": {
        "type": "object",
        "properties": {
            "key": {"type": "string"},
            "address": {"type": "string"},
            "port": {"type": ["integer", "null"]},
            "backup": {"type": "boolean"},
            "admin": {"enum": ["enabled", "drain", "disabled"]},
            "health": {"enum": ["unknown", "up", "down"]},
            "health_reason": {"type": "string"},
            "check_latency": {"type": ["number", "null"], "description": "seconds"},
            "health_history": {
                "type": "array",
                "description": "the last health transitions, newest first",
                "items": {
                    "type": "object",
                    "properties": {
                        "at": {"type": "number", "description": "Unix time"},
                        "health": {"enum": ["up", "down"]},
                        "reason": {"type": "string"},
                    },
                },
            },
            "role": {
                "enum": ["active", "standby", "draining", "drained", "down", "disabled", "unknown"],
                "description": "drained: a drain whose deadline passed (its flows were cut)",
            },
            "weight": {"type": "integer", "description": "static weight (runtime override)"},
            "config_weight": {"type": "integer", "description": "weight in the config file"},
            "reported_weight": {
                "type": ["integer", "null"],
                "description": "weight the health check reports; null: none reported",
            },
            "ring_weight": {"type": "integer", "description": "weight the ring was built with"},
            "ring_slots": {"type": "integer", "description": "slots of the ring it holds"},
            "ring_share": {"type": "number", "description": "ring_slots as % of the ring"},
            "drain_deadline_in": {
                "type": ["number", "null"],
                "description": "seconds until a draining backend's flows are cut; null when "
                "none is pending (not draining, or drained)",
            },
            "removed": {
                "type": "boolean",
                "description": "gone from the config; draining until drain_deadline_in",
            },
            "packets": {"type": "integer"},
            "bytes": {"type": "integer"},
            "new_flows": {"type": "integer"},
            "active_flows": {"type": "integer"},
            "rates": _ref("Rates"),
        },
    },
    "Service": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "vip": {"type": "string"},
            "protocol": {"enum": ["tcp", "udp", "tcp+udp"]},
            "ports": {
                "type": "array",
                "items": {"type": ["integer", "string"]},
                "description": 'as in the config: [443, "8000-8100"]; every port: ["1-65535"]',
            },
            "mode": {"enum": ["dsr", "nat", "proxy"]},
            "dropping": {"type": "boolean", "description": "no ring: new flows dropped"},
            "dropped": {"type": "integer"},
            "drops": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "description": "refused or dropped traffic by reason (docs/protecting.md)",
            },
            "protection": {
                "type": "object",
                "description": "edge protection as configured: allow_clients, deny_clients,"
                " refuse, client_new_flow_rate, new_flow_rate, client_max_flows, max_flows,"
                " syn_proxy, syn_timeout (dsr), and summary (the same in words)",
            },
            "active_flows": {"type": "integer"},
            "reported_weights": {
                "enum": ["none", "used", "ignored"],
                "description": "whether the backends' reported weights build the ring",
            },
            "reported_weights_note": {"type": "string", "description": "why, in words"},
            "ring_fingerprint": {
                "type": ["string", "null"],
                "description": "16 hex digits, equal on nodes that send new flows alike;"
                " none: no ring",
            },
            "backends": {"type": "array", "items": _ref("Backend")},
        },
    },
    "Status": {
        "type": "object",
        "properties": {
            "version": {"type": "string"},
            "uptime": {"type": "number"},
            "config": {"type": "string"},
            "interfaces": {"type": "array", "items": {"type": "string"}},
            "services": {"type": "array", "items": _ref("Service")},
            "applies": {"type": "integer"},
            "apply_failures": {"type": "integer"},
            "last_apply": {"type": ["object", "null"]},
            "state": {
                "type": "object",
                "description": "desired vs applied",
                "properties": {"in_sync": {"type": "boolean"}, "pending": {"type": "string"}},
            },
            "reloads": {"type": "integer"},
            "reload_failures": {"type": "integer"},
            "last_reload": {"type": "object"},
            "last_event": {"type": "integer", "description": "seq of the newest event"},
            "errors": {"type": "array", "items": {"type": "string"}},
            "bgp": {"oneOf": [_ref("Bgp"), {"type": "null"}], "description": "null: no [bgp]"},
        },
    },
    "Bgp": {
        "type": "object",
        "properties": {
            "speaker": {"enum": ["bird"]},
            "asn": {"type": "integer"},
            "router_id": {"type": "string"},
            "restarts": {"type": "integer", "description": "speaker restarts after it died"},
            "node": {
                "type": "object",
                "description": "drain progress: drained, withdrawn, traffic_moved, ...",
                "properties": {"drained": {"type": "boolean"}},
                "additionalProperties": True,
            },
            "peers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "address": {"type": "string"},
                        "asn": {"type": "integer"},
                        "state": {"type": "string", "description": "BGP state; Established"},
                        "established": {"type": "boolean"},
                        "info": {"type": "string"},
                        "last_error": {"type": "string"},
                        "routes_exported": {"type": "integer"},
                        "hold_time": {"type": "number"},
                        "bfd": {"type": "boolean"},
                    },
                },
            },
            "vips": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "vip": {"type": "string"},
                        "prefix": {"type": "string"},
                        "announced": {"type": "boolean"},
                        "reason": {
                            "enum": [
                                "serving",
                                "policy always",
                                "node drained",
                                "no backend enabled",
                                "all backends unhealthy",
                                "policy never",
                            ]
                        },
                        "services": {"type": "array", "items": {"type": "string"}},
                        "because_of": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    },
    "Event": {
        "type": "object",
        "required": ["seq", "at", "kind", "message"],
        "properties": {
            "seq": {"type": "integer"},
            "at": {"type": "number", "description": "Unix time"},
            "kind": {
                "enum": [
                    "health",
                    "reported_weight",
                    "admin",
                    "weight",
                    "reload",
                    "apply",
                    "bgp",
                    "node",
                ]
            },
            "message": {"type": "string"},
        },
        "additionalProperties": True,
    },
    "Flow": {
        "type": "object",
        "properties": {
            "service": {"type": "string"},
            "mode": {"enum": ["dsr", "nat", "proxy", None]},
            "backend": {"type": "string"},
            "protocol": {"enum": ["tcp", "udp"]},
            "src": {
                "type": ["string", "null"],
                "description": "null: a dsr IPv6 entry keeps only src_hash, a hash of the address",
            },
            "src_port": {"type": "integer"},
            "dst": {"type": "string"},
            "dst_port": {"type": "integer"},
            "expires_in": {"type": ["number", "null"]},
            "src_hash": {
                "type": ["integer", "null"],
                "description": "32-bit hash of the client address (dsr IPv6 flow tables)",
            },
        },
    },
    "History": {
        "type": "object",
        "description": "points `step` seconds apart, oldest first; null where nothing was "
        "measured (proxy active flows are counted when status or /metrics is read)",
        "properties": {
            "step": {"type": "integer", "description": "seconds between points"},
            "times": {"type": "array", "items": {"type": "number"}, "description": "Unix time"},
            "series": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "service": {"type": "string"},
                        "backend": {
                            "type": ["string", "null"],
                            "description": "null: the service's total",
                        },
                        **{
                            name: {"type": "array", "items": {"type": ["number", "null"]}}
                            for name in ("new_flows", "packets", "bytes", "active_flows")
                        },
                    },
                },
            },
        },
    },
    "BackendUpdate": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            "state": {"enum": ["enabled", "drain", "disabled"]},
            "weight": {"type": "integer", "minimum": MIN_WEIGHT, "maximum": MAX_WEIGHT},
        },
    },
}

_PATHS: dict[str, Any] = {
    "/": {
        "get": {
            "summary": "The web status page (HTML; no token needed)",
            "responses": {"200": {"description": "HTML"}},
        }
    },
    "/favicon.ico": {"get": {"summary": "Empty", "responses": {"204": {"description": "none"}}}},
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text format 0.0.4)",
            "responses": {"200": {"description": "text/plain; version=0.0.4"}, "401": _ERROR},
        }
    },
    "/api/v1/openapi.json": {
        "get": {"summary": "This description", "responses": {"200": _json("OpenAPI", {})}}
    },
    "/api/v1/access": {
        "get": {
            "summary": "What this request's credentials allow (no token needed to ask)",
            "responses": {
                "200": _json(
                    "access",
                    {
                        "type": "object",
                        "properties": {
                            "token_required": {
                                "type": "boolean",
                                "description": "the API has a token",
                            },
                            "read": {"type": "boolean", "description": "GET requests are allowed"},
                            "change": {
                                "type": "boolean",
                                "description": "POST requests (drain, weight, reload) are allowed",
                            },
                        },
                    },
                )
            },
        }
    },
    "/api/v1/status": {
        "get": {
            "summary": "Everything passlb status shows",
            "responses": {"200": _json("status", _ref("Status")), "401": _ERROR},
        }
    },
    "/api/v1/services": {
        "get": {
            "summary": "Every service with its backends",
            "responses": {
                "200": _json(
                    "services",
                    {
                        "type": "object",
                        "properties": {"services": {"type": "array", "items": _ref("Service")}},
                    },
                ),
                "401": _ERROR,
            },
        }
    },
    "/api/v1/services/{service}": {
        "get": {
            "summary": "One service",
            "parameters": [_SERVICE],
            "responses": {"200": _json("service", _ref("Service")), "404": _ERROR},
        }
    },
    "/api/v1/services/{service}/backends/{backend}": {
        "get": {
            "summary": "One backend",
            "parameters": [_SERVICE, _BACKEND],
            "responses": {"200": _json("backend", _ref("Backend")), "404": _ERROR},
        },
        "post": {
            "summary": "Change a backend's admin state and/or weight (runtime override)",
            "description": "Both fields are validated before either applies. A weight "
            "override lasts until a reload removes the backend; the config file is not "
            "written.",
            "parameters": [_SERVICE, _BACKEND],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("BackendUpdate")}},
            },
            "responses": {
                "200": _json("applied", _ref("Message")),
                "400": _ERROR,
                "401": _ERROR,
                "404": _ERROR,
            },
        },
    },
    "/api/v1/events": {
        "get": {
            "summary": "Recent events (bounded ring buffer): health, reported_weight, admin,"
            " weight, reload, apply",
            "parameters": [
                _query_param("since", "only events with a larger seq", {"type": "integer"})
            ],
            "responses": {
                "200": _json(
                    "events",
                    {
                        "type": "object",
                        "properties": {"events": {"type": "array", "items": _ref("Event")}},
                    },
                ),
                "400": _ERROR,
            },
        }
    },
    "/api/v1/flows": {
        "get": {
            "summary": "Current flows from the data plane's flow table",
            "parameters": [
                _query_param("service", "only this service", {"type": "string"}),
                _query_param("backend", "only this backend key", {"type": "string"}),
                _query_param(
                    "limit",
                    "at most this many (default 1000)",
                    {"type": "integer", "minimum": 1, "maximum": 100000},
                ),
            ],
            "responses": {
                "200": _json(
                    "flows",
                    {
                        "type": "object",
                        "properties": {
                            "total": {"type": "integer"},
                            "flows": {"type": "array", "items": _ref("Flow")},
                        },
                    },
                ),
                "400": _ERROR,
                "404": _ERROR,
            },
        }
    },
    "/api/v1/history": {
        "get": {
            "summary": "Rates (new flows, packets, bytes per second) and active flows over "
            "time: every service's total, or one service's total and one backend's",
            "parameters": [
                _query_param("service", "only this service", {"type": "string"}),
                _query_param("backend", "also this backend key (with service)", {"type": "string"}),
                _query_param(
                    "seconds",
                    "how far back (default 600): 1 s points up to 10 min, 10 s up to 1 h, "
                    "60 s up to 6 h",
                    {"type": "integer", "minimum": 10, "maximum": 21600},
                ),
            ],
            "responses": {"200": _json("history", _ref("History")), "400": _ERROR, "404": _ERROR},
        }
    },
    "/api/v1/node/drain": {
        "post": {
            "summary": "Withdraw every VIP from the routers; forwarding goes on (status"
            " bgp.node.traffic_moved says when the routers moved the traffic away)",
            "responses": {"200": _json("draining", _ref("Message")), "409": _ERROR},
        }
    },
    "/api/v1/node/undrain": {
        "post": {
            "summary": "Announce the VIPs again (those whose services can serve)",
            "responses": {"200": _json("undrained", _ref("Message")), "409": _ERROR},
        }
    },
    "/api/v1/reload": {
        "post": {
            "summary": "Re-read the config file; a bad file changes nothing",
            "responses": {"200": _json("reloaded", _ref("Message")), "422": _ERROR},
        }
    },
    "/api/v1/resync": {
        "post": {
            "summary": "A full resync now: re-read the data plane, repair what changed"
            " behind passlb (reported in the log, events and passlb_resync_repairs_total)",
            "responses": {"200": _json("requested", _ref("Message"))},
        }
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "passlb admin API",
            "version": __version__,
            "description": "Bearer token (Authorization: Bearer <token>) required on every "
            "path except / when [api] token is set.",
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": _PATHS,
    }
