"""Helpers for tests of the proxy driver and for code that embeds it.

Real bytes, not mocks: ClientHellos come from Python's own TLS stack, desired
states carry a real Maglev ring.
"""

from __future__ import annotations

import contextlib
import ssl
import struct
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import ip_address

from passlb.hashing.flowkey import service_seed
from passlb.hashing.maglev import build_ring
from passlb.model import (
    Backend,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    ProxyOptions,
    Service,
)
from passlb.state import BackendDesired, BackendRole, DesiredState, ServiceDesired


def client_hello(server_name: str | None, *, tls13: bool = True) -> bytes:
    """The first flight of a real Python TLS client: one record holding a ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if not tls13:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(records: bytes, fragment_size: int) -> bytes:
    """The same handshake bytes re-cut into TLS records of at most fragment_size bytes."""
    handshake = bytearray()
    offset = 0
    version = records[1:3]
    while offset < len(records):
        (length,) = struct.unpack_from("!H", records, offset + 3)
        handshake += records[offset + 5 : offset + 5 + length]
        offset += 5 + length
    out = bytearray()
    for start in range(0, len(handshake), fragment_size):
        chunk = handshake[start : start + fragment_size]
        out += bytes([22]) + version + struct.pack("!H", len(chunk)) + chunk
    return bytes(out)


def proxy_service(
    name: str,
    port: int | Sequence[int],
    backends: Sequence[tuple[str, int] | Backend],
    *,
    protocol: Protocol = Protocol.TCP,
    vip: str = "127.0.0.1",
    options: ProxyOptions | None = None,
    ring_size: int = 1009,  # prime, 100 slots for each of up to 10 backends
    drain_timeout: float = 30.0,
) -> Service:
    ports = [port] if isinstance(port, int) else list(port)
    return Service(
        name=name,
        vip=ip_address(vip),
        protocol=protocol,
        ports=PortSet(ranges=tuple(PortRange(p, p) for p in sorted(ports))),
        mode=Mode.PROXY,
        backends=tuple(
            b if isinstance(b, Backend) else Backend(address=ip_address(b[0]), port=b[1])
            for b in backends
        ),
        ring_size=ring_size,
        drain_timeout=drain_timeout,
        proxy=options or ProxyOptions(),
    )


def desired_for(
    service: Service,
    *,
    roles: dict[str, BackendRole] | None = None,
    cut: Sequence[str] = (),
) -> ServiceDesired:
    """ACTIVE backends (unless `roles` says otherwise) in a real Maglev ring."""
    roles = roles or {}
    backends = tuple(
        BackendDesired(
            key=b.key,
            address=b.address,
            port=b.port,
            weight=b.weight if roles.get(b.key, BackendRole.ACTIVE) is BackendRole.ACTIVE else 0,
            role=roles.get(b.key, BackendRole.ACTIVE),
            healthy=True,
            cut_flows=b.key in cut,
        )
        for b in service.backends
    )
    weighted = [(b.key, b.weight) for b in backends]
    ring = build_ring(weighted, service.ring_size) if any(w for _, w in weighted) else None
    return ServiceDesired(service=service, seed=service_seed(service), backends=backends, ring=ring)


def desired(*services: Service | ServiceDesired) -> DesiredState:
    return DesiredState(
        services=tuple(s if isinstance(s, ServiceDesired) else desired_for(s) for s in services)
    )


def with_options(service: Service, **changes: object) -> Service:
    options = replace(service.proxy or ProxyOptions(), **changes)  # type: ignore[arg-type]
    return replace(service, proxy=options)
