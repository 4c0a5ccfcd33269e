"""A backend's weight has one pair of bounds (model.MIN_WEIGHT, MAX_WEIGHT), and
every place that takes a weight uses them: the config and its JSON Schema, the
admin API and its OpenAPI document, the reconciler."""

from __future__ import annotations

from typing import Any

import pytest

from passlb.api.openapi import openapi_document
from passlb.config import parse_config
from passlb.config.schema import config_schema
from passlb.control.reconciler import Reconciler
from passlb.errors import ConfigError
from passlb.model import MAX_WEIGHT, MIN_WEIGHT

SERVICE = """
[[services]]
name = "web"
vip = "198.18.0.10"
ports = 443
mode = "dsr"
[[services.backends]]
address = "198.18.2.11"
weight = {weight}
"""


def test_the_documents_state_the_model_bounds() -> None:
    schema: Any = config_schema()
    backend = schema["properties"]["services"]["items"]["properties"]["backends"]
    written = backend["items"]["properties"]["weight"]
    api = openapi_document()["components"]["schemas"]["BackendUpdate"]["properties"]["weight"]
    for bounds in (written, api):
        assert (bounds["minimum"], bounds["maximum"]) == (MIN_WEIGHT, MAX_WEIGHT)


@pytest.mark.parametrize("weight", [MIN_WEIGHT - 1, MAX_WEIGHT + 1])
def test_the_config_and_the_reconciler_refuse_a_weight_out_of_bounds(weight: int) -> None:
    config = parse_config(SERVICE.format(weight=MAX_WEIGHT))
    with pytest.raises(ConfigError, match=f"between {MIN_WEIGHT} and {MAX_WEIGHT}"):
        parse_config(SERVICE.format(weight=weight))
    rec = Reconciler(config, {})
    with pytest.raises(ValueError, match=f"between {MIN_WEIGHT} and {MAX_WEIGHT}"):
        rec.set_weight("web", "198.18.2.11", weight)
