"""Small builders of dsr services and desired states, for tests and the lab demo."""

from __future__ import annotations

from ipaddress import ip_address

from passlb.control.desired import compute_desired
from passlb.model import (
    AdminState,
    Backend,
    Config,
    ConnTracking,
    HealthSpec,
    HealthType,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)
from passlb.state import DesiredState

NO_CHECK = HealthSpec(type=HealthType.NONE)


def ports(*items: int | tuple[int, int]) -> PortSet:
    ranges = [PortRange(i, i) if isinstance(i, int) else PortRange(*i) for i in items]
    return PortSet(tuple(sorted(ranges)))


def service(
    name: str,
    vip: str,
    backends: list[str] | list[Backend],
    *,
    protocol: Protocol = Protocol.TCP,
    port_set: PortSet | None = None,
    ring_size: int = 307,
    flow_table_size: int = 1024,
) -> Service:
    pool = tuple(b if isinstance(b, Backend) else Backend(ip_address(b)) for b in backends)
    return Service(
        name=name,
        vip=ip_address(vip),
        protocol=protocol,
        ports=port_set if port_set is not None else ports(443),
        mode=Mode.DSR,
        backends=pool,
        health=NO_CHECK,
        ring_size=ring_size,
        hash_seed=0x1234,
        conntrack=ConnTracking(flow_table_size=flow_table_size),
    )


def desired(*services: Service) -> DesiredState:
    return compute_desired(Config(services=services), {}, {}, now=0.0)


def drained(svc: Service, key: str, admin: AdminState = AdminState.DRAIN) -> Service:
    from dataclasses import replace

    pool = tuple(replace(b, admin=admin) if b.key == key else b for b in svc.backends)
    return replace(svc, backends=pool)
