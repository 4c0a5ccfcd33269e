"""Find the source line of each table and key in a TOML text, best effort.

tomllib returns plain dicts without positions, so a light scan of the text
maps field paths such as ("services", 0, "backends", 2, "weight") to the line
that wrote them. It understands table headers, arrays of tables and bare or
dotted keys; values inside inline tables and multi-line arrays resolve to the
line of the key that holds them (the caller looks up the longest known prefix).
"""

from __future__ import annotations

import re

FieldPath = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\- ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+(?:\s*\.\s*[A-Za-z0-9_\-]+)*)\s*=")
_MULTILINE_STRING = re.compile(r'"""|\'\'\'')


def _split_key(dotted: str) -> list[str]:
    return [part.strip() for part in dotted.split(".")]


def locate_lines(text: str) -> dict[FieldPath, int]:
    """Return {field path: 1-based line} for every header and key found."""
    lines: dict[FieldPath, int] = {}
    array_lengths: dict[FieldPath, int] = {}
    table: FieldPath = ()
    in_multiline_string = False
    for number, line in enumerate(text.splitlines(), start=1):
        # A line that opens or closes a '''/""" string toggles the state; the
        # text inside such a string is never a key.
        if len(_MULTILINE_STRING.findall(line)) % 2 == 1:
            starts_string = not in_multiline_string
            in_multiline_string = not in_multiline_string
            if not starts_string:
                continue
        elif in_multiline_string:
            continue
        header = _HEADER.match(line)
        if header:
            table = _resolve_header(
                _split_key(header.group(2)), header.group(1) == "[[", array_lengths
            )
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = _resolve(table, _split_key(key.group(1)), array_lengths)
            lines.setdefault(path, number)
    return lines


def _resolve(prefix: FieldPath, keys: list[str], array_lengths: dict[FieldPath, int]) -> FieldPath:
    """Append keys to prefix, stepping into the last element of arrays of tables."""
    path = prefix
    for key in keys:
        path = (*path, key)
        if path in array_lengths:
            path = (*path, array_lengths[path] - 1)
    return path


def _resolve_header(
    keys: list[str], is_array: bool, array_lengths: dict[FieldPath, int]
) -> FieldPath:
    parent = _resolve((), keys[:-1], array_lengths)
    path: FieldPath = (*parent, keys[-1])
    if not is_array:
        return path
    array_lengths[path] = array_lengths.get(path, 0) + 1
    return (*path, array_lengths[path] - 1)


def line_of(lines: dict[FieldPath, int], path: FieldPath) -> int | None:
    """The line of path, or of its nearest ancestor the scan found."""
    for end in range(len(path), 0, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return None
