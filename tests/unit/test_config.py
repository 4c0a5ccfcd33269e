"""The config loader on valid files: every field reaches the model, defaults hold."""

from __future__ import annotations

import tomllib
from ipaddress import ip_address, ip_network
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passlb.config import config_warnings, load_config, parse_config, summarize
from passlb.config._reader import duration, format_duration
from passlb.config.schema import config_schema
from passlb.errors import ConfigError, ConfigIssue
from passlb.model import (
    AdminState,
    Affinity,
    AllUnhealthy,
    ApiSettings,
    Backend,
    Balance,
    ClientRules,
    Config,
    ConnTracking,
    HealthSpec,
    HealthType,
    LogFormat,
    Mode,
    PersistOnUnhealthy,
    PortRange,
    PortSet,
    Protocol,
    ProxyOptions,
    ProxyProtocol,
    Service,
    SniFallback,
    SniRoute,
)

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))

EVERY_FIELD = """
interfaces = ["eth0", "eth1"]

[api]
listen = "198.18.0.1:9180"
token = "s3cret"

[log]
level = "debug"
format = "json"

[[services]]
name = "edge"
vip = "198.18.0.30"
protocol = "tcp+udp"
ports = 443
mode = "proxy"
affinity = "client-ip"
target_port = 8443
ring_size = 1009
hash_seed = 42
drain_timeout = "1m30s"
all_unhealthy = "drop"
failover_ratio = 0.25
proxy_protocol = "v2"

[services.conntrack]
tcp_timeout = "10m"
udp_timeout = 45
persist_on_unhealthy = "never"
flow_table_size = 4096

[services.health]
type = "https"
port = 8444
interval = "3s"
timeout = "750ms"
rise = 4
fall = 5
method = "HEAD"
path = "/healthz?full=1"
host = "Edge.Example.com"
expect_status = [204, 200, 204]
body_match = "ok"
verify_tls = true
ca_file = "/etc/passlb/ca.pem"
server_name = "edge.example.com"
slow_start = "20s"

[services.proxy]
transparent = true
balance = "round-robin"
sni_fallback = "close"
sni_timeout = "2s"
max_connections = 1000
max_connections_per_backend = 100
connect_timeout = "1.5s"
idle_timeout = "1h"
max_udp_sessions = 512
trust_inbound_proxy_protocol = true
allow_clients = ["198.18.0.0/15", "198.18.7.7"]
sni_routes = [
  { server_names = ["Shop.Example.com", "*.shop.example.com"], pool = "shop" },
]

[[services.backends]]
address = "198.18.4.11"
port = 9443
weight = 3
backup = true
state = "drain"
pool = "shop"

[[services.backends]]
address = "2001:db8::12"
[services.backends.health]
type = "udp"
request = "ping"
expect_hex = "706f6e67"
rise = 1

[[services.backends]]
address = "198.18.4.13"
state = "disabled"
[services.backends.health]
interval = "5s"
path = "/other"

[[services]]
name = "dns"
vip = "198.18.0.53"
protocol = "udp"
ports = [53, "5300-5310"]
mode = "dsr"
affinity = "client-ip-proto"

[services.health]
type = "exec"
command = ["/usr/local/bin/check-dns", "--fast"]
probe_vip = true

[[services.backends]]
address = "198.18.5.11"

[[services]]
name = "nat-all"
vip = "198.18.0.60"
ports = "all"
mode = "nat"
snat = true

[services.health]
type = "tls"
port = 443
verify_tls = false

[[services.backends]]
address = "198.18.6.11"
"""


