"""Each benchmark owns one section of docs/benchmarks.md, between its markers."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
TITLE = "# Benchmarks\n"


def write_section(name: str, section: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->`
    with `section`; append the marked section when the file has none."""
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start_marker}\n{section.strip()}\n{end_marker}"
    current = doc.read_text() if doc.exists() else ""
    start, end = current.find(start_marker), current.find(end_marker)
    if start == -1 or end < start:
        base = current if current.strip() else TITLE
        updated = base.rstrip("\n") + "\n\n" + block + "\n"
    else:
        updated = current[:start] + block + current[end + len(end_marker) :]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(updated)
