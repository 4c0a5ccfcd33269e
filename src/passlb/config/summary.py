"""A short human account of a valid config, for `passlb check`, and its warnings.

Warnings are valid settings that surprise people: they do not stop the
daemon, but an operator should read them once.
"""

from __future__ import annotations

from passlb.config._reader import format_duration
from passlb.model import (
    DEFAULT_POOL,
    AdminState,
    Config,
    HealthSpec,
    HealthType,
    Mode,
    Protocol,
    ProxyProtocol,
    Service,
    SniFallback,
)


def summarize(config: Config) -> str:
    backends = sum(len(service.backends) for service in config.services)
    interfaces = ", ".join(config.interfaces) if config.interfaces else "auto-detected"
    lines = [
        f"{_count(len(config.services), 'service')}, {_count(backends, 'backend')};"
        f" api on {config.api.listen}; interfaces: {interfaces};"
        f" log {config.log_level} ({config.log_format.value}){_workers(config)}"
    ]
    for service in config.services:
        lines.append(
            f"service {service.name}: {service.vip} {service.protocol.value}"
            f" ports {service.ports}, mode {service.mode.value}{_mode_details(service)}"
        )
        lines.append(f"  {_backends(service)}; health {_health(service.health)}")
        lines.extend(f"  warning: {warning}" for warning in service_warnings(service))
    return "\n".join(lines)


def config_warnings(config: Config) -> tuple[str, ...]:
    """Every warning of every service, each prefixed with its service path."""
    return tuple(
        f"services[{service.name}]: {warning}"
        for service in config.services
        for warning in service_warnings(service)
    )


def service_warnings(service: Service) -> tuple[str, ...]:
    warnings = list(service.deprecations)
    if service.snat:
        warnings.append("snat=true: backends will not see the client IP")
    if all(backend.backup for backend in service.backends):
        warnings.append("only backup backends: flows go to them as failover, never by plan")
    if all(backend.admin is not AdminState.ENABLED for backend in service.backends):
        warnings.append("no backend is enabled: new flows have nowhere to go")
    if service.health.type is HealthType.NONE:
        warnings.append("health type none: every backend counts as healthy")
    if service.protocol is Protocol.UDP and service.health.type is HealthType.TCP:
        warnings.append("protocol udp with a tcp health check: backends must also listen on TCP")
    proxy = service.proxy
    if proxy is not None:
        if proxy.proxy_protocol is ProxyProtocol.NONE and not proxy.transparent:
            warnings.append(
                "no proxy_protocol and not transparent:"
                " backends see the load balancer as the client"
            )
        default_pool_empty = all(backend.pool != DEFAULT_POOL for backend in service.backends)
        if (
            proxy.sni_routes
            and proxy.sni_fallback is SniFallback.DEFAULT_POOL
            and default_pool_empty
        ):
            warnings.append(
                "no backend in the default pool: connections that match no sni_routes are closed"
            )
    return tuple(warnings)


def _workers(config: Config) -> str:
    workers = config.proxy.workers
    if workers == 1:
        return ""  # the default: the relay runs in the daemon
    return f"; proxy workers {'auto (one per CPU)' if workers is None else workers}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _mode_details(service: Service) -> str:
    details = [f"affinity {service.affinity.value}"]
    if service.target_port is not None:
        details.append(f"to port {service.target_port}")
    if service.mode is Mode.DSR:
        details.append("backends need the VIP on lo (passlb backend-setup)")
    if service.proxy is not None:
        details.append(f"balance {service.proxy.balance.value}")
        if service.proxy.proxy_protocol is not ProxyProtocol.NONE:
            details.append(f"PROXY protocol {service.proxy.proxy_protocol.value}")
        if service.proxy.sni_routes:
            details.append(f"{_count(len(service.proxy.sni_routes), 'SNI route')}")
    return ", " + ", ".join(details)


def _backends(service: Service) -> str:
    backups = sum(1 for backend in service.backends if backend.backup)
    not_enabled = [
        f"{n} {state_name}"
        for state, state_name in ((AdminState.DRAIN, "draining"), (AdminState.DISABLED, "disabled"))
        if (n := sum(1 for backend in service.backends if backend.admin is state))
    ]
    parts = [f"{backups} backup" if backups else "", *not_enabled]
    detail = ", ".join(part for part in parts if part)
    return _count(len(service.backends), "backend") + (f" ({detail})" if detail else "")


def _health(health: HealthSpec) -> str:
    if health.type is HealthType.NONE:
        return "none"
    return (
        f"{health.type.value} every {format_duration(health.interval)}"
        f" (timeout {format_duration(health.timeout)}, rise {health.rise}, fall {health.fall})"
    )
