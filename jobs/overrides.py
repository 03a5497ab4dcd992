"""`--set KEY=VALUE` overrides: parsing, dotted paths into nested args, stage scoping.

A key is a dotted path into a stage's worker args (`max_steps`, `tasks.0.limit`, `data.limit`)
or one of the spec-level keys (`timeout_s`, `stale_after_s`, `poll_interval_s`,
`nproc_per_node`, `nodes`, `tasks_per_node`, `resources.gpus`, `resources.min_gpu_ram_gb`).
A key may be scoped to one stage by prefixing it with the stage name (`stage3a.max_steps=50`). Values are parsed as JSON when they parse
(`50` -> 50, `true` -> True, `null` -> None, `[1,2]` -> a list), else kept as strings.
Pure functions; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from state.errors import ConfigError

#: Keys that set fields of the StageSpec itself rather than the worker's args.
SPEC_KEYS: tuple[str, ...] = (
    "timeout_s",
    "stale_after_s",
    "poll_interval_s",
    "nproc_per_node",
    "nodes",
    "tasks_per_node",
    "resources.gpus",
    "resources.min_gpu_ram_gb",
)


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: Iterable[str] | None) -> dict[str, Any]:
    """`["max_steps=50", "tasks.0.limit=100"]` -> `{"max_steps": 50, "tasks.0.limit": 100}`."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not KEY=VALUE",
                hint="e.g. --set max_steps=50 --set tasks.0.limit=100",
            )
        out[key] = parse_value(value) if isinstance(value, str) else value
    return out


def normalize(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Overrides as given in orch.toml (values already typed) or by `parse_assignments`.

    String values from a TOML file are kept as strings; nested TOML tables are flattened to
    dotted keys (`[experiment.overrides.stage3a] max_steps = 5` -> `stage3a.max_steps`).
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    for key, value in (overrides or {}).items():
        walk(str(key), value)
    return out


def split_scope(key: str, stage_names: Iterable[str]) -> tuple[str | None, str]:
    """`"stage3a.max_steps"` -> `("stage3a", "max_steps")`; an unscoped key -> `(None, key)`."""
    head, sep, rest = key.partition(".")
    if sep and head in set(stage_names):
        if not rest:
            raise ConfigError(f"override {key!r} names a stage but no key")
        return head, rest
    return None, key


def set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `obj[a][b][0]... = value` along a dotted path; list indices are integers.

    The last segment of a dict path may be new (the args model then rejects it if unknown);
    a list index must exist. Raises ConfigError naming the path when it cannot be followed.
    """
    parts = dotted.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {dotted!r} has an empty segment")
    cur: Any = obj
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth]) or "(top level)"
        if isinstance(cur, list):
            try:
                idx = int(part)
            except ValueError:
                raise ConfigError(
                    f"override {dotted!r}: {here} is a list, so {part!r} must be an index"
                ) from None
            if not -len(cur) <= idx < len(cur):
                raise ConfigError(
                    f"override {dotted!r}: {here} has {len(cur)} entries, index {idx} is out of range"
                )
            if last:
                cur[idx] = value
            else:
                cur = cur[idx]
        elif isinstance(cur, dict):
            if last:
                cur[part] = value
            else:
                if cur.get(part) is None:
                    cur[part] = {}
                cur = cur[part]
        else:
            raise ConfigError(
                f"override {dotted!r}: {here} is a value ({cur!r}), not a table or list"
            )
