"""`orch report`: read the pulled runs, compute the study's numbers, write reports/RESULTS.md + PNGs.

    data = collect(runs_dir)                 # latest succeeded run per stage -> ReportData
    study = collect_study(runs_dir, [0, 1])  # the same per seed, and the spread across seeds
    result = write_report(runs_dir, out)     # RESULTS.md and its plots beside it
    numbers = data.to_json()                 # what `orch report --json` prints

Reads, per stage (and per study seed, `task.args.seed` of the run's spec), the latest run under
`runs/<stage_dir>/` that has `.run_complete`:
`metrics.json` (eval), `summary.json` (train), `events.jsonl` (loss curves, leakage probes) and
`spec.json` (commit, profile, target). Readers accept the few shapes the worker's files may take
and never guess a number that is not there: a missing number is shown as "-".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs import plots
from jobs.profiles import PROFILES
from jobs.recovery import leak_ratio, macro, study_math
from jobs.report_model import LeakProbe, ReportData, StageResult, StudyReport, TaskScore
from jobs.report_text import LABELS, render_markdown
from jobs.seeds import across_seeds
from jobs.stages import RECIPES, REPORT_STAGE, recipe
from state import names
from state.errors import StageError
from state.protocol import atomic_write_text, read_events

EVAL_THROUGHPUT = (
    "eval_seconds",
    "n_questions",
    "tokens_forwarded",
    "questions_per_s",
    "examples_per_s",
    "choices_per_s",
    "tokens_per_s",
    "wall_s",
    "seconds",
)
TRAIN_THROUGHPUT = (
    "train_steps_per_second",
    "train_tokens_per_second",
    "steps_per_s",
    "tokens_per_s",
    "train_runtime",
    "wall_s",
    "seconds",
)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _first(d: Any, *keys: str) -> float | None:
    if not isinstance(d, dict):
        return None
    for k in keys:
        v = _num(d.get(k))
        if v is not None:
            return v
    return None


# --- reading runs --------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _succeeded(stage_root: Path) -> list[Path]:
    """Run dirs with `.run_complete`, oldest first (run ids sort by time)."""
    if not stage_root.is_dir():
        return []
    done = [p for p in stage_root.iterdir() if p.is_dir() and (p / names.RUN_COMPLETE).is_file()]
    return sorted(done, key=lambda p: p.name)


def run_seed(run_dir: Path) -> int | None:
    """The study seed of a run: `task.args.seed` of its spec.json (None when absent)."""
    spec = _read_json(run_dir / names.SPEC) or {}
    seed = ((spec.get("task") or {}).get("args") or {}).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


#: `collect(..., seed=ANY_SEED)`: the latest run whatever its seed.
ANY_SEED: Any = object()


def latest_succeeded(stage_root: Path, seed: Any = ANY_SEED) -> Path | None:
    """The newest run dir that has `.run_complete` (and, given a seed, was run with it)."""
    done = _succeeded(stage_root)
    if seed is not ANY_SEED:
        done = [p for p in done if run_seed(p) == seed]
    return done[-1] if done else None


def seeds_in(runs_dir: Path) -> list[int | None]:
    """Every study seed with a succeeded pulled run of some stage, in order (None last)."""
    found: set[int | None] = set()
    for r in RECIPES:
        if r.name != REPORT_STAGE:
            found |= {run_seed(p) for p in _succeeded(runs_dir / r.stage_dir)}
    return sorted(found, key=lambda s: (s is None, s or 0))


def _tasks_of(metrics: dict[str, Any]) -> dict[str, TaskScore]:
    raw = metrics.get("tasks") or metrics.get("per_task") or {}
    if isinstance(raw, list):
        raw = {str(t.get("name", i)): t for i, t in enumerate(raw) if isinstance(t, dict)}
    out: dict[str, TaskScore] = {}
    if isinstance(raw, dict):
        for name, t in raw.items():
            if isinstance(t, dict):
                n = t.get("n", t.get("count", t.get("num_questions")))
                out[str(name)] = TaskScore(
                    acc=_first(t, "acc", "accuracy"),
                    acc_norm=_first(t, "acc_norm", "accuracy_norm"),
                    n=int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None,
                    chance=_first(t, "chance", "chance_acc"),
                )
            elif _num(t) is not None:
                out[str(name)] = TaskScore(acc=_num(t))
    return out


def read_eval(result: StageResult, metrics: dict[str, Any]) -> None:
    result.tasks = _tasks_of(metrics)
    m = metrics.get("macro")
    result.macro_acc = _first(m, "acc", "accuracy") if isinstance(m, dict) else _num(m)
    if result.macro_acc is None:
        result.macro_acc = _first(metrics, "macro_acc", "macro_accuracy", "acc")
    result.macro_acc_norm = _first(m, "acc_norm") if isinstance(m, dict) else None
    if result.macro_acc_norm is None:
        result.macro_acc_norm = _first(metrics, "macro_acc_norm")
    if result.macro_acc is None:
        result.macro_acc = macro({k: t.acc for k, t in result.tasks.items() if t.acc is not None})
    if (
        result.macro_acc_norm is None
        and result.tasks
        and all(t.acc_norm is not None for t in result.tasks.values())
    ):
        result.macro_acc_norm = macro(
            {k: t.acc_norm for k, t in result.tasks.items() if t.acc_norm is not None}
        )
    for src in (metrics, metrics.get("throughput")):
        if isinstance(src, dict):
            result.throughput.update(
                {k: float(src[k]) for k in EVAL_THROUGHPUT if _num(src.get(k)) is not None}
            )
    secs, n = _first(metrics, "eval_seconds"), _first(metrics, "n_questions")
    if secs and n and "questions_per_s" not in result.throughput:
        result.throughput["questions_per_s"] = n / secs
    result.mask = result.mask or (
        metrics.get("mask") if isinstance(metrics.get("mask"), str) else None
    )


def _probe_from(
    data: dict[str, Any], default_mask: str | None, step: int | None
) -> LeakProbe | None:
    raw_mask = data.get("mask")
    mask: str = raw_mask if isinstance(raw_mask, str) else (default_mask or "?")
    loss_mask = _first(
        data, "loss_mask", "mask_loss", f"loss_{mask}", "loss_prefill_bidir", "loss_under_mask"
    )
    loss_causal = _first(data, "loss_causal", "causal_loss")
    if loss_mask is None and loss_causal is None:
        return None
    ratio = _first(data, "ratio")  # (`leak_ratio` is the guard's threshold)
    if ratio is None:
        ratio = leak_ratio(loss_mask, loss_causal).value
    flag = data.get("leak", data.get("flagged", data.get("leak_flag")))
    return LeakProbe(
        mask,
        loss_mask,
        loss_causal,
        ratio,
        flag if isinstance(flag, bool) else None,
        step,
        future_sensitivity=_first(data, "future_sensitivity"),
        max_logit_diff=_first(data, "max_logit_diff"),
    )


def read_train(result: StageResult, summary: dict[str, Any] | None, run_dir: Path) -> None:
    s = summary or {}
    result.train_loss = _first(s, "train_loss", "final_train_loss", "loss")
    result.eval_loss = _first(s, "eval_loss", "final_eval_loss")
    steps = s.get("steps", s.get("global_step", s.get("max_steps")))
    result.steps = (
        int(steps) if isinstance(steps, (int, float)) and not isinstance(steps, bool) else None
    )
    for src in (s, s.get("throughput")):
        if isinstance(src, dict):
            result.throughput.update(
                {k: float(src[k]) for k in TRAIN_THROUGHPUT if _num(src.get(k)) is not None}
            )
    result.mask = result.mask or (s.get("mask") if isinstance(s.get("mask"), str) else None)
    # `probes` (every periodic probe, with its step) when present, else the final `probe`.
    for item in s.get("probes") or []:
        if isinstance(item, dict) and (p := _probe_from(item, result.mask, item.get("step"))):
            result.probes.append(p)
    if not result.probes:
        for key in ("probe", "leak_probe"):
            if isinstance(s.get(key), dict) and (
                p := _probe_from(s[key], result.mask, result.steps)
            ):
                result.probes.append(p)
                break
    from_events: list[LeakProbe] = []
    for ev in read_events(run_dir):
        if ev.kind == "train":
            loss = _first(ev.data, "loss", "train_loss")
            if loss is not None and ev.step is not None:
                result.train_curve.append((ev.step, loss))
        elif ev.kind == "eval":
            loss = _first(ev.data, "eval_loss", "loss")
            if loss is not None and ev.step is not None:
                result.eval_curve.append((ev.step, loss))
        elif ev.kind == "probe" and (p := _probe_from(ev.data, result.mask, ev.step)):
            from_events.append(p)
    if not result.probes:
        result.probes = from_events
    if result.eval_loss is None and result.eval_curve:
        result.eval_loss = result.eval_curve[-1][1]
    if result.train_loss is None and result.train_curve:
        result.train_loss = result.train_curve[-1][1]


def spec_revisions(args: dict[str, Any]) -> dict[str, str]:
    """The hub revisions a run read, from its spec.json args: the model's (`revision`; absent
    for a local checkpoint) and every hub data set's (`tasks`, `data`, `eval_data`)."""
    out: dict[str, str] = {}
    if isinstance(args.get("revision"), str):
        out["model"] = args["revision"]
    sources = [t for t in args.get("tasks") or [] if isinstance(t, dict)]
    sources += [args[k] for k in ("data", "eval_data") if isinstance(args.get(k), dict)]
    for src in sources:
        if str(src.get("source", "")).startswith("hf:"):
            name = str(src.get("name") or src["source"])
            out[name] = str(src.get("revision") or "default branch")
    return out


