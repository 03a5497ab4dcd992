"""Pull a run's directory from its target into the local `runs/`, then verify it.

    result = pull_run(ctx, rec)                    # runs/<stage_dir>/<run_id>/, checkpoints left
    result = pull_run(ctx, rec, checkpoints=True)  # everything
    run_location(ctx, rec)                         # where the run dir really is (no connection)

rsync with `--partial-dir` (an interrupted pull resumes where it stopped, never leaving a half
file under a final name), then every file listed in `manifest.json` is checked (size + sha256)
with `state.protocol.verify_manifest`: a mismatch is a VerifyError naming the file (on the box
and here), never accepted silently. The box is not trusted: symlinks and special files there are
not copied, manifest paths must stay inside the run dir, and no link is followed when checking. `pulled_at` is recorded only after a successful verification. A run without
a manifest (still running, failed) is copied but reported as unverified; a run that the store
says succeeded must have one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.config import LocalTarget as LocalConfig
from orchestrator.config import SshTarget as SshConfig
from orchestrator.context import Context
from orchestrator.progress import QUIET, Steps, fmt_size
from orchestrator.targets.base import SyncStats, Target
from orchestrator.targets.factory import make_target, resolve_ssh
from orchestrator.wrapper import SECRETS_FILE
from state import names
from state.errors import OrchError, VerifyError
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


def verify_local(
    local_dir: Path,
    *,
    checkpoints: bool,
    must: bool,
    source: str | None = None,
    not_copied: Collection[str] = (),
) -> int | None:
    """Verify a pulled run dir against its manifest; None when there is none and `must` is off.
    `source` (where the run dir is on the box) is what the errors name; `not_copied` are the
    symlinks and special files the pull skipped there (an entry naming one is refused as such)."""
    if (local_dir / names.MANIFEST).is_symlink():
        raise VerifyError(
            f"{local_dir / names.MANIFEST}: a symlink, not the run's manifest",
            hint="delete it and pull again; orch never follows links in a run",
        )
    manifest = read_model(local_dir / names.MANIFEST, Manifest)
    if not manifest.ok or manifest.value is None:
        if must or manifest.state != "missing":
            raise VerifyError(
                f"{local_dir / names.MANIFEST}: {manifest.state}"
                + (f" ({manifest.detail})" if manifest.detail else ""),
                hint="the run did not finish cleanly; pull again, or check `orch logs`",
            )
        return None
    return verify_manifest(
        local_dir,
        manifest.value,
        include_checkpoints=checkpoints,
        source=source,
        not_copied=not_copied,
    )


#: rsync writes each file as `.<name>.XXXXXX` beside its final name and renames it once complete;
#: an rsync killed outright (SIGKILL: `kill -9` of orch, the OOM killer) leaves that temp file.
_RSYNC_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9]{6}$")


def drop_rsync_debris(local_dir: Path) -> list[str]:
    """Remove what killed pulls left under a run dir: rsync temp files `.<name>.XXXXXX` whose
    `<name>` has arrived complete since (call after a successful sync) and that the manifest
    does not list. Returns their paths relative to the run dir."""
    manifest = read_model(local_dir / names.MANIFEST, Manifest).value
    listed = {f.path for f in manifest.files} if manifest is not None else set()
    gone: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(local_dir, followlinks=False):
        for name in filenames:
            m = _RSYNC_TEMP.match(name)
            p = Path(dirpath) / name
            rel = p.relative_to(local_dir).as_posix()
            if m and rel not in listed and (Path(dirpath) / m["name"]).is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    gone.append(rel)
    return sorted(gone)


def drop_symlinks(local_dir: Path) -> list[str]:
    """Remove every symlink under a pulled run dir (left by an older orch: pulls copy none),
    never following one; returns their paths relative to the run dir."""
    gone: list[str] = []
    for dirpath, dirnames, filenames in os.walk(local_dir, followlinks=False):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink():
                p.unlink()
                gone.append(p.relative_to(local_dir).as_posix())
    return sorted(gone)


def remote_manifest(target: Target, remote_dir: str) -> Manifest | None:
    """The run's `manifest.json` on the target (one small read), or None if it has none yet."""
    res = target.run(["cat", "--", f"{remote_dir}/{names.MANIFEST}"], timeout=30.0)
    if res.returncode != 0 or not res.stdout.strip():
        return None
    try:
        return Manifest.model_validate_json(res.stdout)
    except ValueError:
        return None


