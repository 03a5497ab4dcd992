"""`orch stages [--profile P]`: the study's stages as a table."""

from __future__ import annotations

import argparse
from typing import Any

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


def stages_table(stages: list[StageSpec], profile: str) -> Table:
    table = Table(title=f"stages (profile {profile})")
    for col in ("stage", "run dir", "command", "mask", "inputs", "timeout"):
        table.add_column(col, overflow="fold")
    for s in stages:
        table.add_row(*stage_row(s))
    return table


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from jobs.stages import list_stages

    profile = args.profile or ctx.config.experiment.profile
    stages = list_stages(profile, shared=ctx.config.experiment.overrides)
    ctx.console.print(stages_table(stages, profile))
    return 0