def read_stage(stage: str, run_dir: Path) -> StageResult:
    r = recipe(stage)
    spec = _read_json(run_dir / names.SPEC) or {}
    args = (spec.get("task") or {}).get("args") or {}
    result = StageResult(
        stage=stage,
        stage_dir=r.stage_dir,
        run_id=run_dir.name,
        run_dir=f"{names.RUNS_DIR}/{r.stage_dir}/{run_dir.name}",
        kind=r.kind,
        commit=spec.get("git_commit"),
        dirty=bool(spec.get("git_dirty")),
        profile=spec.get("profile"),
        target=spec.get("target"),
        model=(spec.get("inputs") or {}).get("model") or args.get("model"),
        mask=args.get("mask") if isinstance(args.get("mask"), str) else None,
        revisions=spec_revisions(args),
    )
    if result.profile in PROFILES:
        result.profile_chance = PROFILES[result.profile].chance
    if r.kind == "eval":
        read_eval(result, _read_json(run_dir / names.METRICS) or {})
    else:
        read_train(result, _read_json(run_dir / names.SUMMARY), run_dir)
    return result


def collect(runs_dir: Path, seed: Any = ANY_SEED) -> ReportData:
    """The latest succeeded pulled run of every stage (of one study seed, if given).
    StageError when there is none at all."""
    stages: dict[str, StageResult] = {}
    missing: list[str] = []
    for r in RECIPES:
        if r.name == REPORT_STAGE:
            continue
        run = latest_succeeded(runs_dir / r.stage_dir, seed)
        if run is not None:
            stages[r.name] = read_stage(r.name, run)
            stages[r.name].seed = run_seed(run)
        else:
            missing.append(r.name)
    if not stages:
        which = "" if seed is ANY_SEED else f" with seed {seed}"
        raise StageError(
            f"no pulled succeeded runs{which} under {runs_dir}",
            hint="run the study with `orch run-all`, or pull finished runs with `orch pull RUN`",
        )
    acc = {name: s.macro_acc for name, s in stages.items() if s.kind == "eval"}
    profiles = sorted({s.profile for s in stages.values() if s.profile})
    return ReportData(
        runs_dir=f"{runs_dir.name}/",  # shown relative: the document travels with the project
        stages=stages,
        math=study_math(acc),
        profiles=profiles,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seed=None if seed is ANY_SEED else seed,
        missing=missing,
    )


