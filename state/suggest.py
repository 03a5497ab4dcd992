"""`did you mean ...?` for a mistyped name: one helper for orch.toml keys, stage names, target
names and `--set` keys, so every such error offers the closest known spelling the same way."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: How alike two names must be (difflib's ratio) to be offered as the intended one.
CUTOFF = 0.6


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The known name closest to `word` (case-insensitive), or None when none is close.

    A dotted name (`tsks.0.limit`) whose whole is not close to any choice is matched by its
    first segment, the rest kept (`tasks.0.limit`)."""
    by_lower: dict[str, str] = {}
    for c in choices:
        by_lower.setdefault(c.lower(), c)
    if not word or word in by_lower.values():
        return None
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=CUTOFF)
    if match:
        return by_lower[match[0]]
    head, dot, rest = word.partition(".")
    if dot and head not in by_lower.values():
        best = closest(head, by_lower.values())
        return f"{best}.{rest}" if best is not None else None
    return None


def did_you_mean(word: str, choices: Iterable[str], then: str = "") -> str:
    """`"did you mean 'x'?"` followed by `then`, or just `then` when nothing is close."""
    best = closest(word, choices)
    if best is None:
        return then
    return f"did you mean {best!r}?" + (f" {then}" if then else "")
