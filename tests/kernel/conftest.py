"""Fixtures for kernel tests: network-namespace labs torn down at test end.

def test_something(make_lab: MakeLab) -> None:
    lab = make_lab(LabSpec(backends=2, backend_gateway="lb"))

def test_default(lab: Lab) -> None:   # LabSpec() : 3 backends, 1 client, IPv6
    ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from passlb.lab import Lab, LabSpec

MakeLab = Callable[..., Lab]


@pytest.fixture
def make_lab() -> Iterator[MakeLab]:
    """A factory of built labs; every lab it made is torn down after the test,
    pass or fail. `make_lab(spec)` or `make_lab(backends=2, ...)`."""
    labs: list[Lab] = []

    def make(spec: LabSpec | None = None, **spec_fields: object) -> Lab:
        lab = Lab(spec if spec is not None else LabSpec(**spec_fields))  # type: ignore[arg-type]
        labs.append(lab)
        return lab.build()

    yield make
    failures = []
    for lab in reversed(labs):
        try:
            lab.teardown()
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def lab(make_lab: MakeLab) -> Lab:
    """A built lab with the default spec."""
    return make_lab()
