"""A JSON Schema (draft 2020-12) of the config file, for editors.

Editors with a TOML language server (taplo, Even Better TOML) use it for
completion and early red squiggles. It describes the file's shape: keys,
types, enums, ranges and the plainest mode and check-type rules. The loader
stays the authority: cross-field rules (overlapping services, pools without
backends, prime ring sizes) are only checked there.
"""

from __future__ import annotations

import enum
from typing import Any

from passlb.config import _bgp as bgp_rules
from passlb.config import _build as rules
from passlb.config import _values as values
from passlb.model import (
    MAX_WEIGHT,
    MIN_WEIGHT,
    AdminState,
    Affinity,
    AllUnhealthy,
    Announce,
    Balance,
    HealthType,
    LogFormat,
    Mode,
    PersistOnUnhealthy,
    Protocol,
    ProxyProtocol,
    Refusal,
    SniFallback,
    Speaker,
)

Schema = dict[str, Any]

_NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,31}$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_PORT_RANGE = {"type": "string", "pattern": "^[0-9]{1,5}-[0-9]{1,5}$"}
_ADDRESS = {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}
_BOOL = {"type": "boolean"}
_DURATION_TEXT = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"}
_DURATION = {"oneOf": [_DURATION_TEXT, {"type": "number", "exclusiveMinimum": 0}]}
_DURATION_OR_ZERO = {"oneOf": [_DURATION_TEXT, {"type": "number", "minimum": 0}]}
_STATUS = {"type": "integer", "minimum": 100, "maximum": 599}
_CIDRS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_HOST_PATTERN = r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\.?$"


def _enum(kind: type[enum.StrEnum], description: str) -> Schema:
    return {"enum": [member.value for member in kind], "description": description}


def _integer(low: int, high: int) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high}


