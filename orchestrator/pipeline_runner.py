"""Run several stages in dependency order on one or several targets: `orch run-all`,
`orch launch STAGE --with-deps`.

    recs = run_stages(ctx, ["all"], targets=["a", "b"], overrides={"max_steps": 50})

Everything is resolved and validated first (stage names, profile, overrides, missing inputs),
so a typo launches nothing. Then `jobs.pipeline.Scheduler` places stages: one stage at a time
per target; independent stages run on different targets at the same time; a stage that needs
a checkpoint runs on the target where that checkpoint is (the checkpoint never travels through
the laptop). Each run is launched (`launch_stage`), waited on (`wait_for_run`), and its results
pulled (no checkpoints) so `orch report` can read them. After the first failure nothing new is
launched (nothing downstream ever starts on a failed input); runs already in flight are waited
for, then StageError names what failed and what was not launched. The local `report` stage, if
planned, runs last, here, once every planned stage succeeded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import overrides as ov
from jobs.pipeline import Scheduler, dependency_graph, plan
from jobs.spec import StageSpec
from jobs.stages import REPORT_STAGE, check_shared, get_stage
from orchestrator.context import Context
from orchestrator.launch import check_layout, launch_stage, run_seed
from orchestrator.progress import StagesProgress, Steps
from orchestrator.pull import pull_run
from state.errors import OrchError, StageError
from state.models import RunRecord
from state.phases import Phase

#: Where `run-all` and `orch report` write the report unless told otherwise (ignored by git:
#: a run never rewrites the repository's own files).
DEFAULT_REPORT = Path("reports") / "RESULTS.md"
#: Extra time past a stage's own timeout before the runner gives up waiting (the monitor
#: normally marks the run timed_out well before this).
WAIT_GRACE_S = 900.0


@dataclass
class _Outcome:
    stage: str
    rec: RunRecord | None
    error: str = ""


def succeeded_on(
    ctx: Context, stages: list[str], targets: list[str], seed: int | None = None
) -> dict[str, str]:
    """`{stage: target}` for stages with a succeeded run on one of `targets` (the latest one;
    of study seed `seed` when given)."""
    found: dict[str, str] = {}
    for name in stages:
        if name == REPORT_STAGE:
            continue
        for rec in ctx.store.list_runs(stage=name):  # newest first
            if seed is not None and run_seed(rec) != seed:
                continue
            if rec.phase == Phase.SUCCEEDED and rec.target in targets:
                found[name] = rec.target
                break
    return found


def resolve_specs(
    stages: list[str],
    profile: str,
    overrides: Mapping[str, Any] | None,
    shared: Mapping[str, Any] | None,
) -> dict[str, StageSpec]:
    """Every planned stage's spec. `overrides` apply to the planned stages that take each key
    (a key none of them takes is a ConfigError); `shared` (orch.toml) likewise."""
    names = [s for s in stages if s != REPORT_STAGE] or list(stages)
    check_shared(overrides, names)
    merged = {**ov.normalize(shared), **ov.normalize(overrides)}
    return {s: get_stage(s, profile, shared=merged) for s in stages}


def _run_one(
    ctx: Context,
    spec: StageSpec,
    target: str,
    profile: str,
    out: queue.Queue[_Outcome],
    live: StagesProgress,
) -> None:
    """Thread body: launch, wait, pull. Always puts exactly one outcome on `out`."""
    # lazy, for start-up time: only this path needs orchestrator.monitor.refresh
    from orchestrator.monitor.refresh import wait_for_run

    rec: RunRecord | None = None
    steps = Steps(ctx.console, prefix=f"  {spec.name}: ", spinner=False)  # above the live table
    try:
        live.set(spec.name, target=target, state="launching")
        rec = launch_stage(ctx, spec, target, profile=profile, report=steps)
        live.set(spec.name, rec=rec)
        ctx.console.print(f"  started  {spec.name} on {target}: {rec.key}")
        rec = wait_for_run(
            ctx, rec.stage_dir, rec.run_id, timeout_s=spec.timeout_s + WAIT_GRACE_S,
            on_poll=lambda r: live.set(spec.name, rec=r),
        )  # fmt: skip
        if rec.phase != Phase.SUCCEEDED:
            why = f": {rec.reason}" if rec.reason else ""
            out.put(_Outcome(spec.name, rec, f"{rec.key} {rec.phase.value}{why}"))
            return
        pulled = pull_run(ctx, rec, report=steps)
        out.put(_Outcome(spec.name, pulled.rec))
    except OrchError as exc:
        out.put(_Outcome(spec.name, rec, str(exc)))
    except Exception as exc:  # a bug must not hang the pipeline: report it as this stage's failure
        out.put(_Outcome(spec.name, rec, f"{type(exc).__name__}: {exc}"))


def run_report(
    ctx: Context, report_out: Path | None, seeds: list[int] | None = None, indent: str = "  "
) -> None:
    """Write the report (of `seeds`, else every seed pulled) and say where, what it replaced
    outside `reports/`, and which stages it lacks."""
    # lazy, for start-up time: only this path needs jobs.report
    from jobs.report import write_report

    out = report_out or ctx.project_root / DEFAULT_REPORT
    res = write_report(ctx.runs_dir, out, seeds=seeds)
    shown = _rel(ctx, res.path)
    ctx.console.print(
        f"{indent}report   {shown}" + (f" (+ {len(res.plots)} plots)" if res.plots else "")
    )
    default_dir = (ctx.project_root / DEFAULT_REPORT).parent
    replaced = [p for p in res.replaced if p.parent.resolve() != default_dir.resolve()]
    if replaced:
        ctx.console.print(
            f"{indent}[yellow]replaced[/] {', '.join(_rel(ctx, p) for p in replaced)}"
        )
    if res.study is not None and len(res.study.runs) > 1:
        held = [c for c in res.study.spread.claims if c.holds]
        ctx.console.print(
            f"{indent}seeds    {', '.join(map(str, res.study.runs))}: "
            f"{len(held)} of {len(res.study.spread.claims)} claims hold on every seed"
        )
    if res.data.missing:
        ctx.console.print(
            f"{indent}[yellow]not in the report[/] (no pulled run): {', '.join(res.data.missing)}"
        )
    if res.plot_note and res.plot_note != "plots not requested":
        ctx.console.print(f"{indent}[yellow]{res.plot_note}[/]")


def _rel(ctx: Context, path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ctx.project_root.resolve()))
    except ValueError:
        return str(path)


def run_stages(
    ctx: Context,
    stages: list[str],
    *,
    targets: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    with_deps: bool = False,
    profile: str | None = None,
    skip_succeeded: bool = False,
    report_out: Path | None = None,
    progress: StagesProgress | None = None,
    seed: int | None = None,
    report_seeds: list[int] | None = None,
) -> list[RunRecord]:
    """Run `stages` (names, or `all`) and, with `with_deps`, their missing upstream stages.
    Shows a live table of the stages (`progress`, else one of its own; plain lines when
    stdout is not a terminal).

    Returns the final records of the runs launched, in completion order. Raises StageError
    (after in-flight runs end) if any stage failed, naming it and the stages not launched.
    `skip_succeeded`: stages that already have a succeeded run on one of the targets are not
    run again (resume a study). `seed`: the study seed of every stage (`--set seed=S`; on the
    tiny profile it also picks the tiny model built from it); upstream runs and resumed runs are
    then those of that seed. `report_seeds`: the seeds the `report` stage covers.
    """
    target_names = list(dict.fromkeys(targets or [ctx.config.default_target]))
    for t in target_names:
        ctx.config.target(t)  # ConfigError for an unknown target, before anything starts
    prof = profile or ctx.config.experiment.profile
    graph = dependency_graph()
    if seed is not None:
        overrides = {**ov.normalize(overrides), "seed": seed}
    have = succeeded_on(ctx, list(graph), target_names, seed)
    order = plan(stages, set(have), with_deps=with_deps, graph=graph)
    if skip_succeeded:
        order = [s for s in order if s not in have]
    specs = resolve_specs(order, prof, overrides, ctx.config.experiment.overrides)

    for spec in specs.values():  # a stage may land on any of the targets
        for t in target_names:
            check_layout(spec, t, ctx.config.target(t)[1].kind)
    located = {s: t for s, t in have.items() if s not in order}
    sched = Scheduler(order=order, targets=target_names, graph=graph, located=located)
    seeded = f", seed {seed}" if seed is not None else ""
    ctx.console.print(
        f"pipeline ({prof}{seeded}): {' -> '.join(order)} on {', '.join(target_names)}"
    )
    live = progress or StagesProgress(ctx.console, order)

    out: queue.Queue[_Outcome] = queue.Queue()
    records: list[RunRecord] = []
    failures: list[str] = []
    in_flight = 0
    if progress is None:
        live.start()
    try:
        while True:
            for stage, target in sched.next_launches():
                if stage == REPORT_STAGE:
                    live.set(stage, target="here", state="writing")
                    try:
                        run_report(ctx, report_out, report_seeds)
                        sched.finished(stage, True)
                        live.set(stage, state="succeeded")
                    except OrchError as exc:
                        failures.append(f"report: {exc}")
                        sched.finished(stage, False)
                        live.set(stage, state="failed")
                    continue
                ctx.console.print(f"  launch   {stage} on {target}")
                thread = threading.Thread(
                    target=_run_one, args=(ctx, specs[stage], target, prof, out, live), daemon=True,
                    name=f"orch-stage-{stage}",
                )  # fmt: skip
                thread.start()
                in_flight += 1
            if in_flight == 0:
                break
            got = out.get()
            in_flight -= 1
            ok = not got.error
            if got.rec is not None:
                records.append(got.rec)
            colour, word = ("green", "succeeded") if ok else ("red", "failed")
            live.set(got.stage, rec=got.rec, state=word)
            ctx.console.print(
                f"  [{colour}]{word}[/] {got.stage}" + ("" if ok else f": {got.error}")
            )
            if not ok:
                failures.append(f"{got.stage}: {got.error}")
            sched.finished(got.stage, ok)
    except KeyboardInterrupt:
        ctx.err.print(
            "[yellow]interrupted: runs already started keep running on their targets; see `orch status`[/]"
        )
        raise
    finally:
        if progress is None:
            live.stop()
    if failures:
        skipped = sched.not_launched()
        hint = f"not launched: {', '.join(skipped)}" if skipped else "fix it and run again"
        raise StageError(f"pipeline stopped: {'; '.join(failures)}", hint=hint)
    return records