def test_every_field_reaches_the_model() -> None:
    config = parse_config(EVERY_FIELD)
    service_health = HealthSpec(
        type=HealthType.HTTPS,
        port=8444,
        interval=3.0,
        timeout=0.75,
        rise=4,
        fall=5,
        method="HEAD",
        path="/healthz?full=1",
        host="edge.example.com",
        expect_status=(200, 204),
        body_match="ok",
        verify_tls=True,
        ca_file="/etc/passlb/ca.pem",
        server_name="edge.example.com",
        slow_start=20.0,
    )
    edge = Service(
        name="edge",
        vip=ip_address("198.18.0.30"),
        protocol=Protocol.TCP_UDP,
        ports=PortSet((PortRange(443, 443),)),
        mode=Mode.PROXY,
        backends=(
            Backend(
                address=ip_address("198.18.4.11"),
                port=9443,
                weight=3,
                backup=True,
                admin=AdminState.DRAIN,
                pool="shop",
            ),
            # Another check type: only port, timing and rise/fall come from the service.
            Backend(
                address=ip_address("2001:db8::12"),
                health=HealthSpec(
                    type=HealthType.UDP,
                    port=8444,
                    interval=3.0,
                    timeout=0.75,
                    rise=1,
                    fall=5,
                    slow_start=20.0,
                    request=b"ping",
                    expect=b"pong",
                ),
            ),
            # The same check type: every service field, then the backend's own.
            Backend(
                address=ip_address("198.18.4.13"),
                admin=AdminState.DISABLED,
                health=HealthSpec(**{**service_health.__dict__, "interval": 5.0, "path": "/other"}),
            ),
        ),
        health=service_health,
        affinity=Affinity.CLIENT_IP,
        target_port=8443,
        conntrack=ConnTracking(
            tcp_timeout=600.0,
            udp_timeout=45.0,
            persist_on_unhealthy=PersistOnUnhealthy.NEVER,
            flow_table_size=4096,
        ),
        drain_timeout=90.0,
        all_unhealthy=AllUnhealthy.DROP,
        failover_ratio=0.25,
        ring_size=1009,
        hash_seed=42,
        proxy=ProxyOptions(
            proxy_protocol=ProxyProtocol.V2,
            transparent=True,
            balance=Balance.ROUND_ROBIN,
            sni_routes=(SniRoute(("shop.example.com", "*.shop.example.com"), "shop"),),
            sni_fallback=SniFallback.CLOSE,
            sni_timeout=2.0,
            max_connections=1000,
            max_connections_per_backend=100,
            connect_timeout=1.5,
            idle_timeout=3600.0,
            max_udp_sessions=512,
            trust_inbound_proxy_protocol=True,
        ),
        clients=ClientRules(allow=(ip_network("198.18.0.0/15"), ip_network("198.18.7.7/32"))),
        deprecations=(
            "proxy.allow_clients is deprecated: write allow_clients on the service itself"
            " ([[services]]), where every mode reads it",
        ),
    )
    dns = Service(
        name="dns",
        vip=ip_address("198.18.0.53"),
        protocol=Protocol.UDP,
        ports=PortSet((PortRange(53, 53), PortRange(5300, 5310))),
        mode=Mode.DSR,
        backends=(Backend(address=ip_address("198.18.5.11")),),
        health=HealthSpec(
            type=HealthType.EXEC, command=("/usr/local/bin/check-dns", "--fast"), probe_vip=True
        ),
        affinity=Affinity.CLIENT_IP_PROTO,
    )
    nat_all = Service(
        name="nat-all",
        vip=ip_address("198.18.0.60"),
        protocol=Protocol.TCP,
        ports=PortSet(all_ports=True),
        mode=Mode.NAT,
        backends=(Backend(address=ip_address("198.18.6.11")),),
        health=HealthSpec(type=HealthType.TLS, port=443),
        snat=True,
    )
    assert config == Config(
        services=(edge, dns, nat_all),
        interfaces=("eth0", "eth1"),
        api=ApiSettings(listen="198.18.0.1:9180", token="s3cret"),
        log_level="debug",
        log_format=LogFormat.JSON,
    )


MINIMAL = """
[[services]]
name = "web"
vip = "198.18.0.10"
ports = 80
mode = "dsr"

[[services.backends]]
address = "198.18.2.11"
"""


def test_defaults_of_a_minimal_file() -> None:
    assert parse_config(MINIMAL) == Config(
        services=(
            Service(
                name="web",
                vip=ip_address("198.18.0.10"),
                protocol=Protocol.TCP,
                ports=PortSet((PortRange(80, 80),)),
                mode=Mode.DSR,
                backends=(Backend(address=ip_address("198.18.2.11")),),
            ),
        )
    )


def test_proxy_mode_without_a_proxy_table_gets_default_options() -> None:
    text = MINIMAL.replace('"dsr"', '"proxy"')
    assert parse_config(text).services[0].proxy == ProxyOptions()


def test_a_file_without_services_is_valid() -> None:
    assert parse_config("") == Config(services=())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    config = load_config(path)
    assert config.services
    assert all(service.backends for service in config.services)


def test_the_examples_cover_every_mode_and_ip_version() -> None:
    services = [service for path in EXAMPLES for service in load_config(path).services]
    assert {service.mode for service in services} == set(Mode)
    assert {service.vip.version for service in services} == {4, 6}
    assert any(service.ports.all_ports for service in services)
    assert any(s.proxy and s.proxy.proxy_protocol is ProxyProtocol.V2 for s in services)
    assert any(s.proxy and len({r.pool for r in s.proxy.sni_routes}) == 2 for s in services)