def _accuracies(d: ReportData) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for name, st in d.stages.items():
        if st.kind == "eval":
            out[name] = {"macro": st.macro_acc, **{t: sc.acc for t, sc in st.tasks.items()}}
    return out


def collect_study(runs_dir: Path, seeds: list[int] | None = None) -> StudyReport:
    """Every seed's study (`seeds`, else every seed found under `runs_dir`) and the spread.
    StageError naming the seeds that have no run at all."""
    wanted: list[int | None] = list(seeds) if seeds else seeds_in(runs_dir)
    if not wanted:
        collect(runs_dir)  # raises the "no pulled succeeded runs" error
    runs: dict[int | None, ReportData] = {}
    absent: list[str] = []
    for seed in wanted:
        try:
            runs[seed] = collect(runs_dir, seed)
        except StageError:
            absent.append(str(seed))
    if absent:
        raise StageError(
            f"no pulled succeeded runs with seed {', '.join(absent)} under {runs_dir}",
            hint="run them with `orch run-all --seeds ...`, or leave those seeds out",
        )
    return StudyReport(runs, across_seeds({k: _accuracies(v) for k, v in runs.items()}))


# --- writing -----------------------------------------------------------------------------
@dataclass
class ReportResult:
    path: Path
    plots: list[Path]
    data: ReportData
    plot_note: str = ""
    study: StudyReport | None = None
    #: files that existed before this report overwrote them
    replaced: list[Path] = field(default_factory=list)


