"""Pull a run's directory from its target into the local `runs/`, then verify it.

    result = pull_run(ctx, rec)                    # runs/<stage_dir>/<run_id>/, checkpoints left
    result = pull_run(ctx, rec, checkpoints=True)  # everything

rsync with `--partial-dir` (an interrupted pull resumes where it stopped, never leaving a half
file under a final name), then every file listed in `manifest.json` is checked (size + sha256)
with `state.protocol.verify_manifest`: a mismatch is a VerifyError naming the file, never
accepted silently. `pulled_at` is recorded only after a successful verification. A run without
a manifest (still running, failed) is copied but reported as unverified; a run that the store
says succeeded must have one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.context import Context
from orchestrator.targets.base import SyncStats
from orchestrator.wrapper import SECRETS_FILE
from state import names
from state.errors import VerifyError
from state.models import Manifest, RunRecord
from state.phases import Phase
from state.protocol import read_model, verify_manifest

#: Never copied down: secrets (deleted by the wrapper anyway) and rsync's own partial dir.
ALWAYS_EXCLUDE = [f"/{SECRETS_FILE}"]


@dataclass
class PullResult:
    """What a pull moved and how many files it verified (None: no manifest to verify against)."""

    rec: RunRecord
    local_dir: Path
    stats: SyncStats
    verified: int | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.verified is not None


def local_run_dir(ctx: Context, rec: RunRecord) -> Path:
    """Where a run lands locally: `<project>/runs/<stage_dir>/<run_id>`."""
    names.check_name(rec.stage_dir, "stage dir")
    names.check_name(rec.run_id, "run id")
    return ctx.runs_dir / rec.stage_dir / rec.run_id


def excludes_for(checkpoints: bool) -> list[str]:
    return ALWAYS_EXCLUDE + ([] if checkpoints else [f"/{names.CHECKPOINTS}/"])


def verify_local(local_dir: Path, *, checkpoints: bool, must: bool) -> int | None:
    """Verify a pulled run dir against its manifest; None when there is none and `must` is off."""
    manifest = read_model(local_dir / names.MANIFEST, Manifest)
    if not manifest.ok or manifest.value is None:
        if must or manifest.state != "missing":
            raise VerifyError(
                f"{local_dir / names.MANIFEST}: {manifest.state}"
                + (f" ({manifest.detail})" if manifest.detail else ""),
                hint="the run did not finish cleanly; pull again, or check `orch logs`",
            )
        return None
    return verify_manifest(local_dir, manifest.value, include_checkpoints=checkpoints)


def pull_run(
    ctx: Context, rec: RunRecord, *, checkpoints: bool = False, timeout: float | None = None
) -> PullResult:
    """Copy the run down (resuming a cut-off pull) and verify it; record `pulled_at`."""
    from orchestrator.targets.factory import make_target

    local_dir = local_run_dir(ctx, rec)
    local_dir.mkdir(parents=True, exist_ok=True)
    target = make_target(ctx, rec.target)
    t0 = time.monotonic()
    try:
        remote = f"{target.workdir.rstrip('/')}/{rec.run_dir}"
        stats = target.sync_down(
            remote, local_dir, excludes=excludes_for(checkpoints), timeout=timeout
        )
    finally:
        with contextlib.suppress(Exception):
            target.close()
    verified = verify_local(local_dir, checkpoints=checkpoints, must=rec.phase == Phase.SUCCEEDED)
    if verified is not None:
        ctx.store.update_run(rec.stage_dir, rec.run_id, pulled_at=datetime.now(timezone.utc))
        fresh = ctx.store.get_run(rec.stage_dir, rec.run_id)
        rec = fresh or rec
    return PullResult(
        rec=rec, local_dir=local_dir, stats=stats, verified=verified, seconds=time.monotonic() - t0
    )
