"""The bad-config corpus: each file states the exact issues it must raise.

A file in bad_configs/ starts with a comment saying what is wrong, then one
"# expect: <issue>" line per issue, in the order the loader reports them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from passlb.config import parse_config
from passlb.errors import ConfigError

CORPUS = sorted((Path(__file__).parent / "bad_configs").glob("*.toml"))
EXPECT = "# expect: "


def _expected(path: Path) -> list[str]:
    return [
        line.removeprefix(EXPECT)
        for line in path.read_text().splitlines()
        if line.startswith(EXPECT)
    ]


def test_corpus_is_large_and_every_file_expects_something() -> None:
    assert len(CORPUS) >= 45
    assert all(_expected(path) for path in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_config_raises_exactly_the_expected_issues(path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(path.read_text(), source=path.name)
    assert [str(issue) for issue in caught.value.issues] == _expected(path)
    assert str(caught.value) == "\n".join(_expected(path))
