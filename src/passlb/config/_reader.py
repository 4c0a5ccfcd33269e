"""Typed reading of raw TOML tables that collects every problem.

A parser is a function from a raw TOML value to a typed value that raises
Invalid with a message saying what was expected. Table.get/required run one
on a key, record the problem at the key's path and carry on, so a single pass
over the file reports everything wrong with it.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Callable, Collection, Mapping
from datetime import date, datetime, time
from typing import TypeVar

from passlb.config._lines import FieldPath

T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)
Parser = Callable[[object], T]


class Invalid(Exception):
    """A raw value was rejected; the message says why (without the path)."""


class Issues:
    """The problems found so far, each at the raw path of the bad field."""

    def __init__(self) -> None:
        self.found: list[tuple[FieldPath, str]] = []

    def add(self, path: FieldPath, message: str) -> None:
        self.found.append((path, message))

    def __len__(self) -> int:
        return len(self.found)


def describe(value: object) -> str:
    """Name a raw TOML value the way the user wrote it: "string '3'"."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return f"date-time {value.isoformat()}"
    return type(value).__name__


def suggest(word: str, choices: Collection[str]) -> str:
    """A "; did you mean 'x'?" suffix when word is a likely typo of a choice."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- parsers ------------------------------------------------------------------


def integer(low: int, high: int) -> Parser[int]:
    def parse(value: object) -> int:
        # TOML booleans are Python ints; a flag is never a count.
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"expected an integer, got {describe(value)}")
        if not low <= value <= high:
            raise Invalid(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def number(low: float, high: float) -> Parser[float]:
    def parse(value: object) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise Invalid(f"expected a number, got {describe(value)}")
        if not math.isfinite(value) or not low <= value <= high:
            raise Invalid(f"must be between {low:g} and {high:g}, got {value:g}")
        return float(value)

    return parse


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(value)}")
    return value


def text(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {describe(value)}")
    if not value:
        raise Invalid("must not be empty")
    return value


def choice(kind: type[E]) -> Parser[E]:
    names = [member.value for member in kind]

    def parse(value: object) -> E:
        if not isinstance(value, str):
            raise Invalid(f"expected a string, got {describe(value)}")
        if value not in names:
            raise Invalid(
                f"must be one of {', '.join(names)}, got {value!r}{suggest(value, names)}"
            )
        return kind(value)

    return parse


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_DURATION = 7 * 24 * 3600.0


def duration(*, allow_zero: bool = False) -> Parser[float]:
    """Seconds, from "250ms", "2s", "5m", "1h", "1m30s" or a plain number."""

    def parse(value: object) -> float:
        seconds = _duration_seconds(value)
        if seconds > _MAX_DURATION:
            raise Invalid(f"must be at most 7 days, got {format_duration(seconds)}")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise Invalid(f"must be {'0 or more' if allow_zero else 'more than 0'}, got {value}")
        return seconds

    return parse


def _duration_seconds(value: object) -> float:
    wanted = "expected a duration like '2s', '250ms', '1m30s' or a number of seconds"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise Invalid(f"{wanted}, got {describe(value)}")
        return float(value)
    if not isinstance(value, str):
        raise Invalid(f"{wanted}, got {describe(value)}")
    compact = value.strip()
    parts = _DURATION_PART.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise Invalid(f"{wanted}, got {describe(value)}")
    return sum(float(amount) * _UNIT_SECONDS[unit] for amount, unit in parts)


def format_duration(seconds: float) -> str:
    """The shortest of "250ms", "2s", "1m30s", "2h" for a number of seconds."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours:g}h" if hours else "", f"{minutes:g}m" if minutes else ""]
    parts.append(f"{round(secs, 3):g}s" if secs or not any(parts) else "")
    return "".join(parts)


# -- tables -------------------------------------------------------------------


class Table:
    """One raw TOML table at a known path, read key by key."""

    def __init__(self, raw: Mapping[str, object], path: FieldPath, issues: Issues) -> None:
        self.raw = raw
        self.path = path
        self.issues = issues

    def at(self, key: str | int) -> FieldPath:
        return (*self.path, key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def problem(self, key: str, message: str) -> None:
        self.issues.add(self.at(key), message)

    def check_keys(self, known: Collection[str]) -> None:
        for key in self.raw:
            if key not in known:
                self.problem(key, f"unknown key{suggest(key, known)}")

    def get(self, key: str, parse: Parser[T], default: T) -> T:
        """The parsed value, or default when the key is absent or invalid."""
        parsed = self.optional(key, parse)
        return default if parsed is None else parsed

    def optional(self, key: str, parse: Parser[T]) -> T | None:
        if key not in self.raw:
            return None
        try:
            return parse(self.raw[key])
        except Invalid as err:
            self.problem(key, str(err))
            return None

    def required(self, key: str, parse: Parser[T]) -> T | None:
        if key not in self.raw:
            self.problem(key, "required")
            return None
        return self.optional(key, parse)

    def each(
        self, key: str, parse: Parser[T], *, required: bool = False, non_empty: bool = True
    ) -> list[tuple[int, T]] | None:
        """The valid items of an array with their positions; each bad item is reported.

        None when the key is absent or not an array.
        """
        if key not in self.raw:
            if required:
                self.problem(key, "required")
            return None
        value = self.raw[key]
        if not isinstance(value, list):
            self.problem(key, f"expected an array, got {describe(value)}")
            return None
        if non_empty and not value:
            self.problem(key, "must not be empty")
        parsed = []
        for position, item in enumerate(value):
            try:
                parsed.append((position, parse(item)))
            except Invalid as err:
                self.issues.add((*self.at(key), position), str(err))
        return parsed

    def table(self, key: str) -> Table | None:
        """The sub-table under key, or None when absent or not a table."""
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(key, f"expected a table, got {describe(value)}")
            return None
        return Table(value, self.at(key), self.issues)

    def tables(self, key: str, header: str) -> list[tuple[int, Table]] | None:
        """The tables of an array of tables ([[header]]), or None when absent."""
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self.problem(key, f"expected an array of tables ([[{header}]]), got {describe(value)}")
            return None
        tables: list[tuple[int, Table]] = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                tables.append((index, Table(item, (*self.at(key), index), self.issues)))
            else:
                self.issues.add((*self.at(key), index), f"expected a table, got {describe(item)}")
        return tables
