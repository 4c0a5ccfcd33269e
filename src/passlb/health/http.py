"""A minimal HTTP/1.1 client for health checks, over asyncio streams.

One request per connection (``Connection: close``), so no keep-alive or
pipelining. It reads the status line and headers, and the body only when the
caller asks for it, decoding chunked transfer coding (RFC 9112 section 7.1),
up to a size limit: a check needs a prefix to match, never a whole page.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
DEFAULT_BODY_LIMIT = 64 * 1024


class HttpResponseError(ValueError):
    """The backend sent something that is not an HTTP/1.x response."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in received order
    body: bytes  # empty unless read; at most the body limit

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


def build_request(method: str, path: str, host: str) -> bytes:
    for label, value in (("method", method), ("path", path), ("host", host)):
        if not value or any(c in value for c in "\r\n\0") or (label != "host" and " " in value):
            raise ValueError(f"invalid HTTP {label} {value!r}")
    return (
        f"{method} {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: passlb-health\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("latin-1")


async def exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    method: str,
    path: str,
    host: str,
    read_body: bool,
    body_limit: int = DEFAULT_BODY_LIMIT,
) -> HttpResponse:
    """Send one request and read its response (raises on malformed replies)."""
    writer.write(build_request(method, path, host))
    await writer.drain()
    status, reason = _parse_status_line(await _read_line(reader, "status line"))
    headers = await _read_headers(reader)
    response = HttpResponse(status, reason, headers, b"")
    if not read_body or not _has_body(method, status):
        return response
    return HttpResponse(status, reason, headers, await _read_body(reader, response, body_limit))


async def _read_line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise HttpResponseError(f"connection closed before the {what}") from exc
    except asyncio.LimitOverrunError as exc:
        raise HttpResponseError(f"{what} too long") from exc
    return line.rstrip(b"\r\n")


def _parse_status_line(line: bytes) -> tuple[int, str]:
    version, _, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HttpResponseError(f"not an HTTP/1.x status line: {line[:80]!r}")
    return int(code), reason.decode("latin-1")


async def _read_headers(reader: asyncio.StreamReader) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    total = 0
    while True:
        line = await _read_line(reader, "end of the headers")
        if not line:
            return tuple(headers)
        total += len(line)
        if total > MAX_HEADER_BYTES or len(headers) >= MAX_HEADERS:
            raise HttpResponseError("response headers too large")
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpResponseError(f"malformed header line {line[:80]!r}")
        headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))


def _has_body(method: str, status: int) -> bool:
    # RFC 9112 section 6.3: HEAD replies, 1xx, 204 and 304 never carry a body.
    return method.upper() != "HEAD" and status >= 200 and status not in (204, 304)


async def _read_body(reader: asyncio.StreamReader, response: HttpResponse, limit: int) -> bytes:
    encoding = response.header("transfer-encoding")
    if encoding is not None and encoding.lower().endswith("chunked"):
        return await _read_chunked(reader, limit)
    length = response.header("content-length")
    if length is not None:
        if not length.isdigit():
            raise HttpResponseError(f"invalid Content-Length {length!r}")
        return await _read_exactly(reader, min(int(length), limit))
    # No framing: the body runs to the end of the connection.
    return await _read_until_eof(reader, limit)


async def _read_until_eof(reader: asyncio.StreamReader, limit: int) -> bytes:
    # read(n) returns what has arrived so far; loop until EOF or the limit.
    parts: list[bytes] = []
    size = 0
    while size < limit:
        part = await reader.read(limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise HttpResponseError(
            f"body ended after {len(exc.partial)} of {size} bytes announced"
        ) from exc


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    body = bytearray()
    while len(body) < limit:
        size_line = await _read_line(reader, "chunk size")
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise HttpResponseError(f"invalid chunk size {size_line[:40]!r}") from exc
        if size == 0:
            break
        body += await _read_exactly(reader, min(size, limit - len(body)))
        if len(body) < limit:
            await _read_line(reader, "end of a chunk")
    return bytes(body[:limit])
