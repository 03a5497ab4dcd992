"""`orch pull` for real: runs launched on the local target and over a real sshd, copied down with
rsync (partial-resume), verified against manifest.json; a corrupted artifact is refused by name."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from orchestrator import launch as launch_mod
from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.pull import pull_run
from orchestrator.sshcmd import PARTIAL_DIR
from orchestrator.targets.factory import make_target
from state import names
from state.errors import VerifyError
from state.phases import Phase
from tests.conftest import require_tools
from tests.integration.test_launch import exec_stage, make_project, settle, ssh_project, wait_exit

pytestmark = pytest.mark.integration


@pytest.fixture
def local_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    require_tools("tmux", "rsync")
    root = make_project(tmp_path / "proj", '[targets.local]\nkind = "local"\n')
    monkeypatch.chdir(root)
    return root


BIG = 4 * 1024 * 1024

# Test data: a run that writes a 4 MiB artifact (random, so rsync cannot compress it away).
WRITE_BIG = (
    "import os, pathlib;"
    "d = pathlib.Path(os.environ['ORCH_RUN_DIR']);"
    f"(d / 'big.bin').write_bytes(os.urandom({BIG}));"
    "(d / 'metrics.json').write_text('{\"acc\": 0.5}')"
)


def test_pull_resumes_a_cut_off_transfer_and_verifies(sshd_server, tmp_path, monkeypatch):
    ssh_project(tmp_path, sshd_server, monkeypatch)
    ctx = Context()
    try:
        rec = settle(
            ctx, launch_mod.launch_stage(ctx, exec_stage("t-big", sys.executable, "-c", WRITE_BIG))
        )
        assert rec.phase == Phase.SUCCEEDED
        remote_big = tmp_path / "remote" / rec.run_dir / "big.bin"
        # What a pull cut off half-way leaves: the first half in rsync's partial dir.
        local = ctx.runs_dir / rec.stage_dir / rec.run_id
        (local / PARTIAL_DIR).mkdir(parents=True)
        (local / PARTIAL_DIR / "big.bin").write_bytes(remote_big.read_bytes()[: BIG // 2])

        res = pull_run(ctx, rec)
        assert res.verified is not None and res.verified >= 3  # spec.json, big.bin, metrics.json
        assert (local / "big.bin").read_bytes() == remote_big.read_bytes()
        # Only about the missing half moved as file data: the partial file was the basis.
        assert res.stats.literal_bytes < BIG * 0.75, res.stats
        assert not (local / PARTIAL_DIR / "big.bin").exists()
        assert ctx.store.get_run(rec.stage_dir, rec.run_id).pulled_at is not None
    finally:
        ctx.close()


def test_corrupted_artifact_on_the_box_is_refused_by_name(local_project, capsys):
    ctx = Context()
    try:
        rec = settle(
            ctx, launch_mod.launch_stage(ctx, exec_stage("t-bad", sys.executable, "-c", WRITE_BIG))
        )
        assert rec.phase == Phase.SUCCEEDED
        target = make_target(ctx, "local")
        metrics = Path(target.workdir) / rec.run_dir / "metrics.json"
        metrics.write_text('{"acc": 0.9}')  # changed after the manifest was written
        with pytest.raises(VerifyError, match=r"metrics\.json: sha256 differs"):
            pull_run(ctx, rec)
        assert ctx.store.get_run(rec.stage_dir, rec.run_id).pulled_at is None

        capsys.readouterr()
        assert main(["pull", f"{rec.stage_dir}/{rec.run_id}"]) == 1
        err = capsys.readouterr().err.strip()
        assert "metrics.json" in err and len(err.splitlines()) == 1

        # A succeeded run without its manifest is refused too, never taken on trust.
        (Path(target.workdir) / rec.run_dir / names.MANIFEST).unlink()
        local = ctx.runs_dir / rec.stage_dir / rec.run_id
        (local / names.MANIFEST).unlink()
        with pytest.raises(VerifyError, match="manifest.json: missing"):
            pull_run(ctx, rec)
    finally:
        ctx.close()


def test_pull_all_latest_and_unfinished_runs(local_project, capsys):
    ctx = Context()
    try:
        ok1 = launch_mod.launch_stage(ctx, exec_stage("t-a", sys.executable, "-c", WRITE_BIG))
        bad = launch_mod.launch_stage(
            ctx, exec_stage("t-c", sys.executable, "-c", "raise SystemExit(5)")
        )
        for rec in (ok1, bad):
            wait_exit(ctx, rec)
        assert settle(ctx, bad).phase == Phase.FAILED
        capsys.readouterr()
        assert main(["pull", "--all"]) == 0
        out = capsys.readouterr().out
        assert ok1.run_dir.split("/", 1)[1] in out
        assert "t-c_dir" not in out  # --all takes succeeded runs only
        for rec in (ok1,):
            assert (ctx.runs_dir / rec.stage_dir / rec.run_id / "big.bin").stat().st_size == BIG
            assert ctx.store.get_run(rec.stage_dir, rec.run_id).pulled_at is not None
        assert main(["pull", "--all"]) == 0
        assert "nothing to pull" in capsys.readouterr().out

        # A run still going: copied, reported unverified, no pulled_at.
        live = launch_mod.launch_stage(
            ctx, exec_stage("t-live", sys.executable, "-c", "import time; time.sleep(60)")
        )
        pid = make_target(ctx, "local").path(f"{live.run_dir}/{names.PID}")
        for _ in range(300):  # the command is running once the wrapper wrote its pid
            if pid.exists():
                break
            time.sleep(0.1)
        try:
            assert main(["pull", "latest"]) == 0
            assert "not verified" in capsys.readouterr().out
            assert ctx.store.get_run(live.stage_dir, live.run_id).pulled_at is None
            assert (ctx.runs_dir / live.stage_dir / live.run_id / names.SPEC).is_file()
        finally:
            launch_mod.stop_run(ctx, ctx.store.get_run(live.stage_dir, live.run_id))
        assert not any(p.name == ".secrets.env" for p in ctx.runs_dir.rglob("*"))
        assert os.path.isdir(ctx.runs_dir)
    finally:
        ctx.close()
