"""Backends: each module builds engines for its target and opens them as sessions with the same ``run``."""

from __future__ import annotations

from typing import Mapping, Sequence

from diffc.errors import InputError


def check_feeds(input_names: Sequence[str], feeds: Mapping[str, object]) -> None:
    """Raise :class:`InputError` naming the inputs a session's ``run`` was not given."""
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise InputError(f"missing inputs {missing} for this engine (it takes {list(input_names)})")
