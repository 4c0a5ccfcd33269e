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

    Address: the backend's, except for a dsr check with probe_vip, which asks
    the VIP (the address the backend really serves in dsr). Port: probe_port;
    ConfigError when the check needs one and there is none (the config loader
    reports the same, with its line, through missing_probe_port).
    """
    spec = health_spec(service, backend)
    address = service.vip if service.mode is Mode.DSR and spec.probe_vip else backend.address
    problem = missing_probe_port(service, backend)
    if problem is not None:
        raise ConfigError([ConfigIssue(f"{health_path(service, backend)}.port", problem)])
    return ProbeTarget(address, probe_port(service, backend) or 0)


def probe_port(service: Service, backend: Backend) -> int | None:
    """The check's own port, else the backend's, else the port the service
    maps to (target_port), else the service's first port; None for a service
    on all ports with none of these."""
    spec = health_spec(service, backend)
    return spec.port or backend.port or service.target_port or _first_port(service)


def missing_probe_port(service: Service, backend: Backend) -> str | None:
    """Why the backend's check cannot run for want of a port, or None when it can."""
    spec = health_spec(service, backend)
    if spec.type in _PORTLESS or probe_port(service, backend) is not None:
        return None
    return (
        f"a {spec.type} check needs a port: the service covers all ports "
        'and the backend names none; set the check\'s port (or type = "none")'
    )


def _first_port(service: Service) -> int | None:
    if service.ports.all_ports or not service.ports.ranges:
        return None
    return service.ports.ranges[0].first