def pull_plan(manifest: Manifest | None, *, checkpoints: bool) -> str:
    """`pulling 12 files, 3.4 MB`: what the manifest says this pull brings (pure)."""
    if manifest is None:
        return "pulling the run dir (no manifest yet)"
    skip = f"{names.CHECKPOINTS}/"
    files = [f for f in manifest.files if checkpoints or not f.path.startswith(skip)]
    return f"pulling {len(files)} files, {fmt_size(sum(f.size for f in files))}"


def run_location(ctx: Context, rec: RunRecord) -> str:
    """Where the run's directory really is: a path on this machine for a local target,
    `user@host:path` (with the port when not 22) for an ssh or vast box. Connects nowhere."""
    name, cfg = ctx.config.target(rec.target)
    if isinstance(cfg, LocalConfig):
        target = make_target(ctx, name)
        return f"{target.workdir.rstrip('/')}/{rec.run_dir}"
    from orchestrator.targets.ssh import DEFAULT_WORKDIR  # here: the ssh module loads paramiko

    workdir = (cfg.workdir or DEFAULT_WORKDIR).rstrip("/")  # relative: to the login's home
    if isinstance(cfg, SshConfig):
        hop = resolve_ssh(cfg)
        host, port, user = hop.host, hop.port, hop.user
    else:
        row = ctx.store.live_instance_for(name) or {}
        host, port = str(row.get("ssh_host") or "?"), int(row.get("ssh_port") or 22)
        user = cfg.user
    where = f"{user}@{host}:{workdir}/{rec.run_dir}"
    return where + (f" (ssh port {port})" if port != 22 else "")


def pull_run(
    ctx: Context,
    rec: RunRecord,
    *,
    checkpoints: bool = False,
    timeout: float | None = None,
    report: Steps | None = None,
) -> PullResult:
    """Copy the run down (resuming a cut-off pull) and verify it; record `pulled_at`.
    `report` says `pulling N files, X MB` and then how many were verified."""
    local_dir = local_run_dir(ctx, rec)
    local_dir.mkdir(parents=True, exist_ok=True)
    # One pull of a run at a time (the watcher's auto-pull and `orch pull`, or several of
    # them): two rsyncs into one dir race, and debris is only cleared with nobody copying.
    with open(local_dir.parent / f".{rec.run_id}.pull-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _pull_locked(ctx, rec, local_dir, checkpoints, timeout, report)


def _pull_locked(
    ctx: Context,
    rec: RunRecord,
    local_dir: Path,
    checkpoints: bool,
    timeout: float | None,
    report: Steps | None,
) -> PullResult:
    target = make_target(ctx, rec.target)
    t0 = time.monotonic()
    try:
        remote = f"{target.workdir.rstrip('/')}/{rec.run_dir}"
        plan = "pulling"
        if report is not None and report.console is not None:
            with contextlib.suppress(OrchError):  # only a label: the pull itself decides
                plan = pull_plan(remote_manifest(target, remote), checkpoints=checkpoints)
        with (report or QUIET).step(f"{plan} from {rec.target}"):
            stats = target.sync_down(
                remote, local_dir, excludes=excludes_for(checkpoints), timeout=timeout
            )
    finally:
        with contextlib.suppress(Exception):
            target.close()
    not_copied = list(stats.extra.get("skipped", []))  # symlinks and special files on the box
    skipped = [*not_copied, *drop_symlinks(local_dir)]
    drop_rsync_debris(local_dir)
    if skipped and report is not None:
        report.note(f"not copied (symlinks or special files): {', '.join(skipped[:10])}")
    source = None
    with contextlib.suppress(OrchError):  # `user@host:dir` the errors name (no port note)
        source = run_location(ctx, rec).split(" (ssh port ", 1)[0]
    verified = verify_local(
        local_dir,
        checkpoints=checkpoints,
        must=rec.phase == Phase.SUCCEEDED,
        source=source,
        not_copied=not_copied,
    )
    if report is not None:
        report.note(
            f"verified {verified} files against the manifest"
            if verified is not None
            else "not verified: the run has no manifest (yet)"
        )
    if verified is not None:
        ctx.store.update_run(rec.stage_dir, rec.run_id, pulled_at=datetime.now(timezone.utc))
        fresh = ctx.store.get_run(rec.stage_dir, rec.run_id)
        rec = fresh or rec
    return PullResult(
        rec=rec, local_dir=local_dir, stats=stats, verified=verified, seconds=time.monotonic() - t0
    )
