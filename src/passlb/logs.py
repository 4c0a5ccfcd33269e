"""Structured logs: one event name and key=value fields, as text or JSON.

``log_event(log, "health", service="web", backend="198.18.2.11", healthy=False)``
writes ``health service=web backend=198.18.2.11 healthy=false`` in text (logfmt:
values with spaces or quotes are quoted) and, with ``[log] format = "json"``,
``{"event": "health", "service": "web", ..., "msg": "..."}`` so the fields stay
typed for log pipelines. Plain ``log.info("...")`` calls still work in both.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from passlb.model import LogFormat

_FIELDS = "passlb_fields"  # LogRecord attribute carrying the structured fields
_EVENT = "passlb_event"


def format_value(value: object) -> str:
    """A logfmt value: bare when safe, else double-quoted with escapes."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    return json.dumps(text)


def kv_message(event: str, fields: dict[str, object]) -> str:
    """``event key=value key=value`` in the order given."""
    return " ".join([event, *(f"{k}={format_value(v)}" for k, v in fields.items())])


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    logger.log(
        level, kv_message(event, fields), extra={_EVENT: event, _FIELDS: fields}, stacklevel=2
    )


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, _EVENT, None)
        if event is not None:
            entry["event"] = event
            for key, value in getattr(record, _FIELDS, {}).items():
                entry.setdefault(key, _json_value(value))
        entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def setup_logging(level: str, fmt: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
