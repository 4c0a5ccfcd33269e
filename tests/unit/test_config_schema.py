"""The JSON Schema for editors: valid, accepts the examples, rejects bad shapes."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from passlb.config import _bgp as bgp_rules
from passlb.config import _build as rules
from passlb.config.schema import config_schema

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
BAD = Path(__file__).parent / "bad_configs"

# Corpus files whose mistake is one of shape (keys, types, enums, ranges,
# mode and check-type rules): the schema must catch them as the loader does.
# The rest need cross-field checks only the loader makes.
SHAPE_MISTAKES = [
    "backend-missing-address",
    "backend-pool-outside-proxy",
    "backend-port-in-dsr",
    "backend-state-typo",
    "backend-unknown-key",
    "backend-weight-zero",
    "backend-wrong-types",
    "bgp-bad-values",
    "bgp-peers-missing",
    "backends-inline-invalid",
    "conntrack-invalid",
    "duration-invalid",
    "failover-ratio-out-of-range",
    "hash-seed-negative",
    "health-command-with-http",
    "health-exec-without-command",
    "health-expect-status-invalid",
    "health-hex-invalid",
    "health-none-with-timing",
    "health-path-invalid",
    "health-path-with-tcp",
    "health-type-unknown",
    "health-wrong-types",
    "interface-name-invalid",
    "interfaces-not-array",
    "log-level-typo",
    "mode-typo",
    "no-backends",
    "ports-all-in-array",
    "ports-empty",
    "ports-number-as-string",
    "ports-out-of-range",
    "protocol-unknown",
    "proxy-options-invalid",
    "proxy-protocol-outside-proxy",
    "proxy-table-outside-proxy",
    "service-missing-required",
    "service-name-invalid",
    "services-not-array",
    "snat-outside-nat",
    "sni-bad-names",
    "target-port-in-dsr",
    "unknown-top-level-key",
    "vip-not-string",
]


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def _errors(validator: Any, path: Path) -> list[str]:
    document = tomllib.loads(path.read_text())
    return [error.message for error in validator.iter_errors(document)]


def test_schema_declares_draft_2020_12() -> None:
    assert config_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_schema_accepts_every_example(validator: Any, path: Path) -> None:
    assert _errors(validator, path) == []


@pytest.mark.parametrize("name", SHAPE_MISTAKES)
def test_schema_rejects_shape_mistakes(validator: Any, name: str) -> None:
    assert _errors(validator, BAD / f"{name}.toml") != []


def test_schema_knows_exactly_the_keys_the_loader_knows() -> None:
    schema: Any = config_schema()
    service = schema["properties"]["services"]["items"]
    assert set(schema["properties"]) == set(rules.TOP_KEYS)
    assert set(schema["properties"]["api"]["properties"]) == set(rules.API_KEYS)
    assert set(schema["properties"]["log"]["properties"]) == set(rules.LOG_KEYS)
    assert set(service["properties"]) == set(rules.SERVICE_KEYS)
    assert set(service["properties"]["conntrack"]["properties"]) == set(rules.CONNTRACK_KEYS)
    assert set(service["properties"]["health"]["properties"]) == set(rules.HEALTH_KEYS)
    assert set(service["properties"]["proxy"]["properties"]) == set(rules.PROXY_KEYS)
    route = service["properties"]["proxy"]["properties"]["sni_routes"]["items"]
    assert set(route["properties"]) == set(rules.SNI_ROUTE_KEYS)
    backend = service["properties"]["backends"]["items"]
    assert set(backend["properties"]) == set(rules.BACKEND_KEYS)
    assert set(backend["properties"]["health"]["properties"]) == set(rules.HEALTH_KEYS)
    assert set(schema["properties"]["bgp"]["properties"]) == set(bgp_rules.BGP_KEYS)
    peer = schema["properties"]["bgp"]["properties"]["peers"]["items"]
    assert set(peer["properties"]) == set(bgp_rules.PEER_KEYS)
