"""Which address and port a check asks, and the scheduler's pure helpers."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passlb.errors import ConfigError
from passlb.health.scheduler import first_probe_delay, plan_checks
from passlb.health.target import ProbeTarget, health_spec, probe_target
from passlb.model import (
    Backend,
    Config,
    HealthSpec,
    HealthType,
    Mode,
    PortRange,
    PortSet,
    Protocol,
    Service,
)

VIP = IPv4Address("198.18.0.10")
B1 = IPv4Address("198.18.1.11")


def service(
    *backends: Backend,
    mode: Mode = Mode.NAT,
    ports: PortSet | None = None,
    health: HealthSpec | None = None,
    target_port: int | None = None,
) -> Service:
    return Service(
        name="web",
        vip=VIP,
        protocol=Protocol.TCP,
        ports=ports or PortSet((PortRange(443, 443), PortRange(8000, 8010))),
        mode=mode,
        backends=backends,
        health=health or HealthSpec(),
        target_port=target_port,
    )


@pytest.mark.parametrize(
    ("spec_port", "backend_port", "target_port", "expected"),
    [
        (9000, 8080, 8443, 9000),  # the check's own port first
        (None, 8080, 8443, 8080),  # then the backend's
        (None, None, 8443, 8443),  # then the port the service maps to
        (None, None, None, 443),  # then the service's first port
    ],
)
def test_port_precedence(
    spec_port: int | None, backend_port: int | None, target_port: int | None, expected: int
) -> None:
    backend = Backend(B1, port=backend_port)
    svc = service(backend, health=HealthSpec(port=spec_port), target_port=target_port)
    assert probe_target(svc, backend) == ProbeTarget(B1, expected)


def test_backend_check_overrides_the_service_check() -> None:
    own = HealthSpec(type=HealthType.HTTP, port=81)
    backend = Backend(B1, health=own)
    svc = service(backend, health=HealthSpec(port=99))
    assert health_spec(svc, backend) is own
    assert probe_target(svc, backend).port == 81
    plain = Backend(IPv4Address("198.18.1.12"))
    assert health_spec(service(plain), plain) == HealthSpec()


def test_dsr_probe_vip_asks_the_vip() -> None:
    backend = Backend(B1)
    on_vip = HealthSpec(probe_vip=True)
    assert probe_target(service(backend, mode=Mode.DSR, health=on_vip), backend).address == VIP
    assert probe_target(service(backend, mode=Mode.DSR), backend).address == B1
    # probe_vip means nothing outside dsr: nat backends do not hold the VIP.
    assert probe_target(service(backend, mode=Mode.NAT, health=on_vip), backend).address == B1


def test_ipv6_backend() -> None:
    address = IPv6Address("2001:db8::1")
    backend = Backend(address, port=8080)
    assert probe_target(service(backend), backend) == ProbeTarget(address, 8080)


def test_all_ports_service_needs_a_check_port() -> None:
    backend = Backend(B1)
    svc = service(backend, mode=Mode.DSR, ports=PortSet(all_ports=True))
    with pytest.raises(ConfigError) as caught:
        probe_target(svc, backend)
    (issue,) = caught.value.issues
    assert issue.path == "services[web].health.port"
    assert "tcp check needs a port" in issue.message

    own = Backend(B1, health=HealthSpec(type=HealthType.HTTP))
    with pytest.raises(ConfigError, match=r"backends\[198\.18\.1\.11\]\.health\.port"):
        probe_target(service(own, ports=PortSet(all_ports=True)), own)


@pytest.mark.parametrize("kind", [HealthType.EXEC, HealthType.NONE])
def test_portless_checks_get_port_zero(kind: HealthType) -> None:
    backend = Backend(B1)
    svc = service(backend, ports=PortSet(all_ports=True), health=HealthSpec(type=kind))
    assert probe_target(svc, backend) == ProbeTarget(B1, 0)


def test_plan_checks_covers_every_backend_with_the_service_vip() -> None:
    b1, b2 = Backend(B1, port=8080), Backend(IPv4Address("198.18.1.12"), port=8081)
    plans = plan_checks(Config(services=(service(b1, b2),)))
    assert set(plans) == {("web", "198.18.1.11:8080"), ("web", "198.18.1.12:8081")}
    plan = plans[("web", "198.18.1.12:8081")]
    assert (plan.address, plan.port, plan.vip) == (IPv4Address("198.18.1.12"), 8081, VIP)


@given(
    service_name=st.text(max_size=20),
    backend_key=st.text(max_size=30),
    interval=st.floats(0.01, 3600),
)
def test_first_probe_delay_is_deterministic_and_inside_the_interval(
    service_name: str, backend_key: str, interval: float
) -> None:
    delay = first_probe_delay((service_name, backend_key), interval)
    assert 0 <= delay < interval
    assert delay == first_probe_delay((service_name, backend_key), interval)


def test_first_probe_delays_spread_over_the_interval() -> None:
    delays = [first_probe_delay(("web", f"198.18.1.{i}"), 1.0) for i in range(200)]
    # 200 backends over 10 buckets of 0.1 s: every bucket holds some (not all at once).
    buckets = {int(d * 10) for d in delays}
    assert buckets == set(range(10))
    assert len(set(delays)) == 200


def test_plan_checks_refuses_timings_that_spin_or_never_decide() -> None:
    spinning = HealthSpec(interval=0, timeout=-1, rise=0, fall=0)
    b1, b2 = Backend(B1), Backend(IPv4Address("198.18.1.12"))
    own = Backend(IPv4Address("198.18.1.13"), health=HealthSpec(fall=0))
    with pytest.raises(ConfigError) as caught:
        plan_checks(Config(services=(service(b1, b2, own, health=spinning),)))
    # One issue per field of each check, not one per backend sharing it.
    assert [(issue.path, issue.message) for issue in caught.value.issues] == [
        ("services[web].health.interval", "must be positive, got 0"),
        ("services[web].health.timeout", "must be positive, got -1"),
        ("services[web].health.rise", "must be at least 1, got 0"),
        ("services[web].health.fall", "must be at least 1, got 0"),
        ("services[web].backends[198.18.1.13].health.fall", "must be at least 1, got 0"),
    ]


def test_pure_modules_import_no_io() -> None:
    code = (
        "import sys, passlb.health.policy, passlb.health.target\n"
        "print(sorted({'asyncio', 'socket', 'ssl', 'subprocess'} & set(sys.modules)))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"
