"""The command line as a user types it: outputs and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jsonschema
import pytest

from passlb.cli import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, build_parser, main

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.toml"))


def test_check_accepts_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *map(str, EXAMPLES)]) == EXIT_OK
    out = capsys.readouterr().out
    for example in EXAMPLES:
        assert f"{example}: ok" in out


def test_check_lists_every_problem_and_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[services]]\nname = "web"\nvip = "198.18.0.10"\nports = [443]\nmode = "dsr"\n'
        'protocl = "tcp"\n[[services.backends]]\naddress = "198.18.2.11"\nweight = 0\n'
    )
    assert main(["check", str(bad)]) == EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{bad}: invalid (2 problem(s))",
        "  services[web].protocl: unknown key; did you mean 'protocol'? (line 6)",
        "  services[web].backends[0].weight: must be between 1 and 65535, got 0 (line 9)",
    ]


def test_schema_is_json_schema_that_accepts_the_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tomllib

    assert main(["schema"]) == EXIT_OK
    schema = json.loads(capsys.readouterr().out)
    for example in EXAMPLES:
        jsonschema.validate(tomllib.loads(example.read_text()), schema)


def test_explain_names_the_backend(capsys: pytest.CaptureFixture[str]) -> None:
    quickstart = next(e for e in EXAMPLES if e.name == "quickstart.toml")
    argv = ["explain", "--config", str(quickstart), "198.18.1.10", "40000", "198.18.0.10"]
    assert main([*argv, "443", "tcp"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "service  web" in out and "a NEW flow" in out
    assert "forwarded to 198.18.2.1" in out  # one of the two primaries, never the backup
    assert main([*argv, "22", "tcp"]) == EXIT_OK
    assert "no service has VIP 198.18.0.10 with tcp port 22" in capsys.readouterr().out


def test_backend_setup_print_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backend-setup", "--vip", "198.18.0.10", "--print"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[0] == "ip addr add 198.18.0.10/32 dev lo"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert "exit codes:" in capsys.readouterr().out


def test_every_command_help_has_an_example() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands: dict[str, argparse.ArgumentParser] = subparsers.choices
    assert {"run", "check", "status", "demo", "version", "explain", "cleanup"} <= set(commands)
    for name, sub in commands.items():
        assert "example:" in (sub.epilog or ""), name


def test_commands_in_example_comments_parse() -> None:
    """A `passlb …` command an example's comment gives must be one the CLI accepts."""
    import re
    import shlex

    parser = build_parser()
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))
    quoted = [
        (path.name, command)
        for path in examples
        for command in re.findall(r"`(passlb [^`]+)`", path.read_text())
    ]
    assert ("udp-dns.toml", "passlb backend-setup --vip 198.18.0.53") in quoted
    for name, command in quoted:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit as exit_:
            raise AssertionError(f"{name}: `{command}` exits {exit_.code}") from None


def test_check_explains_a_missing_bgp_speaker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import passlb.bgp.bird

    monkeypatch.setattr(passlb.bgp.bird, "find_binary", lambda name: None)
    cluster = EXAMPLES[0].parent / "cluster.toml"
    assert main(["check", str(cluster)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{cluster}: cannot run here (1 problem(s))" in err
    assert "bgp.speaker: BIRD 2 is not installed (bird and birdc not found" in err
    assert "install it: apt-get install bird2" in err


def test_explain_shows_the_ring_fingerprint(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = str(EXAMPLES[0].parent / "cluster.toml")
    assert (
        main(["explain", "--config", cluster, "198.18.1.10", "40000", "198.18.0.10", "443", "tcp"])
        == EXIT_OK
    )
    ring = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ring")]
    assert len(ring) == 1 and len(ring[0].split()[2]) == 16
