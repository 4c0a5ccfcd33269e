"""Weighted Maglev ring (placeholder: being written)."""

from __future__ import annotations


class Ring:
    """slot -> backend index; immutable."""
