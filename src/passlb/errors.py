"""Typed errors. Each says whose fault it was and names the bad thing."""

from __future__ import annotations

from dataclasses import dataclass


class PasslbError(Exception):
    """Base of every error passlb raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located by its field path.

    A TOML syntax error has no field path: its path is the file name and it
    carries the column the parser stopped at.
    """

    path: str  # e.g. services[web].backends[2].weight
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is not None and self.column is not None:
            return f"{self.path}: line {self.line}, column {self.column}: {self.message}"
        where = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(PasslbError):
    """The config is invalid; nothing was applied. Carries every issue found."""

    def __init__(self, issues: tuple[ConfigIssue, ...] | list[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class DataplaneError(PasslbError):
    """The kernel or the proxy refused a change; the previous state stays."""
