"""`orch pull [RUN ...] [--all] [--checkpoints]`: copy runs down and verify their manifests."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.context import Context
from orchestrator.progress import Steps
from orchestrator.pull import PullResult, pull_run
from orchestrator.targets.factory import require_run_target
from state.errors import OrchError, StageError
from state.models import RunRecord
from state.phases import Phase
from state.store import RUN_FORMS


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pull", help="copy runs into local runs/ and verify them against their manifest"
    )
    p.add_argument(
        "runs",
        metavar="RUN",
        nargs="*",
        help=f"{RUN_FORMS} (default: latest)",
    )
    p.add_argument("--all", action="store_true", help="every succeeded run not pulled yet")
    p.add_argument("--checkpoints", action="store_true", help="include checkpoints/ (large)")
    p.set_defaults(func=handle)


def select_runs(ctx: Context, refs: list[str], all_: bool) -> list[RunRecord]:
    if all_:
        if refs:
            raise StageError("give RUN names or --all, not both")
        todo = [
            r for r in ctx.store.list_runs() if r.phase == Phase.SUCCEEDED and r.pulled_at is None
        ]
        gone = [r.key for r in todo if r.target not in ctx.config.targets]
        if gone:
            ctx.err.print(
                f"[yellow]note:[/] skipped, their target is no longer in orch.toml: {', '.join(gone)}",
                markup=True,
                highlight=False,
            )
        return [r for r in todo if r.target in ctx.config.targets]
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
            require_run_target(ctx, rec, "pull")
            res = pull_run(ctx, rec, checkpoints=args.checkpoints, report=Steps(ctx.console))
            ctx.console.print(format_result(res))
        except OrchError as exc:
            if len(runs) == 1:
                raise
            failures += 1
            ctx.err.print(f"[bold red]error:[/] {rec.key}: {exc}")
    return 1 if failures else 0
