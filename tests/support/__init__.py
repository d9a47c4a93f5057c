"""Helpers shared by test modules (test modules never import each other)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

T = TypeVar("T", bound=Collection)


def nonempty(collection: T, what: str) -> T:
    """A collection a test loops over, asserted non-empty: a loop over nothing must not pass."""
    assert len(collection) > 0, f"nothing to check: no {what} found"
    return collection