def test_example_addresses_stay_in_test_and_documentation_ranges() -> None:
    allowed = [ip_network("198.18.0.0/15"), ip_network("2001:db8::/32")]
    for path in EXAMPLES:
        for service in load_config(path).services:
            for address in (service.vip, *(b.address for b in service.backends)):
                assert any(address in network for network in allowed), (path, address)


# -- details of single fields --------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ("443", PortSet((PortRange(443, 443),))),
        ('"8000-8100"', PortSet((PortRange(8000, 8100),))),
        (
            '[8443, "1-1024", 65535]',
            PortSet((PortRange(1, 1024), PortRange(8443, 8443), PortRange(65535, 65535))),
        ),
        ('"all"', PortSet(all_ports=True)),
    ],
)
def test_port_spellings(ports: str, expected: PortSet) -> None:
    text = MINIMAL.replace("ports = 80", f"ports = {ports}")
    text += "[services.health]\nport = 80\n"  # the check's port when the service has all
    assert parse_config(text).services[0].ports == expected


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        (7, 7.0),
        (0.5, 0.5),
    ],
)
def test_duration_spellings(written: str | float, seconds: float) -> None:
    assert duration()(written) == seconds


A_DURATION = "expected a duration like '2s', '250ms', '1m30s' or a number of seconds, got "


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (
            "nan",
            A_DURATION + "float nan",
        ),
        (
            "inf",
            A_DURATION + "float inf",
        ),
        (
            "true",
            A_DURATION + "boolean true",
        ),
        (
            '"2 s"',
            A_DURATION + "string '2 s'",
        ),
        (
            '"8d"',
            A_DURATION + "string '8d'",
        ),
        ('"169h"', "must be at most 7 days, got 169h"),
        ("-3", "must be more than 0, got -3"),
        ('"0s"', "must be more than 0, got 0s"),
    ],
)
def test_bad_durations(written: str, message: str) -> None:
    text = MINIMAL.replace(
        "[[services.backends]]",
        f"[services.conntrack]\ntcp_timeout = {written}\n\n[[services.backends]]",
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [str(i) for i in caught.value.issues] == [
        f"services[web].conntrack.tcp_timeout: {message} (line 9)"
    ]


@given(st.integers(min_value=1, max_value=7 * 24 * 3600 * 1000))
def test_durations_print_in_a_form_they_parse_back_from(milliseconds: int) -> None:
    seconds = milliseconds / 1000
    assert duration()(format_duration(seconds)) == pytest.approx(seconds)


def test_proxy_protocol_may_sit_in_the_proxy_table() -> None:
    text = MINIMAL.replace('"dsr"', '"proxy"') + '[services.proxy]\nproxy_protocol = "v1"\n'
    proxy = parse_config(text).services[0].proxy
    assert proxy is not None and proxy.proxy_protocol is ProxyProtocol.V1


def test_ipv6_service_and_backend_keys() -> None:
    text = """
[[services]]
name = "v6"
vip = "2001:db8::10"
ports = 443
mode = "nat"

[[services.backends]]
address = "2001:db8::11"
port = 8443
"""
    service = parse_config(text).services[0]
    assert service.backends[0].key == "[2001:db8::11]:8443"


def test_the_same_port_on_different_vips_or_transports_is_fine() -> None:
    text = (
        MINIMAL
        + MINIMAL.replace('"web"', '"web-udp"').replace(
            "ports = 80", 'ports = 80\nprotocol = "udp"'
        )
        + MINIMAL.replace('"web"', '"other"').replace('"198.18.0.10"', '"198.18.0.11"')
    )
    assert [s.name for s in parse_config(text).services] == ["web", "web-udp", "other"]


def test_a_public_api_with_a_token_and_a_loopback_or_unix_api_without_one() -> None:
    for listen in ("127.0.0.1:1", "[::1]:9180", "localhost:9180", "unix:/run/passlb.sock"):
        config = parse_config(f'[api]\nlisten = "{listen}"\n')
        assert config.api == ApiSettings(listen=listen)


def test_api_reads_without_token() -> None:
    text = '[api]\nlisten = "198.18.0.1:9180"\ntoken = "s3cret"\nread_without_token = true\n'
    assert parse_config(text).api == ApiSettings(
        listen="198.18.0.1:9180", token="s3cret", read_without_token=True
    )
    with pytest.raises(ConfigError, match=r"api\.read_without_token"):
        parse_config(text.replace("= true", '= "yes"'))


def test_a_big_service_with_a_big_enough_prime_ring() -> None:
    backends = "".join(
        f'[[services.backends]]\naddress = "198.18.{2 + i // 250}.{1 + i % 250}"\n'
        for i in range(700)
    )
    text = MINIMAL.split("[[services.backends]]")[0] + "ring_size = 70001\n" + backends
    assert len(parse_config(text).services[0].backends) == 700
    # The default ring (65537 slots) is too small for 700 backends.
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL.split("[[services.backends]]")[0] + backends)
    assert [i.path for i in caught.value.issues] == ["services[web].ring_size"]
    # No ring_size line in the file: the service's header is the nearest place.
    assert caught.value.issues[0].line == 2


