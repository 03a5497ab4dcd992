"""`orch stages [--profile P]`: the study's stages as a table."""

from __future__ import annotations

import argparse
from typing import Any

from rich.cells import cell_len
from rich.table import Table

from jobs.spec import StageSpec
from orchestrator.context import Context


def register(sub: Any) -> None:
    p = sub.add_parser("stages", help="list the stages (run dir, command, mask, inputs, timeout)")
    p.add_argument(
        "--profile", help="experiment profile (default: [experiment] profile, else tiny)"
    )
    p.set_defaults(func=handle)


def format_timeout(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    if seconds >= 60:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def stage_row(s: StageSpec) -> list[str]:
    """One table row: name, run dir, command, mask, inputs, timeout (pure)."""
    mask = s.task.args.get("mask")
    return [
        s.name,
        "(local)" if s.local_only else s.stage_dir,
        s.task.command,
        str(mask) if mask else "-",
        ", ".join(i.stage for i in s.inputs) or "-",
        format_timeout(s.timeout_s),
    ]


COLUMNS = ("stage", "run dir", "command", "mask", "inputs", "timeout")


def table_width(headers: tuple[str, ...], rows: list[list[str]]) -> int:
    """The width rich's default table needs to show every cell on one line (pure)."""
    widths = [max(cell_len(c) for c in col) for col in zip(headers, *rows, strict=True)]
    return sum(widths) + 3 * len(widths) + 1  # a border and a blank either side of each cell


def task_text(row: list[str]) -> str:
    """command, mask, timeout and inputs as words that may wrap: `eval prefix, 30m, input stage3a`."""
    _, _, command, mask, inputs, timeout = row
    words = f"{command} {mask}, {timeout}" if mask != "-" else f"{command}, {timeout}"
    return words + (f", input {inputs}" if inputs != "-" else "")


def stages_table(stages: list[StageSpec], profile: str, width: int | None = None) -> Table:
    """The stages, names (stage, run dir, mask, inputs) never broken: one column each when the
    table fits `width`; else command, mask, timeout and inputs share one column that wraps
    between words, so an 80-column terminal still shows every name whole."""
    rows = [stage_row(s) for s in stages]
    table = Table(title=f"stages (profile {profile})")
    if width is None or table_width(COLUMNS, rows) <= width:
        for col in COLUMNS:
            table.add_column(col, no_wrap=True)
        for row in rows:
            table.add_row(*row)
        return table
    table.add_column("stage", no_wrap=True)
    table.add_column("run dir", no_wrap=True)
    table.add_column("command, mask, timeout, inputs")
    for row in rows:
        table.add_row(row[0], row[1], task_text(row))
    return table


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: every command loads this file; jobs.stages only here
    from jobs.stages import list_stages

    profile = args.profile or ctx.config.experiment.profile
    stages = list_stages(profile, shared=ctx.config.experiment.overrides)
    ctx.console.print(stages_table(stages, profile, ctx.console.width))
    return 0
