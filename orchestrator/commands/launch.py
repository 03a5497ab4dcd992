"""`orch launch STAGE [--target NAME] [--set KEY=VALUE ...] [--resume RUN] [--no-sync] [--wait [--no-pull]] [--watch] [--with-deps]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.markup import escape

import jobs.stages
from jobs import overrides as ov
from orchestrator.context import Context
from orchestrator.launch import launch_stage
from orchestrator.progress import RunProgress, Steps
from orchestrator.pull import local_run_dir, pull_run, run_location
from state.errors import OrchError
from state.models import RunRecord
from state.phases import Phase
from state.store import RUN_FORMS


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
        "--no-pull",
        dest="pull",
        action="store_false",
        help="with --wait: do not pull the results into runs/ when the run succeeds",
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="relaunch RUN (a training run of STAGE that ended unfinished) with its exact "
        f"settings, resuming from its newest checkpoint; RUN is {RUN_FORMS}",
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
        f"  run dir  {escape(run_location(ctx, rec))}",
        f"  session  {rec.session}",
        f"  follow   orch logs -f {rec.run_id}   |   tmux attach -t {rec.session}",
    ]
    for line in lines:
        ctx.console.print(line, soft_wrap=True)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    overrides = ov.parse_assignments(args.overrides)
    profile = args.profile or ctx.config.experiment.profile
    shared = ctx.config.experiment.overrides
    if args.stage == "all":  # `orch launch all` = `orch run-all` on the chosen target
        # lazy, for start-up time: orchestrator.pipeline_runner only here
        from orchestrator.pipeline_runner import run_stages

        recs = run_stages(
            ctx, ["all"], targets=[args.target] if args.target else None,
            overrides=overrides, profile=profile,
        )  # fmt: skip
        ctx.console.print(f"[green]study done[/]: {len(recs)} run(s)")
        return 0
    if args.resume:
        if overrides or args.with_deps or args.profile:
            raise OrchError(
                "--resume relaunches the run with its recorded settings",
                hint="drop --set, --profile and --with-deps",
            )
        # lazy, for start-up time: orchestrator.vast.relaunch only here
        from orchestrator.vast.relaunch import resume_run

        rec = resume_run(ctx, args.resume, args.stage, sync=args.sync, report=Steps(ctx.console))
        print_launched(ctx, rec)
        spec = json.loads(rec.spec_json or "{}")
        ctx.console.print(
            f"  resumes  {escape(str(spec.get('resumed_from') or 'step 0 (no checkpoint found)'))}"
        )
    elif args.with_deps:
        # lazy, for start-up time: orchestrator.pipeline_runner only here
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
        stage = jobs.stages.get_stage(args.stage, profile, overrides, shared=shared)
        rec = launch_stage(
            ctx, stage, args.target, sync=args.sync, profile=profile, report=Steps(ctx.console)
        )
        print_launched(ctx, rec)
    if args.watch:
        return watch_with_progress(ctx, rec)
    if args.wait:
        return wait_and_report(ctx, rec, pull=args.pull)
    return 0


def watch_with_progress(ctx: Context, rec: RunRecord) -> int:
    """`--watch`: the watcher (alerts, completion actions) with the run's live line."""
    # lazy, for start-up time: pulls in apscheduler
    from orchestrator.monitor.watch import watch

    def tick() -> None:
        got = ctx.store.get_run(rec.stage_dir, rec.run_id)
        if got is not None:
            live.update(got)

    with RunProgress(ctx.console) as live:
        live.update(rec)
        rc = int(watch(ctx, targets=[rec.target], stop_when_idle=True, on_tick=tick) or 0)
        tick()  # the live line ends on the run's final state
    final = ctx.store.get_run(rec.stage_dir, rec.run_id)
    if final is not None and final.pulled_at is not None:
        ctx.console.print(f"  results  {escape(shown_path(ctx, local_run_dir(ctx, final)))}")
    return rc


def shown_path(ctx: Context, path: Path) -> str:
    """`path` relative to where orch was started when it is below it, else absolute."""
    try:
        return str(path.relative_to(ctx.cwd))
    except ValueError:
        return str(path)


def wait_and_report(ctx: Context, rec: RunRecord, *, pull: bool = True) -> int:
    """Block until the run ends (the monitor's wait_for_run) with its live line, then (with
    `pull`, after a success) pull its results into `runs/`; 0 only if it succeeded."""
    try:
        # lazy, for start-up time: orchestrator.monitor.refresh only here
        from orchestrator.monitor.refresh import wait_for_run
    except ImportError as exc:  # pragma: no cover - the monitor ships with orch
        raise OrchError("--wait needs orch's monitor (orchestrator.monitor.refresh)") from exc
    ctx.console.print(
        f"waiting for {rec.key} (Ctrl-C stops waiting, not the run)", markup=False, soft_wrap=True
    )
    with RunProgress(ctx.console) as live:
        live.update(rec)
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, on_poll=live.update)
    colour = "green" if final.phase == Phase.SUCCEEDED else "red"
    line = f"{final.key}: [{colour}]{final.phase.value}[/]"
    if final.exit_code is not None:
        line += f" (exit code {final.exit_code})"
    if final.reason:
        line += f": {escape(final.reason)}"
    ctx.console.print(line)
    if final.phase != Phase.SUCCEEDED:
        return 1

    if pull and final.pulled_at is None:  # a running `orch watch` may have pulled it already
        pull_run(ctx, final, report=Steps(ctx.console))
    if pull:
        ctx.console.print(f"  results  {escape(shown_path(ctx, local_run_dir(ctx, final)))}")
    else:
        ctx.console.print(f"  not pulled (--no-pull): `orch pull {final.key}` copies it here")
    return 0
