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

`--seeds N`: one array job per stage, `sbatch --array=0-(N-1)`, task i running seed i of the
list (`submit_array_graph`). Each task is a run of its own (its run dir `<run_id>-t<i>`, its
spec with its seed, its record with job id `<array job>_<i>`), so the run-dir protocol, the
monitor, pull and `orch stop` (`scancel <array job>_<i>`) treat it as any run. A downstream
array waits with `--dependency=aftercorr:<upstream array>`: its task i starts once task i of
the upstream succeeded, and `--kill-on-invalid-dep=yes` makes Slurm cancel only task i when
that one failed (seed S's stage 4 waits on seed S's 3B only). With --resume a stage whose
seeds wait on different upstream arrays (some seeds' upstream already succeeded) is split
into one array job per such group, since Slurm cancels a task whose upstream array has no
task of its index.
"""

from __future__ import annotations

import posixpath
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs import overrides as ov
from jobs.pipeline import dependency_graph, plan
from jobs.spec import StageSpec
from jobs.stages import REPORT_STAGE
from orchestrator import bootstrap, wrapper
from orchestrator.config import SlurmTarget as SlurmConfig
from orchestrator.context import Context
from orchestrator.launch import launch_stage, run_dir_of, tmux_session_for
from orchestrator.pipeline_runner import WAIT_GRACE_S, resolve_specs, run_report, succeeded_on
from orchestrator.pull import pull_run
from orchestrator.targets.factory import make_target
from state import names
from state.errors import OrchError, StageError
from state.models import RunRecord, RunSpec
from state.phases import Phase
from state.slurm import array_spec, group_tasks, split_job_id, task_job_id


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

    submitted: dict[str, RunRecord] = {}
    budget = 0.0
    for i, stage in enumerate(order):
        spec = specs[stage]
        after = {d: submitted[d] for d in spec.depends_on if d in submitted}
        try:
            rec = launch_stage(ctx, spec, target, sync=i == 0, profile=prof, after=after or None)
        except OrchError as exc:
            done = ", ".join(f"{s} (job {r.job_id})" for s, r in submitted.items())
            raise _submit_failed(stage, target, exc, done) from exc
        submitted[stage] = rec
        budget += spec.timeout_s
        deps = ", ".join(f"{d} (job {r.job_id})" for d, r in after.items())
        ctx.console.print(
            f"  submitted {stage}: {rec.key}, Slurm job {rec.job_id}"
            + (f", after {deps}" if deps else "")
        )
    return submitted, budget


def _submit_failed(stage: str, target: str, exc: OrchError, done: str) -> StageError:
    """The error of a submission that failed halfway: what is queued already and what to do."""
    return StageError(
        f"submitting {stage} to {target!r} failed: {exc}",
        hint=f"already submitted and left queued: {done}; `orch stop` them or "
        "run again with --resume once they succeeded"
        if done
        else "nothing was submitted",
    )


def submit_array_graph(
    ctx: Context,
    target: str,
    seeds: list[int],
    *,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    skip_succeeded: bool = False,
) -> tuple[list[dict[str, RunRecord]], float]:
    """Submit the study for every seed at once, one array job per stage (task i: `seeds[i]`),
    each array after its upstream arrays (`aftercorr`). Returns (one `{stage: run}` per seed
    that has anything to run, the longest the graph may take)."""
    prof = profile or ctx.config.experiment.profile
    graph = dependency_graph()
    full = [s for s in plan(["all"], set(), with_deps=False, graph=graph) if s != REPORT_STAGE]
    specs: dict[int, dict[str, StageSpec]] = {}
    for seed in seeds:
        have = succeeded_on(ctx, list(graph), [target], seed)
        order = plan(["all"], set(have), with_deps=False, graph=graph)
        if skip_succeeded:
            order = [s for s in order if s not in have]
        order = [s for s in order if s != REPORT_STAGE]
        if not order:  # --resume: this seed is done
            specs[seed] = {}
            continue
        seeded = {**ov.normalize(overrides), "seed": seed}
        specs[seed] = resolve_specs(order, prof, seeded, ctx.config.experiment.overrides)
    ctx.console.print(
        f"graph ({prof}, seeds {', '.join(map(str, seeds))}) on {target}: "
        f"{' -> '.join(full)}, one array job per stage, submitted at once"
    )
    index = {seed: i for i, seed in enumerate(seeds)}
    submitted: dict[int, dict[str, RunRecord]] = {seed: {} for seed in seeds}
    budget = 0.0
    first = True
    for stage in full:
        members = [seed for seed in seeds if stage in specs[seed]]
        ups: dict[int, list[str]] = {}
        for seed in members:
            deps = [d for d in specs[seed][stage].depends_on if d in submitted[seed]]
            ups[index[seed]] = [split_job_id(submitted[seed][d].job_id)[0] for d in deps]
        for arrays, indices in group_tasks(ups):
            group = [seeds[i] for i in indices]
            try:
                recs = _submit_array(
                    ctx, target, stage, specs, group, index, submitted, prof, first
                )
            except OrchError as exc:
                done = ", ".join(
                    sorted({f"{s} (array job {split_job_id(r.job_id)[0]})"
                            for runs in submitted.values() for s, r in runs.items()})
                )  # fmt: skip
                raise _submit_failed(stage, target, exc, done) from exc
            first = False
            for seed, rec in zip(group, recs, strict=True):
                submitted[seed][stage] = rec
            job = split_job_id(recs[0].job_id)[0]
            after = f", after array job(s) {', '.join(arrays)} (aftercorr)" if arrays else ""
            ctx.console.print(
                f"  submitted {stage}: Slurm array job {job}, tasks {array_spec(indices)} "
                f"(seeds {', '.join(map(str, group))}){after}"
            )
        if members:
            budget += max(specs[seed][stage].timeout_s for seed in members)
    return [submitted[seed] for seed in seeds if submitted[seed]], budget


def _submit_array(
    ctx: Context,
    target: str,
    stage: str,
    specs: Mapping[int, Mapping[str, StageSpec]],
    group: list[int],
    index: Mapping[int, int],
    submitted: Mapping[int, Mapping[str, RunRecord]],
    profile: str,
    sync: bool,
) -> list[RunRecord]:
    """One array job for `stage`, one task per seed of `group`: every task's run dir is
    prepared first (`launch_stage(held=True)`), then one sbatch; the records (by `group`)."""
    # lazy, for start-up time: only this path needs orchestrator.slurm.submit
    from orchestrator.slurm.submit import submit_array

    spec0 = specs[group[0]][stage]
    base, tail = _array_run_ids(ctx, spec0.stage_dir, [index[s] for s in group])
    held: list[RunRecord] = []
    try:
        for k, seed in enumerate(group):
            spec = specs[seed][stage]
            after = {d: submitted[seed][d] for d in spec.depends_on if d in submitted[seed]}
            rid = f"{base}-t{index[seed]}{tail}"
            held.append(
                launch_stage(
                    ctx,
                    spec,
                    target,
                    sync=sync and k == 0,
                    run_id=rid,
                    profile=profile,
                    after=after or None,
                    held=True,
                )
            )
        _, tcfg = ctx.config.target(target)
        assert isinstance(tcfg, SlurmConfig)
        # `%a`: Slurm puts each task's index there (its output lands in that task's run dir)
        pattern = run_dir_of(spec0.stage_dir, f"{base}-t0{tail}")[: -len(f"0{tail}")] + "%a" + tail
        box = make_target(ctx, target)
        try:
            python = bootstrap.ensure_env(ctx, box)
            tasks = {
                index[seed]: (RunSpec.model_validate_json(rec.spec_json), rec)
                for seed, rec in zip(group, held, strict=True)
            }
            upstream = {
                submitted[seed][d].job_id: submitted[seed][d].key
                for seed in group
                for d in specs[seed][stage].depends_on
                if d in submitted[seed]
            }
            job = submit_array(
                box,
                tcfg,
                tasks,
                job_name=tmux_session_for(spec0.name, f"{base}{tail}"),
                output_dir_abs=posixpath.join(box.workdir, pattern),
                python=python,
                nproc=spec0.nproc_per_node,
                wrapper_path=wrapper.wrapper_remote_path(box.workdir),
                after=upstream or None,
            )
        finally:
            box.close()
    except BaseException as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        for rec in held:
            ctx.store.update_run(
                rec.stage_dir, rec.run_id, phase=Phase.FAILED, reason=f"launch failed: {why}"
            )
        raise
    out: list[RunRecord] = []
    for seed, rec in zip(group, held, strict=True):
        tid = task_job_id(job, index[seed])
        ctx.store.update_run(
            rec.stage_dir,
            rec.run_id,
            phase=Phase.QUEUED,
            job_id=tid,
            reason=f"submitted as Slurm array job {job}, task {index[seed]} (seed {seed})",
        )
        final = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert final is not None
        out.append(final)
    return out


def _array_run_ids(ctx: Context, stage_dir: str, indices: list[int]) -> tuple[str, str]:
    """(base, tail) of an array's run ids `<base>-t<i><tail>`, none of them taken yet (a second
    array of the same stage within the same second gets a short random tail)."""
    base, tail = names.new_run_id(), ""
    while any(ctx.store.get_run(stage_dir, f"{base}-t{i}{tail}") for i in indices):
        tail = "x" + secrets.token_hex(1)
    return base, tail


def wait_graph(
    ctx: Context, submitted: Mapping[str, RunRecord], timeout_s: float, *, pull: bool = True
) -> tuple[list[RunRecord], list[str]]:
    """Wait for every submitted run (polling the target, or reading the store while an
    `orch watch` runs) and pull the succeeded ones. (final records, failures)."""
    # lazy, for start-up time: only this path needs orchestrator.monitor.refresh
    from orchestrator.monitor.refresh import wait_for_run

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


def _refuse_resume_while_running(ctx: Context, target: str) -> None:
    """`--resume` submits every stage without a succeeded run: with the earlier graph still
    queued or running on the cluster that would submit those stages a second time."""
    # lazy, for start-up time: only this path needs orchestrator.monitor.statemachine
    from orchestrator.monitor.statemachine import MONITORED_PHASES

    study = set(dependency_graph()) - {REPORT_STAGE}
    active = [
        r
        for r in ctx.store.list_runs(active_only=True)
        if r.target == target and r.stage in study and r.phase in MONITORED_PHASES
    ]
    if active:
        shown = ", ".join(f"{r.key} ({r.phase.value})" for r in active[:4])
        more = f" and {len(active) - 4} more" if len(active) > 4 else ""
        raise StageError(
            f"{len(active)} run(s) of the study are still queued or running on {target!r}: "
            f"{shown}{more}; --resume would submit their stages again",
            hint="let them end (`orch watch`, `orch status`), or `orch stop` them, then resume",
        )


def run_graph(
    ctx: Context,
    target: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    profile: str | None = None,
    skip_succeeded: bool = False,
    report_out: Path | None = None,
    seeds: list[int] | None = None,
    detach: bool = False,
) -> list[RunRecord]:
    """The whole study as one graph on a slurm target (with `seeds`: one array job per stage,
    a task per seed), then the report. StageError (after every run ended) when a stage did not
    succeed. `detach`: return the submitted runs at once; the cluster runs the graph, `orch
    watch` alerts and pulls whenever it runs, `orch report` writes the report."""
    if skip_succeeded:
        _refuse_resume_while_running(ctx, target)
    graphs: list[dict[str, RunRecord]] = []
    budget = 0.0
    if seeds:
        graphs, budget = submit_array_graph(
            ctx, target, seeds, overrides=overrides, profile=profile,
            skip_succeeded=skip_succeeded,
        )  # fmt: skip
    else:
        sub, budget = submit_graph(
            ctx, target, overrides=overrides, profile=profile, skip_succeeded=skip_succeeded
        )
        graphs.append(sub)
    if detach:
        ctx.console.print(
            "  the cluster runs the study now, with nobody waiting here. `orch watch` (any "
            "time, from any machine with this project) alerts and pulls each stage as it ends; "
            "`orch status` shows where it is; `orch report` writes the report once all ended"
        )
        return [rec for sub in graphs for rec in sub.values()]
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
