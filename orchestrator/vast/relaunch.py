"""Auto-relaunch of a lost training run on a vast target, resuming from its newest checkpoint.

Off by default; `[targets.X] auto_relaunch = true` (and `max_relaunches`, default 2) turns it on.
When the monitor marks a training run `lost` (Vast says the instance was outbid, stopped, or is
gone), its completion actions call `relaunch_lost(ctx, rec)`, which:

1. gets a box the way `orch up` does: the recorded instance is started again when it was
   stopped on request (its disk, and the run's checkpoints, survive); an outbid one is kept by
   raising its bid within `max_bid_dph` (same disk) when that is enough, else it is destroyed
   and the best matching offer is rented, prepared and bootstrapped. The alert says which;
2. picks the newest *complete* checkpoint (a `checkpoints/step-N` dir holding `meta.json`, which
   the worker writes last) from two places: the lost run's dir on the box, if its disk survived,
   and the copy pulled to this laptop (`orch pull RUN --checkpoints`, or the watcher's
   `pull_checkpoints_every_s`). The higher step wins; a tie goes to the box (no upload);
3. launches the same stage with the lost run's exact worker task (same args, so the worker's
   config-hash check accepts the checkpoint) into a new run dir seeded with that checkpoint; the
   worker resumes from it exactly (weights, optimizer, scheduler, RNG, data position). With no
   checkpoint anywhere the run starts from step 0, and the alert says so.

The new run's `spec.json` names the run it replaces (`relaunch_of`), how many relaunches the
chain has had (`relaunch_count`) and where it resumed from (`resumed_from`). A chain stops after
`max_relaunches`; the action is recorded in the store, so a restarted watcher never relaunches
the same lost run twice.

`orch launch STAGE --resume RUN` (`resume_run`) is the same path by hand, on any target: the run
(crashed, failed, lost ...) is relaunched with its recorded task from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.spec import StageSpec
from orchestrator.checkpoints import (
    Checkpoint,
    local_checkpoints,
    newest,
    remote_checkpoints,
    spec_of,
)
from orchestrator.config import VastTarget as VastConfig
from orchestrator.launch import launch_stage
from orchestrator.pull import local_run_dir
from orchestrator.targets.factory import make_target
from orchestrator.vast.records import info_of
from state import names
from state.errors import LaunchError, StageError
from state.models import RunRecord, RunSpec
from state.phases import Phase

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.progress import Steps
    from orchestrator.targets.base import Target

SEED_TIMEOUT_S = 600.0

# Hard-links a checkpoint into the new run dir (checkpoints are write-once: the worker saves to
# a temp dir and renames, and pruning removes whole dirs), falling back to a copy.
_LINK = 'mkdir -p -- "$2" && { cp -al -- "$1" "$2"/ 2>/dev/null || cp -a -- "$1" "$2"/; }'


def seed_checkpoint(target: Target, ckpt: Checkpoint, new_run_dir: str) -> None:
    """Put `ckpt` at `<new_run_dir>/checkpoints/<name>` on the target."""
    dest = posixpath.join(target.workdir, new_run_dir, names.CHECKPOINTS)
    if ckpt.where == "box":
        res = target.run(["sh", "-c", _LINK, "sh", ckpt.path, dest], timeout=SEED_TIMEOUT_S)
        if res.returncode != 0:
            why = " ".join(res.stderr.split()) or f"exit {res.returncode}"
            raise LaunchError(f"cannot copy {ckpt.name} into {new_run_dir} on the box: {why}")
        return
    target.sync_up(Path(ckpt.path), posixpath.join(dest, ckpt.name), excludes=[], delete=False)


def lineage(rec: RunRecord) -> RunSpec:
    """The lost run's spec (its exact task, and how many relaunches its chain has had)."""
    spec = spec_of(rec)
    if spec is None:
        raise LaunchError(f"run {rec.key} has no readable recorded spec; cannot relaunch it")
    return spec


def is_relaunchable(ctx: Context, rec: RunRecord) -> bool:
    """Pure apart from config: a lost training run on a vast target with auto_relaunch on,
    whose chain has relaunches left."""
    cfg = ctx.config.targets.get(rec.target)
    if rec.phase is not Phase.LOST or not isinstance(cfg, VastConfig) or not cfg.auto_relaunch:
        return False
    spec = spec_of(rec)
    return (
        spec is not None
        and spec.task.command == "train"
        and spec.relaunch_count < cfg.max_relaunches
    )


@dataclass
class RelaunchResult:
    new: RunRecord
    instance_id: int
    resumed_from: Checkpoint | None