def make_plots(
    data: ReportData, out_dir: Path, study: StudyReport | None = None
) -> tuple[list[Path], str]:
    """Draw the PNGs into `out_dir`; ([], reason) when matplotlib is not installed. With several
    seeds the bars are the means across seeds, with their sd as error bars."""
    if not plots.available():
        return [], "plots skipped: matplotlib is not installed (pip install 'orch[report]')"
    out_dir.mkdir(parents=True, exist_ok=True)
    order = ("stage1", "stage2", "stage4a", "stage4")
    multi = study is not None and len(study.runs) > 1
    errors: list[float | None] | None = None
    if multi and study is not None:
        sp = [study.spread.stages.get(s, {}).get("macro") for s in order]
        bars = [(LABELS[s], x.mean if x else None) for s, x in zip(order, sp, strict=True)]
        errors = [x.sd if x else None for x in sp]
        title = f"Macro accuracy by stage (mean ± sd over {len(study.runs)} seeds)"
    else:
        bars = [(LABELS[s], data.stages[s].macro_acc if s in data.stages else None) for s in order]
        title = "Macro accuracy by stage"
    chances = [data.stages[s].chance for s in ("stage1",) if s in data.stages]
    made = [
        plots.accuracy_by_stage(
            out_dir / plots.ACCURACY_PNG,
            bars,
            chance=chances[0] if chances else None,
            errors=errors,
            title=title,
        )
    ]
    series = {}
    for stage in ("stage3a", "stage3b"):
        if stage in data.stages:
            st = data.stages[stage]
            series[LABELS[stage]] = {"train": st.train_curve, "eval": st.eval_curve}
    loss_title = "Training and eval loss: 3A (causal) vs 3B (prefix)"
    if multi:
        loss_title += f", seed {data.seed}"
    made.append(plots.loss_curves(out_dir / plots.LOSS_PNG, series, title=loss_title))
    return made, ""


def write_report(
    runs_dir: Path, out: Path, *, with_plots: bool = True, seeds: list[int] | None = None
) -> ReportResult:
    """Collect (every seed found, or `seeds`), draw the plots beside `out`, render and write the
    markdown atomically. One seed gives the single-run report; several add the spread across
    seeds and the claims checked on each."""
    study = collect_study(runs_dir, seeds)
    data = study.first
    targets = [out] + (
        [out.parent / n for n in (plots.ACCURACY_PNG, plots.LOSS_PNG)] if with_plots else []
    )
    replaced = [p for p in targets if p.exists()]
    made, note = make_plots(data, out.parent, study) if with_plots else ([], "plots not requested")
    multi = study if len(study.runs) > 1 else None
    text = render_markdown(data, [p.name for p in made], note, study=multi)
    atomic_write_text(out, text)
    return ReportResult(
        path=out, plots=made, data=data, plot_note=note, study=study, replaced=replaced
    )
