"""`passlb demo` without root: the `proxy` mode on loopback.

Three backends listen on 127.0.0.11-13; `passlb run` (a child process, as a
user would start it) relays the VIP 127.0.0.10 to them and tells each backend
the client's address in a PROXY protocol v2 header. The backends answer with
the client address they learned that way, so the table shows the client's
own address and source port reaching the backend. Then one backend stops and
its health check moves new flows away from it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from passlb.api.client import ApiClient, ApiError
from passlb.dataplane.proxy.proxy_protocol import NEED_MORE, ProxyHeader, ProxyHeaderParser
from passlb.errors import PasslbError

VIP = "127.0.0.10"
BACKENDS = {"b1": "127.0.0.11", "b2": "127.0.0.12", "b3": "127.0.0.13"}
PORT = 18443
API = "127.0.0.1:19180"
CHECK_INTERVAL = 0.5
CHECK_FALL = 2


def proxy_config() -> str:
    backends = "".join(
        f'\n[[services.backends]]\naddress = "{addr}"\nport = {PORT}\n'
        for addr in BACKENDS.values()
    )
    return f"""\
[api]
listen = "{API}"

[[services]]
name = "web"
vip = "{VIP}"
protocol = "tcp"
ports = [{PORT}]
mode = "proxy"
proxy_protocol = "v2"

[services.health]
type = "tcp"
interval = "{CHECK_INTERVAL}s"
timeout = "0.3s"
rise = 2
fall = {CHECK_FALL}
{backends}"""


async def _backend(name: str, address: str) -> asyncio.Server:
    """Reads the PROXY v2 header and answers with the client it names."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = ProxyHeaderParser()
        result: ProxyHeader | object = NEED_MORE
        try:
            while result is NEED_MORE:
                data = await reader.read(256)
                if not data:
                    return
                result = parser.feed(data)
            assert isinstance(result, ProxyHeader)
            client = result.addresses
            reply = {
                "backend": name,
                "tcp_peer": list(writer.get_extra_info("peername")[:2]),
                "client": None if client is None else [str(client.src), client.src_port],
            }
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, PasslbError):
            pass  # a health check's bare connect, or a reset: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(serve, address, PORT)


async def _request() -> dict[str, object]:
    reader, writer = await asyncio.open_connection(VIP, PORT)
    own = writer.get_extra_info("sockname")
    try:
        line = await asyncio.wait_for(reader.readline(), 2.0)
    finally:
        writer.close()
    reply: dict[str, object] = json.loads(line) if line else {"error": "no reply"}
    reply["own"] = [own[0], own[1]]
    return reply


async def _flows(count: int) -> list[dict[str, object]]:
    replies = []
    for _ in range(count):  # sequential: each a new connection and a new source port
        try:
            replies.append(await _request())
        except (OSError, TimeoutError, ValueError) as err:
            replies.append({"error": str(err)})
    return replies


def _table(replies: list[dict[str, object]]) -> str:
    by_backend: dict[str, list[dict[str, object]]] = collections.defaultdict(list)
    for r in replies:
        by_backend[str(r.get("backend", "failed"))].append(r)
    rows = [f"  {'backend':<8} {'flows':>6}  {'TCP peer seen':<16} client from PROXY v2 header"]
    for name in [*BACKENDS, "failed"]:
        got = by_backend.get(name, [])
        if name == "failed" and not got:
            continue
        peers = sorted({str(r["tcp_peer"][0]) for r in got if "tcp_peer" in r})  # type: ignore[index]
        exact = sum(1 for r in got if r.get("client") == r.get("own"))
        rows.append(
            f"  {name:<8} {len(got):>6}  {','.join(peers) or '-':<16} "
            f"{exact} of {len(got)} name the client's own address and source port"
        )
    return "\n".join(rows)


async def _wait_for_daemon(daemon: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    client = ApiClient(API, timeout=1.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise PasslbError(f"the passlb daemon exited with status {daemon.returncode}")
        try:
            doc = await asyncio.to_thread(client.get, "/api/v1/status")
            if doc["applies"] > 0 and doc["last_apply"]["error"] is None:
                return
        except ApiError:
            pass
        await asyncio.sleep(0.2)
    raise PasslbError("the passlb daemon did not apply its config in time")


async def _demo(flows: int) -> bool:
    servers = {name: await _backend(name, addr) for name, addr in BACKENDS.items()}
    workdir = Path(tempfile.mkdtemp(prefix="passlb-demo-"))
    config = workdir / "passlb.toml"
    config.write_text(proxy_config())
    print(f"backends {', '.join(f'{n}={a}:{PORT}' for n, a in BACKENDS.items())}")
    print(f"running: passlb run {config}  (mode proxy, VIP {VIP}:{PORT}, PROXY protocol v2)")
    with open(workdir / "daemon.log", "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "passlb.cli", "run", str(config)], stderr=log
        )
    try:
        await _wait_for_daemon(daemon)
        first = await _flows(flows)
        print(f"\n{flows} TCP flows to {VIP}:{PORT}:")
        print(_table(first))
        print(
            "\nThe TCP peer each backend sees is the proxy; the client's own address and"
            "\nsource port arrive in the PROXY v2 header, before any payload byte."
        )
        servers["b2"].close()
        await servers["b2"].wait_closed()
        print("\nStopped b2; its health check fails ...")
        await asyncio.sleep(CHECK_INTERVAL * (CHECK_FALL + 2))
        after = await _flows(flows)
        print(f"{flows} new TCP flows after b2 failed:")
        print(_table(after))
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "passlb.cli", "status", "--api", API],
            capture_output=True,
            text=True,
        )
        print("\n$ passlb status\n" + status.stdout + status.stderr)
        return all("backend" in r for r in first + after) and not any(
            r.get("backend") == "b2" for r in after
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        for server in servers.values():
            server.close()


def run_proxy_demo(flows: int) -> int:
    ok = asyncio.run(_demo(flows))
    print("demo done" + ("" if ok else " (some checks FAILED)"))
    return 0 if ok else 1