def relaunch_lost(ctx: Context, rec: RunRecord) -> RelaunchResult:
    """Rent a box for the lost run's target and relaunch the run there, resuming from the
    newest checkpoint (see the module docstring). Raises ProviderError/LaunchError."""
    # lazy, for start-up time: pulls in httpx
    from orchestrator.vast.provision import up

    name, cfg = ctx.config.target(rec.target)
    if not isinstance(cfg, VastConfig):
        raise LaunchError(f"run {rec.key}: target {name} is not a vast target")
    old = lineage(rec)
    if old.relaunch_count >= cfg.max_relaunches:
        raise LaunchError(
            f"run {rec.key} was already relaunched {old.relaunch_count} time(s) "
            f"(max_relaunches = {cfg.max_relaunches})",
            hint=f"relaunch it by hand: orch launch {rec.stage}",
        )
    row = ctx.store.live_instance_for(name)
    info = info_of(row)
    if info.get("stop_kind") == "user" and not info.get("stopped_idle_at"):
        # Someone asked for the stop (intended_status stopped): starting the box again would
        # spend money against that wish. orch's own idle stop never has active runs to lose.
        raise LaunchError(
            f"the instance of {name} was stopped on request (intended_status stopped), so "
            f"{rec.key} is not relaunched",
            hint=f"start it again with `orch up {name}`, then `orch launch {rec.stage} --target {name}`",
        )
    busy = [
        r
        for r in ctx.store.list_runs(active_only=True, target=name)
        if r.stage == rec.stage and r.key != rec.key
    ]
    if busy:
        raise LaunchError(f"{rec.stage} is already running on {name} as {busy[0].key}")

    box = up(ctx, name)
    new, ckpt = _relaunch_from_checkpoint(ctx, rec, old, name)
    iid = box.instance_id
    start = ckpt.describe() if ckpt else "step 0: no checkpoint on the box or on this laptop"
    where = {
        "rented": "a newly rented box (the old one could not be kept)",
        "reused": "the same instance",
    }.get(box.how, box.detail or box.how)
    record_alert(
        ctx,
        rec,
        "relaunched",
        f"orch: {rec.stage} relaunched on {name}",
        f"relaunched as {new.key} on Vast instance {iid}: {where}; resuming from {start}.\n"
        f"logs: orch logs {new.key}",
    )
    return RelaunchResult(new=new, instance_id=iid, resumed_from=ckpt)


def resume_run(
    ctx: Context,
    ref: str,
    stage_name: str | None = None,
    *,
    sync: bool = True,
    report: Steps | None = None,
) -> RunRecord:
    """`orch launch STAGE --resume RUN`: relaunch a training run that ended unfinished (crashed,
    failed, lost, ...) on its own target with its exact recorded task, resuming from its newest
    complete checkpoint. The auto-relaunch's path (`relaunch_lost` above): the checkpoint
    is hard-linked from the old run dir on the box (or sent from a pulled copy) into the new run
    dir, where the worker resumes from it exactly; the new spec names the old run
    (`relaunch_of`) and the checkpoint (`resumed_from`). With no checkpoint it starts at step 0."""

    rec = ctx.store.resolve_run(ref)
    if stage_name is not None and stage_name != rec.stage:
        raise StageError(
            f"run {rec.key} is a run of {rec.stage}, not {stage_name}",
            hint=f"orch launch {rec.stage} --resume {rec.key}",
        )
    if not rec.phase.is_terminal or rec.phase is Phase.SUCCEEDED:
        raise StageError(
            f"run {rec.key} is {rec.phase.value}: only a run that ended unfinished is resumed",
            hint=f"stop it first (orch stop {rec.key})" if not rec.phase.is_terminal else "",
        )
    old = lineage(rec)
    if old.task.command != "train":
        raise StageError(
            f"run {rec.key} is a {old.task.command} run: only training resumes from a checkpoint",
            hint=f"orch launch {rec.stage}",
        )
    new, _ = _relaunch_from_checkpoint(ctx, rec, old, rec.target, sync=sync, report=report)
    return new


def _relaunch_from_checkpoint(
    ctx: Context, rec: RunRecord, old: RunSpec, target_name: str, **launch_kw: Any
) -> tuple[RunRecord, Checkpoint | None]:
    """Launch `old`'s exact task again on `target_name`, seeded with the newest complete
    checkpoint of `rec` (on the box, or a pulled copy here); the new spec names the old run
    (`relaunch_of`) and the checkpoint (`resumed_from`). Shared by the auto-relaunch and
    `orch launch --resume`."""
    found = local_checkpoints(local_run_dir(ctx, rec))
    target = make_target(ctx, target_name)
    try:
        with contextlib.suppress(Exception):  # a new box (or a lost run dir): the pulled copy
            found += remote_checkpoints(target, rec.run_dir)
    finally:
        with contextlib.suppress(Exception):
            target.close()
    ckpt = newest(found)
    stage = StageSpec(
        name=old.stage,
        stage_dir=old.stage_dir,
        task=old.task,
        timeout_s=old.timeout_s,
        stale_after_s=old.stale_after_s,
        poll_interval_s=old.poll_interval_s,
        resources=old.resources,
        nproc_per_node=old.nproc_per_node,
    )
    extra = {
        "relaunch_of": rec.key,
        "relaunch_count": old.relaunch_count + 1,
        "resumed_from": ckpt.describe() if ckpt else None,
        "inputs": old.inputs,
    }

    def seed(t: Target, new: RunRecord) -> None:
        if ckpt is not None:
            seed_checkpoint(t, ckpt, new.run_dir)

    new = launch_stage(
        ctx, stage, target_name, profile=old.profile, seed=seed, spec_extra=extra, **launch_kw
    )
    return new, ckpt


def relaunch_failed(ctx: Context, rec: RunRecord, exc: BaseException, attempts: int) -> None:
    """Say once that a relaunch failed (the retries stay in the log): the researcher takes over."""
    record_alert(
        ctx,
        rec,
        "relaunch_failed",
        f"orch: relaunch of {rec.stage} on {rec.target} failed",
        f"relaunching it failed: {exc}\norch retries {attempts} times; or by hand: "
        f"orch up {rec.target} && orch launch {rec.stage} --target {rec.target}",
    )


def record_alert(ctx: Context, rec: RunRecord, kind: str, title: str, detail: str) -> None:
    """One alert about a lost run's relaunch (kept once per run and kind; sent by the watcher)."""
    ctx.store.add_alert(
        f"{kind}:{rec.key}",
        kind=kind,
        target=rec.target,
        stage_dir=rec.stage_dir,
        run_id=rec.run_id,
        title=title,
        body=f"{rec.key} was lost ({rec.reason}).\n{detail}",
    )
