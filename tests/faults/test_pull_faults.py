"""Fault campaign: `orch pull` of a large artifact cut three times mid-transfer (the local rsync
killed, then the sshd child serving it, then rsync again), over a real sshd. Each cut is one
error line and leaves nothing under a final name that is not the box's file; the fourth pull
resumes from what the cut ones kept, verifies against the manifest and leaves no debris."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.pull import pull_run
from orchestrator.sshcmd import PARTIAL_DIR
from state import names
from state.models import Manifest, RunComplete, RunRecord
from state.phases import Phase
from state.protocol import atomic_write_json, build_manifest, sha256_file
from tests.faults.campaign import Scenario
from tests.integration.monitor_harness import orch_argv, wait_until
from tests.integration.test_launch import ssh_project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

RID = "20260102-000000"
RUN_DIR = f"runs/s1/{RID}"
BIG = 192 << 20


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _in_flight(local: Path) -> int:
    """Bytes of big.bin received so far (rsync's temp file, under any name but the final)."""
    best = 0
    for p in local.rglob("*big.bin*"):
        with contextlib.suppress(OSError):
            if p != local / "big.bin":
                best = max(best, p.stat().st_size)
    return best


def test_pull_cut_three_times(
    tmp_path: Path, fresh_sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sc = Scenario(
        name="a pull cut three times",
        injected=f"`orch pull` of a {BIG >> 20} MiB artifact cut at 1/4, 1/2, 3/4: kill -9 of "
        "the local rsync, of the sshd child serving it, of rsync again",
        report="each cut: `orch pull` exits 1 with one error line; the 4th pull resumes, "
        "verifies and records the pull",
        within_s=120,
        survives="the bytes already moved (the 4th pull sends only what is missing); runs/ "
        "holds no partial or corrupt file under a final name, and no debris",
    )
    root = ssh_project(tmp_path, fresh_sshd, monkeypatch)
    ctx = Context()
    try:
        rd = tmp_path / "remote" / RUN_DIR
        rd.mkdir(parents=True)
        with open(rd / "big.bin", "wb") as f:
            for _ in range(BIG >> 20):
                f.write(os.urandom(1 << 20))
        (rd / "metrics.json").write_text('{"acc": 0.5}')
        atomic_write_json(rd / names.MANIFEST, build_manifest(rd, RID))
        atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=RID))
        want = sha256_file(rd / "big.bin")
        now = datetime.now(timezone.utc)
        ctx.store.insert_run(
            RunRecord(
                run_id=RID, stage="stage1", stage_dir="s1", target="box", phase=Phase.SUCCEEDED,
                session="", run_dir=RUN_DIR, created_at=now, updated_at=now,
            )
        )  # fmt: skip
        local = ctx.runs_dir / "s1" / RID
        ours = set(fresh_sshd.connection_pids())
        sc.start()
        for cut in (1, 2, 3):
            proc = subprocess.Popen(
                orch_argv("pull", f"s1/{RID}"),
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_until(
                    lambda c=cut, p=proc: _in_flight(local) >= c * BIG // 4 or p.poll() is not None,
                    90,
                    every=0.01,
                    what=f"cut {cut}: the transfer reaching {cut}/4",
                )
                assert proc.poll() is None, f"cut {cut}: the pull ended first: {proc.stderr}"
                got = _in_flight(local)
                if cut == 2:  # the box side: the sshd child serving rsync's connection
                    victims = set(fresh_sshd.connection_pids()) - ours
                    assert victims
                    for pid in victims:
                        os.kill(pid, signal.SIGKILL)
                else:  # this side: rsync (its own process group: rsync, its ssh)
                    [rsync] = [p for p in _children(proc.pid)]
                    os.killpg(rsync, signal.SIGKILL)
                _, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            assert proc.returncode == 1, err
            assert len(err.strip().splitlines()) == 1 and "pull from target box" in err, err
            sc.note(f"cut {cut} at {got >> 20} MiB: {err.strip().split(': ', 1)[-1][:60]}")
            final = local / "big.bin"
            assert not final.exists() or sha256_file(final) == want, f"cut {cut}: corrupt"
            assert ctx.store.get_run("s1", RID).pulled_at is None  # type: ignore[union-attr]
        res = pull_run(ctx, ctx.store.get_run("s1", RID))  # type: ignore[arg-type]
        sc.detected()
        assert res.verified == 2  # big.bin, metrics.json (what the manifest lists)
        assert sha256_file(local / "big.bin") == want
        assert res.stats.literal_bytes < BIG // 2, res.stats  # resumed, not sent again
        assert ctx.store.get_run("s1", RID).pulled_at is not None  # type: ignore[union-attr]
        left = sorted(str(p.relative_to(local)) for p in local.rglob("*"))
        assert left == sorted(["big.bin", "metrics.json", names.MANIFEST, names.RUN_COMPLETE])
        assert not (local / PARTIAL_DIR).exists()
        sc.note(f"the 4th pull sent {res.stats.literal_bytes >> 20} MiB of file data")
        manifest = Manifest.model_validate_json((local / names.MANIFEST).read_text())
        assert {f.path for f in manifest.files} >= {"big.bin", "metrics.json"}
    finally:
        ctx.close()
    sc.record()
