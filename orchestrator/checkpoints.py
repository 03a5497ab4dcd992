"""A training run's step checkpoints, seen from the controller: on the box and pulled here.

The worker saves `checkpoints/step-N/` into a temp dir and renames it, writing `meta.json`
last, so a `step-N` dir with a readable `meta.json` is complete; anything else (`.step-N.tmp`,
a dir cut off mid-pull) is never resumed from.

    pull_checkpoints(ctx, rec)       mirror a live run's new checkpoints to runs/<dir>/<id>/
                                     (the watcher does it every `pull_checkpoints_every_s`)
    local_checkpoints(run_dir)       the complete ones pulled here
    remote_checkpoints(target, rd)   the complete ones on the box (one round trip)
    newest([...])                    which one a relaunch resumes from
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.pull import local_run_dir
from orchestrator.targets.factory import make_target
from state import names
from state.models import RunSpec

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.targets.base import Target
    from state.models import RunRecord

STEP_RE = re.compile(r"^step-(\d+)$")
#: Written last by the worker's checkpoint save: a step dir without it is incomplete.
CHECKPOINT_META = "meta.json"
#: Never mirrored: saves in progress (the worker's temp dirs) and the final export, which the
#: run's own pull brings back once it succeeds.
MIRROR_EXCLUDES = ["/.*.tmp/", "/final/"]

# Lists the complete step checkpoints under $1, one name per line. A fixed program; the path
# comes as an argument.
_LIST = 'for d in "$1"/step-*; do if [ -f "$d/meta.json" ]; then basename "$d"; fi; done'


@dataclass(frozen=True)
class Checkpoint:
    """A complete step checkpoint, on the box or pulled to this machine."""

    step: int
    name: str  # step-N
    where: str  # "box" or "laptop" (a pulled copy)
    path: str  # absolute path on the box, or on this machine

    def describe(self) -> str:
        source = "on the box's surviving disk" if self.where == "box" else "pulled to the laptop"
        return f"{self.name} ({source})"


def step_of(name: str) -> int | None:
    """The step of a `step-N` checkpoint dir name; None for anything else (final, temp dirs)."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def newest(candidates: list[Checkpoint]) -> Checkpoint | None:
    """Pure: the checkpoint to resume from: highest step; on a tie the box's (nothing to send)."""
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c.step, c.where == "box"))


def local_checkpoints(local_run_dir: Path) -> list[Checkpoint]:
    """Complete step checkpoints in a pulled copy of a run (meta.json present and readable)."""
    ckdir = local_run_dir / names.CHECKPOINTS
    out: list[Checkpoint] = []
    if not ckdir.is_dir():
        return out
    for p in ckdir.iterdir():
        step = step_of(p.name)
        if step is None or not p.is_dir():
            continue
        try:
            json.loads((p / CHECKPOINT_META).read_text())
        except (OSError, ValueError):
            continue  # cut off mid-pull or mid-save: not a checkpoint to trust
        out.append(Checkpoint(step, p.name, "laptop", str(p)))
    return out


def remote_checkpoints(target: Target, run_dir: str) -> list[Checkpoint]:
    """Complete step checkpoints of `run_dir` (relative to the workdir) on the target's disk."""
    ckdir = posixpath.join(target.workdir, run_dir, names.CHECKPOINTS)
    res = target.run(["sh", "-c", _LIST, "sh", ckdir], timeout=30)
    out: list[Checkpoint] = []
    for line in res.stdout.split():
        step = step_of(line)
        if step is not None:
            out.append(Checkpoint(step, line, "box", posixpath.join(ckdir, line)))
    return out


def prune_local(local_run_dir: Path, keep: int) -> list[str]:
    """Keep the `keep` newest complete step checkpoints pulled here; remove older ones and any
    incomplete step dir older than the newest complete one. Returns the names removed."""
    complete = sorted(local_checkpoints(local_run_dir), key=lambda c: c.step)
    if not complete:
        return []
    kept = {c.name for c in complete[-max(1, keep) :]}
    newest_step = complete[-1].step
    removed = []
    for p in (local_run_dir / names.CHECKPOINTS).iterdir():
        step = step_of(p.name)
        if step is None or p.name in kept or step > newest_step:
            continue  # not a step dir, kept, or a newer one still arriving
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return sorted(removed)


def spec_of(rec: RunRecord) -> RunSpec | None:
    """The run's recorded `spec.json`, or None if it has none or it does not parse."""
    if not rec.spec_json:
        return None
    try:
        return RunSpec.model_validate_json(rec.spec_json)
    except ValueError:
        return None


def is_training(rec: RunRecord) -> bool:
    """Does the run train (so it writes checkpoints)?"""
    spec = spec_of(rec)
    return spec is not None and spec.task.command == "train"


def keep_of(rec: RunRecord, default: int = 2) -> int:
    """The run's own `keep_checkpoints` (from its spec), so the copy here mirrors the box."""
    spec = spec_of(rec)
    if spec is None:
        return default
    try:
        return max(1, int(spec.task.args.get("keep_checkpoints", default)))
    except (TypeError, ValueError):
        return default


def pull_checkpoints(ctx: Context, rec: RunRecord, *, timeout: float | None = None) -> list[str]:
    """Mirror a (live) run's complete step checkpoints into its local run dir, then prune the
    local copy to the run's `keep_checkpoints`. Only new files move (rsync, partial-resume).
    Returns the complete checkpoints now held here, oldest first."""
    local = local_run_dir(ctx, rec)
    target = make_target(ctx, rec.target)
    try:
        if not remote_checkpoints(target, rec.run_dir):
            return [c.name for c in sorted(local_checkpoints(local), key=lambda c: c.step)]
        remote = posixpath.join(target.workdir, rec.run_dir, names.CHECKPOINTS)
        target.sync_down(
            remote, local / names.CHECKPOINTS, excludes=MIRROR_EXCLUDES, timeout=timeout
        )
    finally:
        with contextlib.suppress(Exception):
            target.close()
    prune_local(local, keep_of(rec))
    return [c.name for c in sorted(local_checkpoints(local), key=lambda c: c.step)]
