"""Fault campaign: a box that writes hostile run files (a manifest pointing out of the run,
links to this machine's files, FIFOs, a 32 MiB status.json, garbage status with a frozen
worker), against `orch pull` / `orch status` over a real sshd + rsync. Nothing outside `runs/`
may be read or written, and every refusal is one line naming the file on the box."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.monitor.refresh import refresh_once
from state import names
from state.models import Manifest, ManifestEntry, RunComplete, RunRecord
from state.phases import Phase
from state.protocol import atomic_write_json, build_manifest, sha256_file
from tests.faults.campaign import Scenario
from tests.integration.test_launch import ssh_project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

RID = "20260101-000000"
RUN_DIR = f"runs/s1/{RID}"
SECRET = "root:$6$laptop-only\n"


def _entry(path: str, f: Path) -> ManifestEntry:
    return ManifestEntry(path=path, size=f.stat().st_size, sha256=sha256_file(f))


def _dotdot(rd: Path, outside: Path, local_depth: int) -> list[ManifestEntry]:
    return [_entry("../" * local_depth + str(outside).lstrip("/"), outside)]


def _absolute(rd: Path, outside: Path, local_depth: int) -> list[ManifestEntry]:
    return [_entry(str(outside), outside)]


def _file_link(rd: Path, outside: Path, local_depth: int) -> list[ManifestEntry]:
    os.symlink(outside, rd / "shadow_link")
    return [_entry("shadow_link", outside)]


def _dir_link(rd: Path, outside: Path, local_depth: int) -> list[ManifestEntry]:
    os.symlink(outside.parent, rd / "etc")
    return [_entry(f"etc/{outside.name}", outside)]


def _fifo(rd: Path, outside: Path, local_depth: int) -> list[ManifestEntry]:
    os.mkfifo(rd / "pipe")
    return [ManifestEntry(path="pipe", size=0, sha256="0" * 64)]


CASES: dict[str, Callable[[Path, Path, int], list[ManifestEntry]]] = {
    "manifest path ../../..": _dotdot,
    "manifest absolute path": _absolute,
    "symlink to a laptop file": _file_link,
    "symlinked dir": _dir_link,
    "FIFO in the run dir": _fifo,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_manifest_or_link_is_refused_by_orch_pull(
    case: str,
    tmp_path: Path,
    sshd_server: SshServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sc = Scenario(
        name=f"hostile run: {case}",
        injected=f"a succeeded run on the box whose manifest or files hold a {case}",
        report="`orch pull` exits 1 with one line naming the file on the box",
        within_s=60,
        survives="this machine's files (none read, stat'ed or written outside runs/); "
        "no symlink or FIFO under runs/",
    )
    ssh_project(tmp_path, sshd_server, monkeypatch)
    outside = tmp_path / "laptop" / "shadow"
    outside.parent.mkdir()
    outside.write_text(SECRET)
    before = outside.stat()
    ctx = Context()
    try:
        rd = tmp_path / "remote" / RUN_DIR
        rd.mkdir(parents=True)
        (rd / "metrics.json").write_text('{"acc": 0.5}')
        local = ctx.runs_dir / "s1" / RID
        depth = len(local.relative_to(local.anchor).parts)
        extra = CASES[case](rd, outside, depth)
        files = [*build_manifest(rd, RID).files, *extra]
        atomic_write_json(rd / names.MANIFEST, Manifest(run_id=RID, files=files))
        atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=RID))
        now = datetime.now(timezone.utc)
        ctx.store.insert_run(
            RunRecord(
                run_id=RID, stage="stage1", stage_dir="s1", target="box", phase=Phase.SUCCEEDED,
                session="", run_dir=RUN_DIR, created_at=now, updated_at=now,
            )
        )  # fmt: skip
        capsys.readouterr()
        sc.start()
        assert main(["pull", f"s1/{RID}"]) == 1
        sc.detected()
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{rd}/" in err, err  # names the file (or the manifest) on the box
        assert f"size {before.st_size}" not in err  # nothing outside was stat'ed
        assert SECRET.strip() not in err
        for p in ctx.runs_dir.rglob("*"):
            assert not p.is_symlink() and (p.is_file() or p.is_dir()), p
        assert ctx.store.get_run("s1", RID).pulled_at is None  # type: ignore[union-attr]
        assert outside.read_text() == SECRET and outside.stat().st_mtime == before.st_mtime
        sc.note("said: " + err.removeprefix("error: ").split(" (")[0].replace(str(tmp_path), "…"))
    finally:
        ctx.close()
    sc.record()


def _running(ctx: Context, **spec: object) -> Path:
    rd = Path(ctx.config.targets["box"].workdir or "") / RUN_DIR
    rd.mkdir(parents=True)
    (rd / names.PID).write_text(str(os.getpid()))  # "alive": this test process
    now = datetime.now(timezone.utc) - timedelta(seconds=5)
    ctx.store.insert_run(
        RunRecord(
            run_id=RID, stage="stage1", stage_dir="s1", target="box", phase=Phase.RUNNING,
            session="", run_dir=RUN_DIR, created_at=now, updated_at=now,
            spec_json=json.dumps(spec),
        )
    )  # fmt: skip
    return rd


def test_huge_status_file_is_refused_not_stored(
    tmp_path: Path, sshd_server: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = Scenario(
        name="hostile run: 32 MiB status.json",
        injected="a valid 32 MiB status.json on a running run",
        report="`progress unknown: status.json unreadable` on the next poll",
        within_s=60,
        survives="the store (no status stored; the database stays small), the agent",
    )
    ssh_project(tmp_path, sshd_server, monkeypatch)
    ctx = Context()
    try:
        rd = _running(ctx)
        with open(rd / names.STATUS, "w") as f:
            f.write('{"run_id": "' + RID + '", "stage": "stage1", "seq": 3, "message": "')
            f.write("x" * (32 << 20))
            f.write('"}')
        sc.start()
        [rec] = refresh_once(ctx)
        sc.detected()
        assert rec.reason == "progress unknown: status.json unreadable" and rec.status_json == ""
        db = ctx.store.path
        size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
        assert size < 4 << 20
        sc.note(f"database {size / 1e6:.1f} MB after the poll")
    finally:
        ctx.close()
    sc.record()


def test_garbage_status_with_a_frozen_worker_is_hung(
    tmp_path: Path, sshd_server: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = Scenario(
        name="hostile run: garbage status.json, worker frozen",
        injected="status.json replaced by garbage while the process stays alive (stale limit 2 s)",
        report="`hung` once the stale limit passes (the clock runs whatever the file holds)",
        within_s=60,
        survives="the run (hung, not crashed)",
    )
    ssh_project(tmp_path, sshd_server, monkeypatch)
    ctx = Context()
    try:
        rd = _running(ctx, stale_after_s=2.0)
        (rd / names.STATUS).write_bytes(b"\x00garbage{")
        sc.start()
        rec = None
        while rec is None or rec.phase is not Phase.HUNG:
            [rec] = refresh_once(ctx)
            assert rec.phase in (Phase.RUNNING, Phase.HUNG), rec
            assert time.monotonic() - sc._t0 < sc.within_s, rec
            time.sleep(0.3)
        sc.detected()
        assert "status.json unreadable" in rec.reason
        assert [a["kind"] for a in ctx.store.recent_alerts(5)] == ["hung"]
    finally:
        ctx.close()
    sc.record()
