"""The config language: a TOML file -> a validated passlb.model.Config.

    config = load_config("/etc/passlb/passlb.toml")   # or parse_config(text)
    print(summarize(config))

Every problem in the file is collected and raised together as one ConfigError;
nothing is returned from a file with a problem. Each ConfigIssue names the
field by its path, in the form

    services[web].backends[0].weight: must be between 1 and 65535, got 0 (line 31)

Array indexes are 0-based, counted in the order the file writes the entries.
A service appears by its name when it has a valid name no other service uses,
else by its index: services[2]. The line is the one that wrote the key, or the
nearest enclosing table or key when the value sits inside an inline table or
a multi-line array. Issues come in file order. A TOML syntax error is reported as
"<file>: line N, column M: <reason>".

Pure: nothing here does I/O except load_config reading its one file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from passlb.config._build import build_config, display_names
from passlb.config._lines import FieldPath, line_of, locate_lines
from passlb.config._reader import Issues, Table
from passlb.config.summary import config_warnings, summarize
from passlb.errors import ConfigError, ConfigIssue
from passlb.model import Config

__all__ = ["config_warnings", "load_config", "parse_config", "summarize"]

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate a config text; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([_syntax_issue(str(err), source)]) from None
    issues = Issues()
    names: dict[int, str] = {}
    config = build_config(Table(raw, (), issues), names)
    if issues.found:
        lines = locate_lines(text)
        shown = display_names(names)
        located = [
            ConfigIssue(_render(path, shown), message, line_of(lines, path))
            for path, message in issues.found
        ]
        # File order reads best; issues without a line go last, in the order found.
        raise ConfigError(sorted(located, key=lambda issue: (issue.line is None, issue.line or 0)))
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError when it is unreadable or invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([ConfigIssue(str(path), f"cannot read: {err.strerror}")]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([ConfigIssue(str(path), f"not UTF-8 text: {err.reason}")]) from None
    return parse_config(text, source=str(path))


def _syntax_issue(message: str, source: str) -> ConfigIssue:
    position = _TOML_POSITION.search(message)
    if position is None:
        return ConfigIssue(source, message)
    reason = message[: position.start()]
    return ConfigIssue(source, reason, line=int(position[1]), column=int(position[2]))


def _render(path: FieldPath, shown: dict[int, str]) -> str:
    """("services", 0, "backends", 2, "weight") -> "services[web].backends[2].weight"."""
    rendered = ""
    for position, key in enumerate(path):
        if isinstance(key, int):
            label = shown.get(key, key) if path[:position] == ("services",) else key
            rendered += f"[{label}]"
        else:
            rendered += f".{key}" if rendered else key
    return rendered
