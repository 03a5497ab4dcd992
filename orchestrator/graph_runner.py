"""`orch run-all --target CLUSTER` on a `slurm` target: the whole study submitted at once as the
cluster's own dependency graph, then watched, pulled and reported like any run-all.

    recs = run_graph(ctx, "cluster", overrides={"max_steps": 50})

Every stage is submitted in dependency order before any has run: a downstream stage's job gets
`--dependency=afterok:<its upstream jobs>` and `--kill-on-invalid-dep=yes`, and its inputs (the
upstream checkpoint dirs) are the upstream runs' run dirs, known as soon as those are recorded
(`launch_stage(after=...)`). From then on the cluster runs the study with the laptop closed;
`orch watch`, `orch status` or this command (waiting) pick the runs up whenever they run. A
failed upstream makes Slurm cancel its dependents, which the monitor records as `cancelled`
naming the upstream (orchestrator/monitor/statemachine.py). Once every stage ended, the
succeeded runs are pulled (no checkpoints) and the report written, as `run_stages` does.

`--seeds N`: the study once per seed, each seed its own graph (seed S's stage 4 waits on seed
S's 3B job only).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs import overrides as ov
from jobs.pipeline import dependency_graph, plan
from jobs.stages import REPORT_STAGE
from orchestrator.context import Context
from orchestrator.pipeline_runner import WAIT_GRACE_S, resolve_specs, run_report, succeeded_on
from state.errors import OrchError, StageError
from state.models import RunRecord
from state.phases import Phase


def submit_graph(
    ctx: Context,
    target: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    skip_succeeded: bool = False,
    seed: int | None = None,
) -> tuple[dict[str, RunRecord], float]:
    """Submit every stage of the study (but the local report) to `target` at once, each job
    after its upstream jobs. Returns (runs by stage, the longest the graph may take)."""
    prof = profile or ctx.config.experiment.profile
    graph = dependency_graph()
    if seed is not None:
        overrides = {**ov.normalize(overrides), "seed": seed}
    have = succeeded_on(ctx, list(graph), [target], seed)
    order = plan(["all"], set(have), with_deps=False, graph=graph)
    if skip_succeeded:
        order = [s for s in order if s not in have]
    order = [s for s in order if s != REPORT_STAGE]
    specs = resolve_specs(order, prof, overrides, ctx.config.experiment.overrides)
    seeded = f", seed {seed}" if seed is not None else ""
    ctx.console.print(
        f"graph ({prof}{seeded}) on {target}: {' -> '.join(order)}, submitted at once"
    )
    from orchestrator.launch import launch_stage

    submitted: dict[str, RunRecord] = {}
    budget = 0.0
    for i, stage in enumerate(order):
        spec = specs[stage]
        after = {d: submitted[d] for d in spec.depends_on if d in submitted}
        try:
            rec = launch_stage(ctx, spec, target, sync=i == 0, profile=prof, after=after or None)
        except OrchError as exc:
            done = ", ".join(f"{s} (job {r.job_id})" for s, r in submitted.items())
            raise StageError(
                f"submitting {stage} to {target!r} failed: {exc}",
                hint=f"already submitted and left queued: {done}; `orch stop` them or "
                "run again with --resume once they succeeded"
                if done
                else "nothing was submitted",
            ) from exc
        submitted[stage] = rec
        budget += spec.timeout_s
        deps = ", ".join(f"{d} (job {r.job_id})" for d, r in after.items())
        ctx.console.print(
            f"  submitted {stage}: {rec.key}, Slurm job {rec.job_id}"
            + (f", after {deps}" if deps else "")
        )
    return submitted, budget


def wait_graph(
    ctx: Context, submitted: Mapping[str, RunRecord], timeout_s: float, *, pull: bool = True
) -> tuple[list[RunRecord], list[str]]:
    """Wait for every submitted run (polling the target, or reading the store while an
    `orch watch` runs) and pull the succeeded ones. (final records, failures)."""
    from orchestrator.monitor.refresh import wait_for_run
    from orchestrator.pull import pull_run

    deadline = time.monotonic() + timeout_s
    records: list[RunRecord] = []
    failures: list[str] = []
    for stage, rec in submitted.items():
        left = max(deadline - time.monotonic(), 1.0)
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, timeout_s=left)
        if final.phase != Phase.SUCCEEDED:
            why = f": {final.reason}" if final.reason else ""
            ctx.console.print(f"  [red]{final.phase.value}[/] {stage}: {final.key}{why}")
            failures.append(f"{stage}: {final.key} {final.phase.value}{why}")
            records.append(final)
            continue
        if pull:
            final = pull_run(ctx, final).rec
        ctx.console.print(f"  [green]succeeded[/] {stage}: {final.key}")
        records.append(final)
    return records, failures


def run_graph(
    ctx: Context,
    target: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    skip_succeeded: bool = False,
    report_out: Path | None = None,
    seeds: list[int] | None = None,
) -> list[RunRecord]:
    """The whole study as one graph per seed on a slurm target, then the report. StageError
    (after every run ended) when a stage did not succeed."""
    graphs: list[dict[str, RunRecord]] = []
    budget = 0.0
    for seed in seeds or [None]:  # type: ignore[list-item]
        sub, b = submit_graph(
            ctx, target, overrides=overrides, profile=profile,
            skip_succeeded=skip_succeeded, seed=seed,
        )  # fmt: skip
        graphs.append(sub)
        budget = max(budget, b)
    ctx.console.print(
        "  the cluster runs the study now; waiting (Ctrl-C leaves it running: `orch watch`)"
    )
    records: list[RunRecord] = []
    failures: list[str] = []
    for sub in graphs:
        recs, fails = wait_graph(ctx, sub, budget + WAIT_GRACE_S)
        records += recs
        failures += fails
    if failures:
        raise StageError(
            f"graph stopped: {'; '.join(failures)}",
            hint="fix it and run again with --resume (succeeded stages are kept)",
        )
    run_report(ctx, report_out, seeds)
    return records