def _table(properties: Schema, required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return {**schema, **extra}


def _not_allowed(*keys: str) -> Schema:
    return {"properties": dict.fromkeys(keys, False)}


def _health_properties() -> Schema:
    properties: Schema = {
        "type": _enum(HealthType, "how backends are checked (default tcp)"),
        "port": {**_PORT, "description": "default: the backend's port, else the service port"},
        "interval": _DURATION,
        "timeout": {**_DURATION, "description": "must be shorter than interval"},
        "rise": _integer(1, 100),
        "fall": _integer(1, 100),
        "probe_vip": {**_BOOL, "description": "dsr only: probe the VIP through the backend"},
        "slow_start": _DURATION_OR_ZERO,
        "method": {"type": "string", "pattern": "^[A-Z]{1,16}$"},
        "path": {"type": "string", "pattern": "^/[^\\s]*$"},
        "host": {"type": "string", "minLength": 1},
        "expect_status": {
            "oneOf": [
                _STATUS,
                {"type": "array", "items": _STATUS, "minItems": 1},
            ]
        },
        "body_match": {"type": "string", "minLength": 1},
        "verify_tls": _BOOL,
        "ca_file": {"type": "string", "minLength": 1},
        "server_name": {"type": "string", "pattern": _HOST_PATTERN},
        "request": {"type": "string", "minLength": 1},
        "request_hex": {"type": "string", "pattern": "^[0-9A-Fa-f\\s]+$"},
        "expect": {"type": "string", "minLength": 1},
        "expect_hex": {"type": "string", "pattern": "^[0-9A-Fa-f\\s]+$"},
        "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    }
    return properties


def _service_health() -> Schema:
    """The service's check: type-specific keys only with their type (default tcp)."""
    conditions = []
    for check_type in HealthType:
        foreign = [
            key for key, (_, kinds) in rules.HEALTH_SPECIFIC.items() if check_type not in kinds
        ]
        when: Schema = {
            "properties": {"type": {"const": check_type.value}},
            "required": ["type"],
        }
        if check_type is HealthType.TCP:
            when = {"anyOf": [when, {"not": {"required": ["type"]}}]}
        if check_type is HealthType.NONE:
            foreign.extend(rules.HEALTH_COMMON)
        then = _not_allowed(*foreign)
        if check_type is HealthType.EXEC:
            then["required"] = ["command"]
        conditions.append({"if": when, "then": then})
    return _table(_health_properties(), allOf=conditions)


def _proxy() -> Schema:
    route = _table(
        {
            "server_names": {
                "type": "array",
                "items": {"type": "string", "pattern": _HOST_PATTERN},
                "minItems": 1,
            },
            "pool": _NAME,
        },
        required=("server_names", "pool"),
    )
    properties: Schema = {
        "proxy_protocol": _enum(ProxyProtocol, "header that tells backends the client address"),
        "transparent": {**_BOOL, "description": "IP_TRANSPARENT: needs root and policy routing"},
        "balance": _enum(Balance, "how the proxy picks a backend"),
        "sni_routes": {"type": "array", "items": route},
        "sni_fallback": _enum(SniFallback, "what to do when no route matches"),
        "sni_timeout": _DURATION,
        "max_connections": _integer(1, 10_000_000),
        "max_connections_per_backend": _integer(1, 10_000_000),
        "connect_timeout": _DURATION,
        "idle_timeout": _DURATION,
        "max_udp_sessions": _integer(1, 10_000_000),
        "trust_inbound_proxy_protocol": _BOOL,
        "allow_clients": {**_CIDRS, "deprecated": True, "description": "use the service's"},
    }
    return _table(properties)


def _backend() -> Schema:
    properties: Schema = {
        "address": _ADDRESS,
        "port": {**_PORT, "description": "nat and proxy only"},
        "weight": _integer(MIN_WEIGHT, MAX_WEIGHT),
        "backup": _BOOL,
        "state": _enum(AdminState, "enabled, drain (no new flows) or disabled (flows cut)"),
        "pool": {**_NAME, "description": "proxy only: the pool sni_routes send to"},
        "health": _table(_health_properties()),
        "max_connections": {**_integer(1, 10_000_000), "description": "nat: concurrent flows"},
    }
    return _table(properties, required=("address",))


def _service() -> Schema:
    ports_item = {"oneOf": [_PORT, _PORT_RANGE]}
    properties: Schema = {
        "name": _NAME,
        "vip": _ADDRESS,
        "protocol": _enum(Protocol, "default tcp"),
        "ports": {
            "oneOf": [
                _PORT,
                _PORT_RANGE,
                {"const": "all"},
                {"type": "array", "items": ports_item, "minItems": 1},
            ]
        },
        "mode": _enum(Mode, "dsr: direct server return; nat: DNAT; proxy: userspace relay"),
        "affinity": _enum(Affinity, "which flow fields pick the backend"),
        "target_port": {**_PORT, "description": "nat and proxy, single-port services only"},
        "ring_size": {
            **_integer(1, rules.MAX_RING_SIZE),
            "description": "a prime >= 100 x backends",
        },
        "hash_seed": _integer(0, 2**32 - 1),
        "drain_timeout": _DURATION_OR_ZERO,
        "all_unhealthy": _enum(AllUnhealthy, "what to do when every backend fails its check"),
        "failover_ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "snat": {**_BOOL, "description": "nat only: backends see passlb as the client"},
        "syn_proxy": {**_BOOL, "description": "nat only: SYN cookies before conntrack"},
        "proxy_protocol": _enum(ProxyProtocol, "proxy only; same as proxy.proxy_protocol"),
        "conntrack": _table(
            {
                "tcp_timeout": _DURATION,
                "udp_timeout": _DURATION,
                "persist_on_unhealthy": _enum(PersistOnUnhealthy, "flows on failed backends"),
                "flow_table_size": _integer(1, 2**32 - 1),
                "syn_timeout": {**_DURATION, "description": "dsr: flows that sent only a SYN"},
            }
        ),
        "allow_clients": {**_CIDRS, "description": "only these clients (CIDRs) are served"},
        "deny_clients": {**_CIDRS, "description": "these clients are refused, even if allowed"},
        "refuse": _enum(Refusal, "dsr and nat: what refused traffic gets"),
        "limits": _table(
            {
                "client_new_flow_rate": {
                    **_integer(1, rules.MAX_FLOW_RATE),
                    "description": "new flows per second from one client address",
                },
                "new_flow_rate": {
                    **_integer(1, rules.MAX_FLOW_RATE),
                    "description": "new flows per second to the service",
                },
                "client_max_flows": {
                    **_integer(1, 10_000_000),
                    "description": "nat: concurrent flows of one client address",
                },
                "max_flows": {
                    **_integer(1, 10_000_000),
                    "description": "nat: concurrent flows of the service",
                },
            }
        ),
        "health": _service_health(),
        "proxy": _proxy(),
        "backends": {"type": "array", "items": _backend(), "minItems": 1},
        "announce": _enum(Announce, "with [bgp]: when this service keeps its VIP announced"),
    }
    mode_rules = [
        {
            "if": {"properties": {"mode": {"not": {"const": "proxy"}}}, "required": ["mode"]},
            "then": {
                "properties": {
                    "proxy": False,
                    "proxy_protocol": False,
                    "backends": {"items": _not_allowed("pool")},
                },
            },
        },
        {
            "if": {"properties": {"mode": {"const": "dsr"}}, "required": ["mode"]},
            "then": {
                "properties": {
                    "target_port": False,
                    "backends": {"items": _not_allowed("port")},
                }
            },
        },
        {
            "if": {"properties": {"mode": {"not": {"const": "nat"}}}, "required": ["mode"]},
            "then": _not_allowed("snat", "syn_proxy"),
        },
        {
            "if": {"properties": {"mode": {"const": "proxy"}}, "required": ["mode"]},
            "then": _not_allowed("refuse", "limits"),
        },
    ]
    return _table(
        properties, required=("name", "vip", "ports", "mode", "backends"), allOf=mode_rules
    )


def _bgp() -> Schema:
    asn = {
        **_integer(1, bgp_rules.MAX_ASN - 1),
        "not": {"const": bgp_rules.AS_TRANS},
        "description": "AS number (4-octet; 23456 is AS_TRANS)",
    }
    peer = _table(
        {
            "address": _ADDRESS,
            "asn": asn,
            "hold_time": {
                **_DURATION_OR_ZERO,
                "description": "0 or whole seconds 3s-65535s; default 90s",
            },
            "bfd": {**_BOOL, "description": "BFD for fast failure detection (router too)"},
            "password": {"type": "string", "minLength": 1, "maxLength": 80},
        },
        required=("address", "asn"),
    )
    return _table(
        {
            "asn": asn,
            "router_id": {"type": "string", "format": "ipv4", "description": "BGP identifier"},
            "speaker": _enum(Speaker, "the BGP speaker passlb runs (default bird: BIRD 2)"),
            "next_hop": {
                "type": "array",
                "items": _ADDRESS,
                "maxItems": 2,
                "description": "at most one per family; default: the session's own address",
            },
            "communities": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[0-9]{1,5}:[0-9]{1,5}$"},
            },
            "run_dir": {
                "type": "string",
                "pattern": "^/",
                "description": "the speaker's config, control socket and pid file",
                "default": "/run/passlb/bgp",
            },
            "peers": {"type": "array", "items": peer, "minItems": 1},
        },
        required=("asn", "router_id", "peers"),
    )


def config_schema() -> dict[str, object]:
    """The JSON Schema of a passlb config file (as TOML maps onto JSON)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://passlb.invalid/schema/config.json",
        "title": "passlb configuration",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "interfaces": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,15}$"},
                "description": "where VIP traffic arrives; auto-detected when omitted",
            },
            "api": _table(
                {
                    "listen": {
                        "type": "string",
                        "description": "host:port, [ipv6]:port or unix:/path",
                        "default": "127.0.0.1:9180",
                    },
                    "token": {
                        "type": "string",
                        "minLength": 1,
                        "description": "required unless listen is loopback or unix",
                    },
                    "read_without_token": {
                        "type": "boolean",
                        "default": False,
                        "description": "reads need no token; changes still do",
                    },
                }
            ),
            "log": _table(
                {
                    "level": _enum(rules.LogLevel, "least severe message logged"),
                    "format": _enum(LogFormat, "text or json lines"),
                }
            ),
            "proxy": _table(
                {
                    "workers": {
                        "oneOf": [
                            _integer(1, values.MAX_PROXY_WORKERS),
                            {"const": "auto"},
                        ],
                        "description": "relay processes for proxy mode; auto: one per CPU",
                        "default": 1,
                    }
                }
            ),
            "services": {"type": "array", "items": _service()},
            "bgp": _bgp(),
        },
    }
