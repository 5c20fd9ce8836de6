"""Numbers a user types, on the command line or in an environment variable, read one way everywhere.

Every tool's ``--workers``, ``--repeats``, ``--n-boot`` … and the ``*_Budget`` trainers' environment
variables take whole numbers >= 1; :func:`positive_int` reads them all, so they refuse the same input
with the same message.
"""

from __future__ import annotations

import argparse

__all__ = ["InvalidNumber", "positive_int"]


class InvalidNumber(argparse.ArgumentTypeError, ValueError):
    """Text that is not the number asked for: argparse prints its message; other callers catch ValueError."""


def positive_int(text: str) -> int:
    """``text`` as a whole number >= 1 (an argparse ``type``); :class:`InvalidNumber` saying why otherwise."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise InvalidNumber(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise InvalidNumber(f"must be a whole number >= 1, got {value}")
    return value
