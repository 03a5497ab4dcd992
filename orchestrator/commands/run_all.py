"""`orch run-all [--targets a,b] [--set KEY=VALUE ...] [--profile P] [--resume] [--out PATH]`:
the whole study, stage 1 to the report, in dependency order."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orchestrator.context import Context


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run-all",
        help="run the whole study (stages 1-4, 3B-leaky, then the report)",
        description=(
            "Run every stage in dependency order, waiting on each, then write the report. With "
            "several targets, independent stages run on different targets at once, and a stage "
            "that needs a checkpoint runs where the checkpoint is. A failed stage stops the "
            "pipeline: nothing downstream is launched."
        ),
    )
    p.add_argument(
        "--targets", "-t", help="comma-separated target names (default: the default target)"
    )
    p.add_argument(
        "--profile", help="experiment profile (default: [experiment] profile, else tiny)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of every stage that takes it (repeatable); "
        "scope one stage with STAGE.KEY, e.g. --set stage3a.max_steps=50",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip stages that already have a succeeded run on the targets",
    )
    p.add_argument("--out", type=Path, help="where to write the report (default: docs/RESULTS.md)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from jobs import overrides as ov
    from orchestrator.pipeline_runner import run_stages

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    recs = run_stages(
        ctx,
        ["all"],
        targets=targets,
        overrides=ov.parse_assignments(args.overrides),
        profile=args.profile,
        skip_succeeded=args.resume,
        report_out=args.out,
    )
    ctx.console.print(f"[green]study done[/]: {len(recs)} run(s)")
    return 0
