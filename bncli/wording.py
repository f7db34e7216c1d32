"""Counted nouns that read right: "1 channel", "3 channels", "1 of 3 channels holds"."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``plural(1, "value")`` -> ``"1 value"``; ``plural(2, "value")`` -> ``"2 values"``.

    Args:
        n: The count.
        noun: The singular.
        many: The plural when it is not ``noun + "s"`` (``"passes"``, ``"indices"``).
    """
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


def verb(n: int, singular: str, many: str) -> str:
    """The verb agreeing with a count: ``verb(1, "is", "are")`` -> ``"is"``."""
    return singular if n == 1 else many
