"""`orch run-all [--targets a,b] [--set KEY=VALUE ...] [--profile P] [--seeds N|a,b] [--resume]
[--out PATH]`: the whole study, stage 1 to the report, in dependency order (once per seed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jobs import overrides as ov
from orchestrator.config import SlurmTarget
from orchestrator.context import Context
from state.errors import ConfigError


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
        "--targets",
        "--target",
        "-t",
        help="comma-separated target names (default: the default target); one slurm target: "
        "the whole study is submitted at once as the cluster's dependency graph",
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
    p.add_argument(
        "--seeds",
        help="run the study once per seed and report the spread: N (seeds 0..N-1) or a list "
        "a,b,c. On the tiny profile a seed also rebuilds the tiny model from it",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="on a slurm target: submit the study's graph and return; the cluster runs it "
        "(`orch watch` alerts and pulls, `orch report` writes the report)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="where to write the report (default: reports/RESULTS.md, ignored by git)",
    )
    p.set_defaults(func=handle)


def parse_seeds(text: str | None, *, count: bool = True) -> list[int] | None:
    """`3` -> [0, 1, 2] (with `count`; else [3]); `0,4,7` -> [0, 4, 7]; ConfigError else."""
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        values = []
    as_count = count and len(values) == 1 and "," not in text
    if not values or (as_count and values[0] < 1) or any(v < 0 for v in values):
        what = (
            "a count (3: seeds 0, 1, 2) or a list of seeds (0,4,7)"
            if count
            else "a list of seeds (0,4,7)"
        )
        raise ConfigError(f"--seeds {text!r}: expected {what}", hint="e.g. --seeds 0,1,2")
    seeds = list(range(values[0])) if as_count else values
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is listed twice", hint="list each seed once")
    return seeds


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: the pipeline runner loads launch, pull, codesync and the dashboard
    from jobs.stages import STAGE_NAMES, STUDY_STAGES
    from orchestrator.pipeline_runner import run_report, run_stages

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    overrides = ov.parse_assignments(args.overrides)
    seeds = parse_seeds(args.seeds)
    slurm = _slurm_target(ctx, targets)
    if args.detach and slurm is None:
        raise ConfigError(
            "--detach needs one slurm target: elsewhere orch itself starts each stage when "
            "its inputs are ready, so it must keep running",
            hint="drop --detach (Ctrl-C stops waiting, not a running stage), or use "
            "--target with a slurm target",
        )
    if slurm is not None:  # the cluster runs the graph itself (orchestrator/graph_runner.py)
        # lazy, for start-up time: orchestrator.graph_runner only here
        from orchestrator.graph_runner import run_graph

        if seeds and any(
            ov.split_scope(k, STAGE_NAMES)[1] == "seed" for k in ov.normalize(overrides)
        ):
            raise ConfigError(
                "--seeds and --set seed=... both set the seed", hint="use one of them"
            )
        recs = run_graph(
            ctx, slurm, overrides=overrides, profile=args.profile, skip_succeeded=args.resume,
            report_out=args.out, seeds=seeds, detach=args.detach,
        )  # fmt: skip
        if args.detach:
            ctx.console.print(f"[green]submitted[/]: {len(recs)} run(s) on {slurm}")
        else:
            ctx.console.print(f"[green]study done[/]: {len(recs)} run(s) on {slurm}")
        return 0
    if seeds is None:
        recs = run_stages(
            ctx,
            ["all"],
            targets=targets,
            overrides=overrides,
            profile=args.profile,
            skip_succeeded=args.resume,
            report_out=args.out,
        )
        ctx.console.print(f"[green]study done[/]: {len(recs)} run(s)")
        return 0
    if any(ov.split_scope(k, STAGE_NAMES)[1] == "seed" for k in ov.normalize(overrides)):
        raise ConfigError("--seeds and --set seed=... both set the seed", hint="use one of them")
    recs = []
    for i, seed in enumerate(seeds, 1):
        ctx.console.print(f"[bold]seed {seed}[/] ({i} of {len(seeds)})")
        recs += run_stages(
            ctx,
            list(STUDY_STAGES),
            targets=targets,
            overrides=overrides,
            profile=args.profile,
            skip_succeeded=args.resume,
            seed=seed,
        )
    run_report(ctx, args.out, seeds, indent="")
    ctx.console.print(f"[green]study done[/]: {len(recs)} run(s) over {len(seeds)} seeds")
    return 0


def _slurm_target(ctx: Context, targets: list[str] | None) -> str | None:
    """The one target's name when run-all is given exactly one and it is a slurm target."""
    names = targets or [ctx.config.default_target]
    if len(names) != 1:
        return None
    name, cfg = ctx.config.target(names[0])
    return name if isinstance(cfg, SlurmTarget) else None
