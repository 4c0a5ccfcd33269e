"""A small blocking client for the daemon's admin API (used by the CLI)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from passlb.errors import PasslbError


class ApiError(PasslbError):
    exit_code = 4  # the CLI's "admin API unreachable or request refused"


class ApiClient:
    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0) -> None:
        self.base = address if "://" in address else f"http://{address}"
        self.token = token
        self.timeout = timeout

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as err:
            try:
                payload = json.loads(err.read())
                detail = "\n  ".join([payload["error"], *payload.get("issues", [])])
            except (ValueError, KeyError, TypeError):
                detail = err.reason
            raise ApiError(f"{method} {path}: {err.code} {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ApiError(f"cannot reach the passlb daemon at {self.base}: {reason}") from None
