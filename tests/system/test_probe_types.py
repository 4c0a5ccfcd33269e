"""Every probe type, run by the daemon against real servers: one good and one
bad backend per type, and only the good one gets new flows."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import trustme

from .daemon_harness import (
    PORT,
    EchoBackend,
    HttpHealthEndpoint,
    MakeDaemon,
    open_flows,
    proxy_service,
    start_udp_echo,
)

# fall 2: one probe may time out while the daemon's loop builds rings.
TIMING = "interval = 0.3\ntimeout = 0.25\nrise = 1\nfall = 2"
HEALTH_PORT = 8443


def _server_tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


async def test_each_probe_type_decides_who_serves(
    make_daemon: MakeDaemon, net: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    def pair(base: int) -> tuple[str, str]:
        return f"{net}.{base + 1}", f"{net}.{base + 2}"

    tcp, http, https, tls, udp, exe = (pair(base) for base in (20, 30, 40, 50, 60, 70))
    # Data servers: both backends of every TCP service answer, so only health
    # can keep the bad one out of the ring ("tcp" has none on its bad backend:
    # that is its failure).
    echoes = [EchoBackend("good", tcp[0])]
    for good, bad in (http, https, tls, exe):
        echoes += [EchoBackend("good", good), EchoBackend("bad", bad)]
    # The bad endpoint of each check type fails the way it does in real life.
    checks = [
        HttpHealthEndpoint(http[0], HEALTH_PORT, status=204),
        HttpHealthEndpoint(http[1], HEALTH_PORT, status=200),  # not the expected status
        HttpHealthEndpoint(https[0], HEALTH_PORT, tls=_server_tls(ca, "backend.test")),
        # A certificate our CA never signed.
        HttpHealthEndpoint(https[1], HEALTH_PORT, tls=_server_tls(trustme.CA(), "backend.test")),
        HttpHealthEndpoint(tls[0], HEALTH_PORT, tls=_server_tls(trustme.CA(), "any.test")),
    ]
    plain_on_tls_port = EchoBackend("plain", tls[1], HEALTH_PORT)  # speaks no TLS
    servers: list[EchoBackend | HttpHealthEndpoint] = [*echoes, *checks, plain_on_tls_port]
    for server in servers:
        await server.start()
    udp_echo = await start_udp_echo("good", udp[0], PORT)  # udp[1]: closed port

    def backends(addresses: tuple[str, str]) -> list[str]:
        return [f'address = "{a}"\nport = {PORT}' for a in addresses]

    is_good = f'"/bin/sh", "-c", "test \\"$PASSLB_BACKEND_ADDRESS\\" = {exe[0]}"'
    daemon = make_daemon(
        proxy_service("tcp", f"{net}.20", backends(tcp), health=f'type = "tcp"\n{TIMING}')
        + proxy_service(
            "http",
            f"{net}.30",
            backends(http),
            health=f'type = "http"\nport = {HEALTH_PORT}\npath = "/ready"\n'
            f"expect_status = [204]\n{TIMING}",
        )
        + proxy_service(
            "https",
            f"{net}.40",
            backends(https),
            health=f'type = "https"\nport = {HEALTH_PORT}\nverify_tls = true\n'
            f'ca_file = "{ca_file}"\nserver_name = "backend.test"\n{TIMING}',
        )
        + proxy_service(
            "tls",
            f"{net}.50",
            backends(tls),
            health=f'type = "tls"\nport = {HEALTH_PORT}\n{TIMING}',
        )
        + proxy_service(
            "udp",
            f"{net}.60",
            backends(udp),
            protocol="udp",
            health=f'type = "udp"\nrequest = "ping"\nexpect = "ping"\n{TIMING}',
        )
        + proxy_service(
            "exec",
            f"{net}.70",
            backends(exe),
            health=f'type = "exec"\ncommand = [{is_good}]\n{TIMING}',
        )
    )
    try:
        names = ("tcp", "http", "https", "tls", "udp", "exec")
        pairs = dict(zip(names, (tcp, http, https, tls, udp, exe), strict=True))

        def decided(doc: dict[str, object]) -> bool:
            return all(
                daemon.backend(doc, name, f"{good}:{PORT}")["role"] == "active"
                and daemon.backend(doc, name, f"{bad}:{PORT}")["role"] == "down"
                for name, (good, bad) in pairs.items()
            )

        doc = await daemon.wait_for(decided, 10.0, "every check's verdict")
        for name, (good, bad) in pairs.items():
            assert daemon.backend(doc, name, f"{good}:{PORT}")["health"] == "up", name
            assert daemon.backend(doc, name, f"{bad}:{PORT}")["health"] == "down", name

        for name in ("tcp", "http", "https", "tls", "exec"):
            vip = f"{net}.{names.index(name) * 10 + 20}"
            results = await open_flows(vip, 30)
            assert {r.backend for r in results} == {"good"}, name

        replies = await asyncio.gather(*(_udp_ask(f"{net}.60", f"q{i}") for i in range(20)))
        assert set(replies) == {b"good:" + f"q{i}".encode() for i in range(20)}
    finally:
        udp_echo.close()
        for server in [*echoes, plain_on_tls_port]:
            await server.kill()
        for check in checks:
            await check.stop()


async def _udp_ask(vip: str, text: str) -> bytes:
    """One datagram from its own socket (a new UDP flow); the reply datagram."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
            if not reply.done():
                reply.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(vip, PORT))
    try:
        transport.sendto(text.encode())
        return await asyncio.wait_for(reply, 2.0)
    finally:
        transport.close()
