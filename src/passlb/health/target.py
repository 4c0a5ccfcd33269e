"""Where a backend's health check goes: which spec, address and port. Pure."""

from __future__ import annotations

from typing import NamedTuple

from passlb.errors import ConfigError, ConfigIssue
from passlb.model import Backend, HealthSpec, HealthType, IPAddress, Mode, Service

# Checks that open no connection and so need no port; they get port 0.
_PORTLESS = frozenset({HealthType.EXEC, HealthType.NONE})


class ProbeTarget(NamedTuple):
    address: IPAddress
    port: int


def health_spec(service: Service, backend: Backend) -> HealthSpec:
    """The backend's own check if it has one, else its service's."""
    return backend.health if backend.health is not None else service.health


def health_path(service: Service, backend: Backend) -> str:
    """The config path of the check that applies, for error messages."""
    where = "health" if backend.health is None else f"backends[{backend.key}].health"
    return f"services[{service.name}].{where}"


def probe_target(service: Service, backend: Backend) -> ProbeTarget:
    """The address and port a backend's check connects to.

    Port: the check's own port, else the backend's, else the port the service
    maps to (target_port), else the service's first port. Address: the
    backend's, except for a dsr check with probe_vip, which asks the VIP (the
    address the backend really serves in dsr).
    """
    spec = health_spec(service, backend)
    address = service.vip if service.mode is Mode.DSR and spec.probe_vip else backend.address
    port = spec.port or backend.port or service.target_port or _first_port(service)
    if port is None:
        if spec.type not in _PORTLESS:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"{health_path(service, backend)}.port",
                        f"a {spec.type} check needs a port: the service covers all ports "
                        "and the backend names none",
                    )
                ]
            )
        port = 0
    return ProbeTarget(address, port)


def _first_port(service: Service) -> int | None:
    if service.ports.all_ports or not service.ports.ranges:
        return None
    return service.ports.ranges[0].first
