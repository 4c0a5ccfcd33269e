"""A small blocking client for the daemon's admin API (used by the CLI).

Addresses as in ``[api] listen``: "127.0.0.1:9180", "http://host:port", or
"unix:/run/passlb.sock".
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

from passlb.errors import PasslbError


class ApiError(PasslbError):
    exit_code = 4  # the CLI's "admin API unreachable or request refused"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class ApiClient:
    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout

    def get(self, path: str) -> dict[str, Any]:
        return json.loads(self.get_text(path) or "{}")  # type: ignore[no-any-return]

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self._request("POST", path, body) or "{}")  # type: ignore[no-any-return]

    def get_text(self, path: str) -> str:
        return self._request("GET", path, None)

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.startswith("unix:"):
            return _UnixConnection(self.address.removeprefix("unix:"), self.timeout)
        url = urllib.parse.urlsplit(
            self.address if "://" in self.address else f"http://{self.address}"
        )
        if url.scheme == "https":
            return http.client.HTTPSConnection(url.netloc, timeout=self.timeout)
        return http.client.HTTPConnection(url.netloc, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> str:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection()
        try:
            conn.request(
                method, path, json.dumps(body).encode() if body is not None else None, headers
            )
            resp = conn.getresponse()
            text = resp.read().decode()
        except (OSError, http.client.HTTPException) as err:
            raise ApiError(f"cannot reach the passlb daemon at {self.address}: {err}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                payload = json.loads(text)
                detail = "\n  ".join([payload["error"], *payload.get("issues", [])])
            except (ValueError, KeyError, TypeError):
                detail = resp.reason
            raise ApiError(f"{method} {path}: {resp.status} {detail}")
        return text
