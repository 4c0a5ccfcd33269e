"""`[proxy] workers`: parsing, errors, summary, schema, the daemon's choice of
driver, and how each worker's share of the connection limits is computed (pure)."""

from __future__ import annotations

import os
import tomllib
from ipaddress import ip_address

import jsonschema
import pytest

from passlb.config import parse_config, summarize
from passlb.config.schema import config_schema
from passlb.daemon import build_drivers
from passlb.dataplane.proxy import ProxyDriver
from passlb.dataplane.proxy.shares import desired_for_worker, worker_share
from passlb.dataplane.proxy.testing import desired, proxy_service, with_options
from passlb.dataplane.proxy.workers import WorkerPool, cpu_count, resolve_workers
from passlb.errors import ConfigError
from passlb.model import Mode, ProxySettings

SERVICE = """
[[services]]
name = "web"
vip = "127.0.0.1"
ports = 8080
mode = "proxy"
[[services.backends]]
address = "127.0.0.2"
"""


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [str(issue) for issue in caught.value.issues]


def test_workers_default_to_one_an_integer_or_auto() -> None:
    assert parse_config(SERVICE).proxy == ProxySettings(workers=1)
    assert parse_config("[proxy]\n").proxy == ProxySettings(workers=1)
    assert parse_config("[proxy]\nworkers = 4\n").proxy == ProxySettings(workers=4)
    assert parse_config('[proxy]\nworkers = "auto"\n').proxy == ProxySettings(workers=None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "proxy.workers: must be between 1 and 256, got 0 (line 2)"),
        ("257", "proxy.workers: must be between 1 and 256, got 257 (line 2)"),
        ('"many"', "proxy.workers: expected an integer or \"auto\", got string 'many' (line 2)"),
        ("true", 'proxy.workers: expected an integer or "auto", got boolean true (line 2)'),
        ("2.5", 'proxy.workers: expected an integer or "auto", got float 2.5 (line 2)'),
    ],
)
def test_a_bad_worker_count_names_the_key_and_the_value(value: str, message: str) -> None:
    assert issues(f"[proxy]\nworkers = {value}\n") == [message]


def test_an_unknown_proxy_key_is_an_error_with_a_suggestion() -> None:
    assert issues("[proxy]\nworker = 2\n") == [
        "proxy.worker: unknown key; did you mean 'workers'? (line 2)"
    ]


def test_summary_shows_workers_only_when_not_the_default() -> None:
    assert "workers" not in summarize(parse_config(SERVICE))
    assert "; proxy workers 2" in summarize(parse_config("[proxy]\nworkers = 2\n" + SERVICE))
    auto = summarize(parse_config('[proxy]\nworkers = "auto"\n'))
    assert "; proxy workers auto (one per CPU)" in auto


def test_schema_takes_what_the_loader_takes() -> None:
    schema = config_schema()
    for good in ("[proxy]\nworkers = 3\n", '[proxy]\nworkers = "auto"\n'):
        jsonschema.validate(tomllib.loads(good), schema)
    for bad in ("[proxy]\nworkers = 0\n", '[proxy]\nworkers = "all"\n', "[proxy]\nx = 1\n"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(tomllib.loads(bad), schema)


def test_auto_is_the_cpus_this_process_may_run_on() -> None:
    assert cpu_count() == len(os.sched_getaffinity(0))
    assert resolve_workers(None) == cpu_count()
    assert resolve_workers(3) == 3


def test_the_daemon_runs_the_relay_in_itself_for_one_worker_and_a_pool_for_more() -> None:
    assert isinstance(build_drivers(parse_config(SERVICE), ())[Mode.PROXY], ProxyDriver)
    pool = build_drivers(parse_config("[proxy]\nworkers = 3\n" + SERVICE), ())[Mode.PROXY]
    assert isinstance(pool, WorkerPool) and pool.size == 3
    pool.close()  # never synced: no process was started


@pytest.mark.parametrize(
    ("limit", "workers", "shares"),
    [(10, 2, [5, 5]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (1, 2, [1, 1]), (2, 4, [1, 1, 1, 1])],
)
def test_limits_split_evenly_remainder_first_never_zero(
    limit: int, workers: int, shares: list[int]
) -> None:
    assert [worker_share(limit, workers, i) for i in range(workers)] == shares


def test_each_worker_gets_its_share_of_every_limit_and_the_rest_unchanged() -> None:
    service = with_options(
        proxy_service("web", 80, [("127.0.0.2", 8080)]),
        max_connections=101,
        max_connections_per_backend=10,
        max_udp_sessions=3,
    )
    open_ended = proxy_service("api", 81, [("127.0.0.3", 8080)], vip="127.0.0.1")
    state = desired(service, open_ended)
    assert desired_for_worker(state, 1, 0) is state
    first, second = (desired_for_worker(state, 2, i) for i in range(2))
    for share, (conns, per_backend, udp) in ((first, (51, 5, 2)), (second, (50, 5, 1))):
        web = share.service("web")
        assert web is not None and web.service.proxy is not None
        options = web.service.proxy
        assert (options.max_connections, options.max_connections_per_backend) == (
            conns,
            per_backend,
        )
        assert options.max_udp_sessions == udp
        assert web.ring == state.services[0].ring and web.backends == state.services[0].backends
        api = share.service("api")
        assert api is not None and api.service.proxy is not None
        assert api.service.proxy.max_connections is None
        assert api.service.vip == ip_address("127.0.0.1")