# -- how problems are reported -----------------------------------------------


def test_problems_name_a_service_by_index_when_its_name_is_unusable() -> None:
    text = MINIMAL.replace('name = "web"\n', "") + MINIMAL.replace('"web"', '"BAD"')
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [i.path for i in caught.value.issues] == [
        "services[0].name",
        "services[1].name",
    ]


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.issues == (
        ConfigIssue(str(missing), "cannot read: No such file or directory"),
    )


def test_load_config_names_the_file_in_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[api]\nlisten = "127.0.0.1:9180\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (issue,) = caught.value.issues
    assert (issue.path, issue.line, issue.column) == (str(path), 2, 25)
    assert str(issue).startswith(f"{path}: line 2, column 25: ")


def test_issue_formats() -> None:
    assert str(ConfigIssue("a.b", "bad", 3)) == "a.b: bad (line 3)"
    assert str(ConfigIssue("a.b", "bad")) == "a.b: bad"
    assert (
        str(ConfigIssue("f.toml", "Unclosed array", 4, 7))
        == "f.toml: line 4, column 7: Unclosed array"
    )


def test_lines_are_found_inside_multiline_strings_and_arrays_only_for_their_key() -> None:
    text = '''
[[services]]
name = "web"
vip = "198.18.0.10"
mode = "dsr"
ports = [
  80,
  "90-80",
]
[services.health]
type = "exec"
command = """
weight = 0
"""
[[services.backends]]
address = "198.18.2.11"
weight = 0
'''
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert [(i.path, i.line) for i in caught.value.issues] == [
        ("services[web].ports", 6),
        ("services[web].health.command", 12),
        ("services[web].backends[0].weight", 17),
    ]


# -- summary --------------------------------------------------------------------


def test_summary_of_the_quickstart() -> None:
    config = load_config(Path(__file__).parents[2] / "examples" / "quickstart.toml")
    assert summarize(config) == (
        "1 service, 3 backends; api on 127.0.0.1:9180; interfaces: eth0; log info (text)\n"
        "service web: 198.18.0.10 tcp ports 443,8000-8100, mode dsr, affinity 5-tuple,"
        " backends need the VIP on lo (passlb backend-setup)\n"
        "  3 backends (1 backup); health tcp every 2s (timeout 1s, rise 2, fall 3)"
    )
    assert config_warnings(config) == ()


def test_summary_warns_about_surprising_settings() -> None:
    text = MINIMAL.replace('"dsr"', '"nat"').replace("\n\n[[", "\nsnat = true\n\n[[")
    text += 'backup = true\n[services.health]\ntype = "none"\n'
    config = parse_config(text)
    assert config_warnings(config) == (
        "services[web]: snat=true: backends will not see the client IP",
        "services[web]: only backup backends: flows go to them as failover, never by plan",
        "services[web]: health type none: every backend counts as healthy",
    )
    summary = summarize(config)
    assert "  warning: snat=true: backends will not see the client IP" in summary.splitlines()
    assert "1 backend (1 backup); health none" in summary


def test_summary_of_proxy_and_drained_backends() -> None:
    config = load_config(Path(__file__).parents[2] / "examples" / "proxy.toml")
    assert summarize(config).splitlines()[1:] == [
        "service tls-edge: 198.18.0.30 tcp ports 443, mode proxy, affinity 5-tuple,"
        " balance least-conn, PROXY protocol v2, 2 SNI routes",
        "  4 backends; health tls every 3s (timeout 1s, rise 2, fall 3)",
    ]
    nat = summarize(load_config(Path(__file__).parents[2] / "examples" / "nat.toml"))
    assert "  3 backends (1 draining); health https every 5s" in nat


def test_the_schema_accepts_the_every_field_file() -> None:
    schema = config_schema()
    jsonschema.Draft202012Validator(schema).validate(tomllib.loads(EVERY_FIELD))
