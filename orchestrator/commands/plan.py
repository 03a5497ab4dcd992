"""`orch plan STAGE|all [--target T] [--profile P] [--set K=V] [--offline] [--json]`: before
renting or launching, what each stage needs and what it will cost, and whether the target fits.

Per stage: parameters; peak memory (weights, gradients, AdamW state, activations at the stage's
batch size and `max_length`; `jobs.plan`, `state.footprint`); disk at its peak (checkpoints,
outputs, HF cache, venv, and what earlier stages left); the expected time from a recorded
throughput (an earlier run's own, else the profile's table) and its dollars at the target's
$/h. Then row by row whether the target fits, and on an ssh or vast box the runtime contract of
its env (one round trip); on a slurm target its partition's limits against each stage's job
(GPUs a node, --time against MaxTime, memory, CPUs) and the login node's env; and the hub
checks of the pinned model and data sets with `HF_TOKEN`.
Exit 0 when everything known fits, 1 when anything does not. Nothing is rented or started.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rich.markup import escape
from rich.table import Table

from jobs import overrides as ov
from jobs.plan import (
    Capacity,
    Check,
    StagePlan,
    dollars,
    fit_checks,
    gb,
    hours,
    plan_stages,
    verdict,
)
from jobs.profiles import get_profile
from jobs.stages import STUDY_STAGES, check_shared, get_stage
from orchestrator.context import Context
from state import names
from state.errors import OrchError, StageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="before renting: each stage's GPU memory, disk, time and $, and whether the target fits",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("stage", metavar="STAGE", help="a stage name (see `orch stages`), or `all`")
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
        help="override a stage setting (repeatable), as `orch launch --set`",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="estimate only: no box probe, no offer search, no hub check",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=handle)


# ---- pure formatting ---------------------------------------------------------------------------


def mark(ok: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[bold red]NO[/]", None: "[yellow]?[/]"}[ok]


def stages_table(plans: list[StagePlan], cap: Capacity, profile: str) -> Table:
    """One row per stage: parameters, peak memory, disk, time, dollars (pure). The parts of the
    peak memory are `memory_lines`: a column of them does not fit 80 columns."""
    t = Table(title=f"plan: profile {profile} on {cap.target} ({escape(cap.where or cap.kind)})")
    t.add_column("stage", no_wrap=True)
    t.add_column("params", justify="right", no_wrap=True)
    t.add_column("peak mem", justify="right", no_wrap=True)
    t.add_column("on", no_wrap=True)
    t.add_column("disk peak", justify="right", no_wrap=True)
    t.add_column("ckpt", justify="right", no_wrap=True)
    t.add_column("time", justify="right", no_wrap=True)
    t.add_column("$", justify="right", no_wrap=True)
    for p in plans:
        t.add_row(
            p.stage,
            f"{p.params / 1e9:.2f}B" if p.params >= 1e8 else f"{p.params / 1e6:.2f}M",
            gb(p.memory.total),
            p.device,
            gb(p.disk.peak),
            gb(p.disk.checkpoint) if p.disk.checkpoint else "-",
            hours(p.seconds),
            dollars(p.dollars),
        )
    return t


def memory_lines(plans: list[StagePlan]) -> list[str]:
    """The parts of the peak memory, one line per distinct breakdown (the eval stages usually
    share one, the train stages another): `stage1, stage2: weights 6.9 GB + ...` (pure)."""
    groups: dict[str, list[str]] = {}
    for p in plans:
        m = p.memory
        parts = [f"weights {gb(m.weights)}"]
        if m.gradients:
            parts.append(f"grads {gb(m.gradients)}")
        if m.optimizer:
            parts.append(f"AdamW {gb(m.optimizer)}")
        parts.append(f"activations {gb(m.activations + m.autocast_copies)}")
        line = " + ".join(parts) + f" (peak at the {m.phase})"
        groups.setdefault(line, []).append(p.stage)
    return [f"  {', '.join(stages)}: {line}" for line, stages in groups.items()]


def group_checks(rows: list[Check], stages: list[str] | None = None) -> list[Check]:
    """Rows that say the same thing (check, has, fits, fix) for several stages, as one row
    naming them (`all stages` when they are all of `stages`) (pure): seven stages with
    "no GPU" read as one problem, not seven."""
    groups: dict[tuple[str, str, bool | None, str], list[Check]] = {}
    for r in rows:
        groups.setdefault((r.what, r.have, r.ok, r.fix), []).append(r)
    out = []
    for (what, have, ok, fix), rs in groups.items():
        needs = list(dict.fromkeys(r.need for r in rs))
        need = needs[0] if len(needs) == 1 else f"{needs[0]} .. {needs[-1]}"
        names_ = [r.stage for r in rs]
        label = (
            "all stages" if stages and len(stages) > 1 and names_ == stages else " ".join(names_)
        )
        out.append(Check(label, what, need, have, ok, fix))
    return out


def checks_table(rows: list[Check], stages: list[str] | None = None) -> Table:
    t = Table(title="does it fit")
    for col in ("stage", "check", "needs", "has", "fits"):
        t.add_column(col, no_wrap=col == "fits")
    t.add_column("fix")
    for r in group_checks(rows, stages):
        t.add_row(r.stage, r.what, escape(r.need), escape(r.have), mark(r.ok), escape(r.fix))
    return t


def plan_json(
    plans: list[StagePlan], rows: list[Check], cap: Capacity, fits: bool, line: str
) -> dict[str, Any]:
    return {
        "target": cap.target,
        "capacity": cap.__dict__,
        "stages": [
            {
                "stage": p.stage,
                "kind": p.kind,
                "device": p.device,
                "params": p.params,
                "memory": {**p.memory.parts(), "peak": p.memory.total, "phase": p.memory.phase},
                "disk": {**p.disk.__dict__, "peak": p.disk.peak},
                "tokens": p.tokens,
                "seconds": p.seconds,
                "tokens_per_s": p.rate,
                "rate_source": p.rate_source,
                "dollars": p.dollars,
            }
            for p in plans
        ],
        "checks": [r.__dict__ for r in rows],
        "fits": fits,
        "verdict": line,
    }


# ---- the command ---------------------------------------------------------------------------------


def _specs(args: argparse.Namespace, ctx: Context, profile: Any) -> list[Any]:
    overrides = ov.parse_assignments(args.overrides)
    shared = ctx.config.experiment.overrides
    if args.stage == "all":
        merged = {**ov.normalize(shared), **ov.normalize(overrides)}
        check_shared(merged, STUDY_STAGES)
        return [get_stage(n, profile, shared=merged) for n in STUDY_STAGES]
    spec = get_stage(args.stage, profile, overrides, shared=shared)
    if spec.local_only:
        raise StageError(
            f"stage {spec.name} runs on this machine and needs no target",
            hint="plan a worker stage, or `all`",
        )
    return [spec]


def _hub_rows(specs: list[Any], profile: Any, offline: bool) -> list[Check]:
    # lazy, for start-up time: pulls in httpx
    from orchestrator.hub import check_inputs
    from orchestrator.planning import hub_repos

    repos = hub_repos(specs)
    token = os.environ.get("HF_TOKEN") or None
    rows: list[Check] = []
    if not repos:
        return rows
    if offline:
        if profile.hub_gated and not token:
            rows.append(
                Check("hub", "HF_TOKEN", "a read token", "not set", False,
                      "the model is gated: export HF_TOKEN (huggingface.co/settings/tokens)")
            )  # fmt: skip
        return rows
    for a in check_inputs(repos, token=token):
        rev = a.repo.revision[:12] if a.repo.revision else "default branch"
        rows.append(
            Check("hub", f"{a.repo.kind} {a.repo.repo_id}", f"revision {rev}",
                  "readable" if a.ok else "refused", a.ok, "" if a.ok else a.line)
        )  # fmt: skip
    return rows


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: pulls in httpx
    from orchestrator.planning import capacity, plan_error_row, recorded_rates

    profile = get_profile(args.profile or ctx.config.experiment.profile)
    specs = _specs(args, ctx, profile)
    tname, tcfg = ctx.config.target(args.target)
    # first pass on an unknown GPU: what to look for in the offers
    pre = plan_stages(specs, profile, Capacity(tname, tcfg.kind, device="cuda"))
    need_gpu = max((p.memory.total for p in pre if p.device == "cuda"), default=0)
    need_disk = max((p.disk.peak for p in pre), default=0)
    needs_cuda = any(str(s.task.args.get("device", "auto")) == "cuda" for s in specs)
    try:
        cap, rows = capacity(
            ctx, tname, needs_cuda=needs_cuda, need_gpu=need_gpu, need_disk=need_disk,
            remote=not args.offline, stages=specs,
        )  # fmt: skip
    except OrchError as exc:
        cap = Capacity(tname, tcfg.kind, where=f"unknown: {exc.message}")
        rows = [plan_error_row(exc, "target")]
    recorded = recorded_rates(ctx.project_root / names.RUNS_DIR, profile, specs)
    plans = plan_stages(specs, profile, cap, recorded)
    rows = rows + fit_checks(plans, cap) + _hub_rows(specs, profile, args.offline)
    fits, line = verdict(rows, plans, cap)
    if args.json:
        print(json.dumps(plan_json(plans, rows, cap, fits, line), indent=2, default=str))
        return 0 if fits else 1
    ctx.console.print(stages_table(plans, cap, profile.name))
    for ln in memory_lines(plans):
        ctx.console.print(escape(ln), soft_wrap=True, highlight=False)
    ctx.console.print(checks_table(rows, [p.stage for p in plans]))
    sources = list(dict.fromkeys(p.rate_source for p in plans if p.seconds is not None))
    for p in plans:
        if p.seconds is not None:
            ctx.console.print(
                f"  {p.stage}: {p.tokens:,} tokens at {p.rate:,.0f} tok/s "
                f"[{sources.index(p.rate_source) + 1}]",
                soft_wrap=True, highlight=False,
            )  # fmt: skip
    for i, src in enumerate(sources, 1):
        ctx.console.print(f"  [{i}] {escape(src)}", soft_wrap=True, highlight=False)
    color = "green" if fits else "bold red"
    ctx.console.print(f"[{color}]{escape(line)}[/]", soft_wrap=True)
    return 0 if fits else 1
