"""A real PROXY-protocol server behind the proxy: NGINX `listen ... proxy_protocol`.

NGINX runs as a single foreground process on an unprivileged loopback port,
with its own temporary config, logs and pid file, and is killed by pid.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passlb.dataplane.proxy import ProxyDriver
from passlb.dataplane.proxy.testing import desired, proxy_service, with_options
from passlb.model import ProxyProtocol

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONFIG = """
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr';
    access_log {dir}/access.log pp;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "client $proxy_protocol_addr $proxy_protocol_port\\n"; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is missing: ./run installs nginx-light (DEBIAN_PACKAGES)")
    directory = tmp_path_factory.mktemp("nginx")
    port = _free_port()
    (directory / "nginx.conf").write_text(CONFIG.format(dir=directory, port=port))
    process = subprocess.Popen(
        [NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", "stderr"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    _, err = process.communicate(timeout=5)
                    pytest.fail(f"nginx did not start: {err.decode(errors='replace')}")
                time.sleep(0.05)
        yield port, directory
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.parametrize("version", [ProxyProtocol.V1, ProxyProtocol.V2])
def test_nginx_sees_the_original_client(nginx: tuple[int, Path], version: ProxyProtocol) -> None:
    nginx_port, directory = nginx

    async def scenario() -> tuple[bytes, tuple[str, int]]:
        port = _free_port()
        svc = with_options(
            proxy_service("web", port, [("127.0.0.1", nginx_port)]), proxy_protocol=version
        )
        driver = ProxyDriver()
        driver.sync(desired(svc))
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.7", 0)
            )
            client = writer.get_extra_info("sockname")
            writer.write(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return response, client
        finally:
            await driver.aclose()

    response, (client_ip, client_port) = asyncio.run(scenario())
    assert response.startswith(b"HTTP/1.1 200"), response
    assert response.endswith(f"client {client_ip} {client_port}\n".encode()), response
    log = (directory / "access.log").read_text()
    assert f"{client_ip}:{client_port} 127.0.0.1" in log
