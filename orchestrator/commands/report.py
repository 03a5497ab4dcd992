"""`orch report [--out PATH] [--seeds a,b] [--json] [--no-plots]`: the study's results from the
pulled runs (recovery ratios, tables, leakage probe, plots; the spread when several seeds ran).
Written to reports/ (ignored by git) unless `--out` names another path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orchestrator.commands.run_all import parse_seeds
from orchestrator.context import Context


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write reports/RESULTS.md (tables, recovery ratios, plots) from the pulled runs",
        description=(
            "Read the latest succeeded pulled run of every stage (per study seed) under runs/ "
            "and write the results document with its PNG plots beside it; with several seeds "
            "it adds the mean and spread and checks each claim on every seed. --json prints "
            "the same numbers."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        help="the markdown file to write (default: reports/RESULTS.md, ignored by git); "
        "files it replaces outside reports/ are named",
    )
    p.add_argument("--seeds", help="only these seeds, e.g. 0,1,2 (default: every seed pulled)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON; write nothing")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: every command loads this file; jobs.report only here
    from jobs.report import collect_study
    from orchestrator.pipeline_runner import DEFAULT_REPORT, run_report

    seeds = parse_seeds(args.seeds, count=False)  # here `--seeds 3` is seed 3
    if args.json:
        study = collect_study(ctx.runs_dir, seeds)
        print(json.dumps(study.to_json(), indent=2, sort_keys=True))
        return 0
    out = args.out if args.out is not None else DEFAULT_REPORT
    if not out.is_absolute():
        out = ctx.project_root / out
    if args.no_plots:
        # lazy, for start-up time: every command loads this file; jobs.report only here
        from jobs.report import write_report

        res = write_report(ctx.runs_dir, out, with_plots=False, seeds=seeds)
        ctx.console.print(f"wrote {res.path}")
        return 0
    run_report(ctx, out, seeds, indent="")
    return 0
