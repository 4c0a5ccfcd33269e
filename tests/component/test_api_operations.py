"""Operating passlb beyond the HTTP routes: runtime weights in the reconciler,
structured logs, shell completion, the systemd unit and the Grafana dashboard."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest

from passlb.api.metrics import ALL_METRICS
from passlb.cli import build_parser
from passlb.completion import bash_completion, zsh_completion
from passlb.config import parse_config
from passlb.control.reconciler import ApplyRecord, Reconciler
from passlb.dataplane.base import ApplyResult, Flow, ServiceCounters
from passlb.errors import ConfigError
from passlb.logs import JsonFormatter, TextFormatter, kv_message, log_event
from passlb.model import (
    AdminState,
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
from passlb.state import BackendRole, DesiredState

ROOT = Path(__file__).resolve().parents[2]


class RecordingDriver:
    name = "proxy"
    blocking = False

    def __init__(self) -> None:
        self.synced: list[DesiredState] = []

    def sync(self, desired: DesiredState, *, full: bool = False) -> ApplyResult:
        self.synced.append(desired)
        return ApplyResult(full=full, operations=1, duration=0.0)

    def counters(self, *, active_flows: bool = True) -> dict[str, ServiceCounters]:
        return {}

    def flows(self, service: str | None = None, backend: str | None = None) -> list[Flow]:
        return []

    def close(self, *, cleanup: bool = False) -> None:
        pass


def _config() -> Config:
    backends = tuple(Backend(ip_address(f"198.18.2.{n}"), port=80) for n in (11, 12))
    service = Service(
        name="web",
        vip=ip_address("198.18.0.10"),
        protocol=Protocol.TCP,
        ports=PortSet((PortRange(80, 80),)),
        mode=Mode.PROXY,
        backends=backends,
        health=HealthSpec(type=HealthType.NONE),
        ring_size=251,
    )
    return Config(services=(service,))


def test_weight_override_rebuilds_the_ring_and_survives_only_its_backend() -> None:
    driver = RecordingDriver()
    rec = Reconciler(_config(), {Mode.PROXY: driver})
    rec.apply_once(full=True)
    ring = driver.synced[-1].services[0].ring
    assert ring is not None
    even = ring.counts()
    rec.set_weight("web", "198.18.2.11:80", 3)
    record = rec.apply_once()
    assert record.error is None
    assert record.compute_duration > 0
    svc = driver.synced[-1].services[0]
    assert [b.weight for b in svc.backends] == [3, 1]
    assert svc.ring is not None
    counts = svc.ring.counts()
    assert counts[0] > even[0] and counts[0] + counts[1] == 251
    assert rec.effective_config().services[0].backends[0].weight == 3
    assert rec.config.services[0].backends[0].weight == 1  # the file's config is untouched

    # A reload that drops the backend forgets its override; one that keeps it keeps it.
    rec.set_config(_config())
    assert rec.weight_overrides == {("web", "198.18.2.11:80"): 3}
    full = _config().services[0]
    rec.set_config(Config(services=(dataclasses.replace(full, backends=full.backends[1:]),)))
    assert rec.weight_overrides == {}


@pytest.mark.parametrize(
    ("service", "backend", "weight", "error"),
    [
        ("web", "198.18.2.11:80", 0, ValueError),
        ("web", "198.18.2.11:80", 65536, ValueError),
        ("web", "198.18.2.99:80", 5, KeyError),
        ("api", "198.18.2.11:80", 5, KeyError),
    ],
)
def test_bad_weight_changes_nothing(
    service: str, backend: str, weight: int, error: type[Exception]
) -> None:
    rec = Reconciler(_config(), {Mode.PROXY: RecordingDriver()})
    with pytest.raises(error):
        rec.set_weight(service, backend, weight)
    assert rec.weight_overrides == {}


def test_apply_hook_hears_every_apply() -> None:
    heard: list[ApplyRecord] = []
    rec = Reconciler(_config(), {Mode.PROXY: RecordingDriver()}, on_apply=heard.append)
    first = rec.apply_once(full=True)
    rec.set_admin("web", "198.18.2.12:80", AdminState.DRAIN)
    second = rec.apply_once()
    assert heard == [first, second]
    roles = [b.role for b in rec.desired.services[0].backends] if rec.desired else []
    assert roles == [BackendRole.ACTIVE, BackendRole.DRAINING]


def _logged(formatter: logging.Formatter) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("passlb.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    log_event(
        logger,
        logging.WARNING,
        "health",
        service="web",
        backend="198.18.2.12",
        healthy=False,
        reason='HTTP 503 "busy"',
        latency=0.0125,
        weight=None,
    )
    logger.info("plain message")
    return stream.getvalue()


def test_text_logs_are_key_value() -> None:
    first, second = _logged(TextFormatter()).splitlines()
    assert first.endswith(
        "level=WARNING logger=passlb.test.logs health service=web backend=198.18.2.12 "
        'healthy=false reason="HTTP 503 \\"busy\\"" latency=0.0125 weight=none'
    )
    assert second.endswith("level=INFO logger=passlb.test.logs plain message")


def test_json_logs_keep_fields_typed() -> None:
    first, second = (json.loads(line) for line in _logged(JsonFormatter()).splitlines())
    assert first["event"] == "health"
    assert first["level"] == "warning"
    assert (first["healthy"], first["latency"], first["weight"]) == (False, 0.0125, None)
    assert first["reason"] == 'HTTP 503 "busy"'
    assert first["msg"].startswith("health service=web")
    assert "event" not in second and second["msg"] == "plain message"


def test_kv_message_quotes_only_when_needed() -> None:
    assert kv_message("reload accepted", {"services": 2}) == "reload accepted services=2"
    assert kv_message("x", {"a": "b c", "d": "", "e": "k=v"}) == 'x a="b c" d="" e="k=v"'


def test_non_loopback_api_needs_a_token() -> None:
    service = '[[services]]\nname = "web"\nvip = "198.18.0.10"\nprotocol = "tcp"\n'
    service += 'ports = [80]\nmode = "proxy"\n[[services.backends]]\naddress = "198.18.2.11"\n'
    with pytest.raises(ConfigError) as err:
        parse_config('[api]\nlisten = "0.0.0.0:9180"\n' + service)
    assert any(issue.path == "api.token" for issue in err.value.issues)
    for listen in ("127.0.0.1:9180", "[::1]:9180", "unix:/run/passlb.sock"):
        assert parse_config(f'[api]\nlisten = "{listen}"\n' + service).api.token is None
    tokened = parse_config('[api]\nlisten = "0.0.0.0:9180"\ntoken = "t"\n' + service)
    assert tokened.api.token == "t"


def _complete(script: str, words: list[str]) -> list[str]:
    """Run the generated bash completion function as bash would on <TAB>."""
    line = " ".join(words)
    program = (
        f"{script}\nCOMP_WORDS=({line})\nCOMP_CWORD={len(words) - 1}\n"
        '_passlb\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return [w for w in done.stdout.splitlines() if w]


def test_bash_completion_is_valid_and_completes() -> None:
    script = bash_completion(build_parser())
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert _complete(script, ["passlb", "st"]) == ["status"]
    assert set(_complete(script, ["passlb", "flows", "--"])) >= {"--service", "--backend", "--json"}
    assert _complete(script, ["passlb", "demo", "--mode", "p"]) == ["proxy"]
    assert _complete(script, ["passlb", "completion", "z"]) == ["zsh"]
    assert _complete(script, ["passlb", "top", "--o"]) == ["--once"]


def test_zsh_completion_wraps_the_bash_one() -> None:
    script = zsh_completion(build_parser())
    assert script.startswith("#compdef passlb\n")
    assert "bashcompinit" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-n"], input=script, text=True, check=True)


def test_systemd_unit(tmp_path: Path) -> None:
    unit = (ROOT / "packaging" / "passlb.service").read_text()
    if shutil.which("systemd-analyze"):
        # verify wants the executables to exist: point it at this environment's passlb
        local = tmp_path / "passlb.service"
        passlb = Path(sys.executable).with_name("passlb")  # the console script of this venv
        local.write_text(unit.replace("/usr/local/bin/passlb", str(passlb)))
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(local)], capture_output=True, text=True
        )
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] not in "#;"
    )
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Type"] == "simple"
    assert settings["Restart"] == "on-failure"
    assert settings["KillMode"] in ("mixed", "process")
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= set(settings["CapabilityBoundingSet"].split())
    assert settings["ExecStart"].endswith("passlb run /etc/passlb/passlb.toml")


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "packaging" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"\b(passlb_[a-z_]+)", expr)
    }
    exported = {m.name for m in ALL_METRICS}
    assert used <= exported, used - exported
    assert exported <= used, f"metrics without a panel: {sorted(exported - used)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
