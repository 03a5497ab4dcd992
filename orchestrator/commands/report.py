"""`orch report [--out docs/RESULTS.md] [--json] [--no-plots]`: the study's results from the
pulled runs (recovery ratios, tables, leakage probe, plots)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orchestrator.context import Context


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write docs/RESULTS.md (tables, recovery ratios, plots) from the pulled runs",
        description=(
            "Read the latest succeeded pulled run of every stage under runs/ and write the "
            "results document with its PNG plots beside it; --json prints the same numbers."
        ),
    )
    p.add_argument("--out", type=Path, help="the markdown file to write (default: docs/RESULTS.md)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON; write nothing")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from jobs.report import collect, write_report

    if args.json:
        data = collect(ctx.runs_dir)
        print(json.dumps(data.to_json(), indent=2, sort_keys=True))
        return 0
    out = args.out if args.out is not None else Path("docs") / "RESULTS.md"
    if not out.is_absolute():
        out = ctx.project_root / out
    res = write_report(ctx.runs_dir, out, with_plots=not args.no_plots)
    ctx.console.print(f"wrote {res.path}")
    for p in res.plots:
        ctx.console.print(f"  plot {p}")
    if res.plot_note:
        ctx.console.print(f"[yellow]{res.plot_note}[/]")
    return 0
