"""`orch launch STAGE [--target NAME] [--set KEY=VALUE ...] [--no-sync] [--wait] [--watch] [--with-deps]`."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.context import Context
from orchestrator.launch import launch_stage
from state.errors import OrchError
from state.models import RunRecord
from state.phases import Phase


def register(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="start a stage on a target (sync code, bootstrap, tmux)",
        description="Start STAGE on a target in a detached tmux session and record the run.",
    )
    p.add_argument(
        "stage",
        metavar="STAGE",
        help="stage name (see `orch stages`), or `all` for the whole study",
    )
    p.add_argument("--target", "-t", help="target name from orch.toml (default: default_target)")
    p.add_argument(
        "--profile", help="experiment profile (default: [experiment] profile, else tiny)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a stage setting (repeatable), e.g. --set max_steps=50",
    )
    p.add_argument(
        "--no-sync", dest="sync", action="store_false", help="do not sync the code first"
    )
    p.add_argument(
        "--wait", action="store_true", help="block until the run ends; exit 0 only on success"
    )
    p.add_argument(
        "--watch", action="store_true", help="watch the run (monitor + alerts) after launching"
    )
    p.add_argument(
        "--with-deps",
        action="store_true",
        help="first run the stages it depends on that have no succeeded run on the target",
    )
    p.set_defaults(func=handle)


def print_launched(ctx: Context, rec: RunRecord) -> None:
    lines = [
        f"launched [bold]{rec.stage}[/] on [bold]{rec.target}[/]",
        f"  run id   {rec.run_id}",
        f"  run dir  {rec.run_dir}",
        f"  session  {rec.session}",
        f"  follow   orch logs -f {rec.run_id}   |   tmux attach -t {rec.session}",
    ]
    for line in lines:
        ctx.console.print(line, soft_wrap=True)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from jobs import overrides as ov

    overrides = ov.parse_assignments(args.overrides)
    profile = args.profile or ctx.config.experiment.profile
    shared = ctx.config.experiment.overrides
    if args.stage == "all":  # `orch launch all` = `orch run-all` on the chosen target
        from orchestrator.pipeline_runner import run_stages

        recs = run_stages(
            ctx, ["all"], targets=[args.target] if args.target else None,
            overrides=overrides, profile=profile,
        )  # fmt: skip
        ctx.console.print(f"[green]study done[/]: {len(recs)} run(s)")
        return 0
    if args.with_deps:
        from orchestrator.pipeline_runner import run_stages

        recs = run_stages(
            ctx, [args.stage], targets=[args.target] if args.target else None,
            overrides=overrides, with_deps=True, profile=profile,
        )  # fmt: skip
        for r in recs:
            print_launched(ctx, r)
        if not recs:
            return 1
        rec = recs[-1]
    else:
        from jobs.stages import get_stage

        stage = get_stage(args.stage, profile, overrides, shared=shared)
        rec = launch_stage(ctx, stage, args.target, sync=args.sync, profile=profile)
        print_launched(ctx, rec)
    if args.watch:
        from orchestrator.monitor.watch import watch

        return int(watch(ctx, targets=[rec.target], stop_when_idle=True) or 0)
    if args.wait:
        return wait_and_report(ctx, rec)
    return 0


def wait_and_report(ctx: Context, rec: RunRecord) -> int:
    """Block until the run ends (the monitor's wait_for_run); 0 only if it succeeded."""
    try:
        from orchestrator.monitor.refresh import wait_for_run
    except ImportError as exc:  # pragma: no cover - the monitor ships with orch
        raise OrchError("--wait needs orch's monitor (orchestrator.monitor.refresh)") from exc
    ctx.console.print(f"waiting for {rec.key} ...")
    final = wait_for_run(ctx, rec.stage_dir, rec.run_id)
    colour = "green" if final.phase == Phase.SUCCEEDED else "red"
    line = f"{final.key}: [{colour}]{final.phase.value}[/]"
    if final.exit_code is not None:
        line += f" (exit code {final.exit_code})"
    if final.reason:
        line += f": {final.reason}"
    ctx.console.print(line)
    return 0 if final.phase == Phase.SUCCEEDED else 1
