"""`orch pull [RUN ...] [--all] [--checkpoints]`: copy runs down and verify their manifests."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.context import Context
from orchestrator.pull import PullResult, pull_run
from state.errors import OrchError, StageError
from state.models import RunRecord
from state.phases import Phase


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pull", help="copy runs into local runs/ and verify them against their manifest"
    )
    p.add_argument(
        "runs",
        metavar="RUN",
        nargs="*",
        help="run id, stage_dir/run_id, or latest (default: latest)",
    )
    p.add_argument("--all", action="store_true", help="every succeeded run not pulled yet")
    p.add_argument("--checkpoints", action="store_true", help="include checkpoints/ (large)")
    p.set_defaults(func=handle)


def select_runs(ctx: Context, refs: list[str], all_: bool) -> list[RunRecord]:
    if all_:
        if refs:
            raise StageError("give RUN names or --all, not both")
        return [
            r for r in ctx.store.list_runs() if r.phase == Phase.SUCCEEDED and r.pulled_at is None
        ]
    return [ctx.store.resolve_run(ref) for ref in (refs or ["latest"])]


def format_result(res: PullResult) -> str:
    mb = res.stats.bytes_sent / 1e6
    if res.verified is None:
        check = "[yellow]not verified[/] (no manifest yet)"
    else:
        check = f"[green]{res.verified} file(s) verified[/]"
    return f"{res.rec.key} -> {res.local_dir}: {mb:.1f} MB in {res.seconds:.1f}s, {check}"


def handle(args: argparse.Namespace, ctx: Context) -> int:
    runs = select_runs(ctx, args.runs, args.all)
    if not runs:
        ctx.console.print("nothing to pull")
        return 0
    failures = 0
    for rec in runs:
        try:
            ctx.console.print(format_result(pull_run(ctx, rec, checkpoints=args.checkpoints)))
        except OrchError as exc:
            if len(runs) == 1:
                raise
            failures += 1
            ctx.err.print(f"[bold red]error:[/] {rec.key}: {exc}")
    return 1 if failures else 0
