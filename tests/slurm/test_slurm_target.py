"""A `slurm` target end to end on a real single-node Slurm cluster (tests/slurm/cluster.py),
reached through a real sshd as its login node: sbatch, the wrapper in the batch job, the poll
agent asking squeue in the same round trip, the state machine, pull, stop (scancel), logs.

Each scenario uses `exec` stages (a short Python command), so no model is needed; the slow ones
(a time limit is whole minutes, a node failure needs SlurmdTimeout) are marked `slow`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from orchestrator import launch as launch_mod
from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.monitor.refresh import refresh_once, wait_for_run
from state import names
from state.models import RunRecord
from state.phases import Phase
from tests.integration.test_launch import WRITE_ARTIFACT, exec_stage, make_project
from tests.slurm.cluster import SlurmCluster
from tests.slurm.conftest import slurm_toml
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


def project(tmp_path: Path, server: SshServer, monkeypatch: pytest.MonkeyPatch, **extra: object):
    root = make_project(tmp_path / "proj", slurm_toml(server, tmp_path / "remote", **extra))
    monkeypatch.chdir(root)
    return Context()


def py(code: str, name: str, **update: object):
    stage = exec_stage(name, sys.executable, "-c", code)
    return stage.model_copy(update=update) if update else stage


def wait_phase(ctx: Context, rec: RunRecord, phases: set[Phase], timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        refresh_once(ctx, [rec.target])
        got = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert got is not None
        if got.phase in phases or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def kill_leftover(remote: Path, rec: RunRecord) -> None:
    """Job processes outlive a killed slurmd: end the run's own process group (the wrapper, the
    worker and its exec child), found by the run's pid file, never by name."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((remote / rec.run_dir / names.PID).read_text())
        pgid = os.getpgid(pid)
        if pgid != os.getpgid(0):
            os.killpg(pgid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def test_stage_succeeds_is_pulled_and_logged(
    slurm_login, slurm_cluster, tmp_path, monkeypatch, capsys
):
    ctx = project(
        tmp_path, slurm_login, monkeypatch, partition="debug", cpus_per_task=1, mem="200M"
    )
    try:
        stage = py(WRITE_ARTIFACT + ";print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'))", "s-ok")
        stage = stage.model_copy(update={"resources": {"gpus": 1}})
        rec = launch_mod.launch_stage(ctx, stage)
        assert rec.phase == Phase.QUEUED and rec.job_id.isdigit(), rec
        history = [p for p, _, _ in ctx.store.phase_history(rec.stage_dir, rec.run_id)]
        assert history == ["pending", "syncing", "launching", "queued"]
        job = slurm_cluster.client(["scontrol", "-o", "show", "job", rec.job_id]).stdout
        assert "Partition=debug" in job and "TresPerNode=gres:gpu:1" in job, job
        assert "TimeLimit=00:06:00" in job and "Requeue=0" in job, job

        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, poll_s=0.5, timeout_s=60)
        assert final.phase == Phase.SUCCEEDED, final
        remote = tmp_path / "remote" / rec.run_dir
        assert (remote / names.EXIT_CODE).read_text().strip() == "0"
        assert (remote / "job.sh").is_file()
        assert json.loads((remote / names.SPEC).read_text())["target"] == "cluster"

        capsys.readouterr()
        assert main(["logs", rec.run_id]) == 0
        out = capsys.readouterr().out
        assert "hello from the run" in out and "gpu 0" in out  # a fake GPU, gres on /dev/null
        assert f"orch: Slurm job {rec.job_id}" in out  # the job's own output, same file

        assert main(["pull", rec.run_id]) == 0
        local = ctx.runs_dir / rec.stage_dir / rec.run_id
        assert (local / "result.txt").read_text() == "answer=42\n"
        assert ctx.store.get_run(rec.stage_dir, rec.run_id).pulled_at is not None
    finally:
        ctx.close()


def test_target_env_reaches_the_login_node_commands(
    fresh_sshd, slurm_cluster, tmp_path, monkeypatch
):
    """A login node whose sessions do not know the cluster: `env = { SLURM_CONF = ... }` in
    orch.toml reaches sbatch, squeue, scancel and the poll agent."""
    ctx = project(tmp_path, fresh_sshd, monkeypatch, env=slurm_cluster.env)
    try:
        rec = launch_mod.launch_stage(ctx, py("print('fine')", "s-env"))
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, poll_s=0.5, timeout_s=60)
        assert final.phase == Phase.SUCCEEDED, final
    finally:
        ctx.close()


def test_exit_3_is_failed_with_the_reason(slurm_login, slurm_cluster, tmp_path, monkeypatch):
    ctx = project(tmp_path, slurm_login, monkeypatch)
    try:
        rec = launch_mod.launch_stage(ctx, py("import sys; print('bad'); sys.exit(3)", "s-bad"))
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, poll_s=0.5, timeout_s=60)
        # The worker's exec task writes .run_failed naming the command's code and exits 1.
        assert final.phase == Phase.FAILED and final.exit_code == 1, final
        assert "exited with code 3" in final.reason, final.reason
        job = slurm_cluster.client(["scontrol", "-o", "show", "job", rec.job_id]).stdout
        assert "JobState=FAILED" in job and "ExitCode=1:0" in job, job
        kinds = [r["kind"] for r in ctx.store.query("SELECT kind FROM alerts")]
        assert kinds == ["failed"], kinds
    finally:
        ctx.close()


def test_pending_on_resources_shows_reason_and_stop_cancels(
    slurm_login, slurm_cluster, tmp_path, monkeypatch, capsys
):
    ctx = project(tmp_path, slurm_login, monkeypatch)
    try:
        sleep = "import time; print('up', flush=True); time.sleep(300)"
        big = launch_mod.launch_stage(ctx, py(sleep, "s-big", resources={"gpus": 2}))
        running = wait_phase(ctx, big, {Phase.RUNNING})
        assert running.phase == Phase.RUNNING, running
        small = launch_mod.launch_stage(ctx, py(sleep, "s-small", resources={"gpus": 1}))
        deadline = time.monotonic() + 20  # the scheduler's next pass sets the reason
        while True:
            queued = wait_phase(ctx, small, {Phase.QUEUED}, timeout=10)
            if "Resources" in queued.reason or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert queued.phase == Phase.QUEUED and "Resources" in queued.reason, queued

        capsys.readouterr()
        assert main(["status", "--json"]) == 0
        assert '"queued"' in capsys.readouterr().out

        # orch stop = scancel: a queued job leaves the queue, a running one gets SIGTERM and
        # the wrapper records 128+15.
        assert main(["stop", small.run_id]) == 0
        gone = ctx.store.get_run(small.stage_dir, small.run_id)
        assert gone.phase == Phase.CANCELLED and gone.exit_code is None, gone
        assert main(["stop", big.run_id]) == 0
        stopped = ctx.store.get_run(big.stage_dir, big.run_id)
        assert stopped.phase == Phase.CANCELLED and stopped.exit_code == 143, stopped
        for r in (big, small):
            job = slurm_cluster.client(["scontrol", "-o", "show", "job", r.job_id]).stdout
            assert "JobState=CANCELLED" in job, job
        # no alert for a stop the user asked for
        assert not [a for a in ctx.store.query("SELECT kind FROM alerts")]
    finally:
        ctx.close()


@pytest.mark.slow
def test_past_its_time_limit_is_timed_out(slurm_login, slurm_cluster, tmp_path, monkeypatch):
    ctx = project(tmp_path, slurm_login, monkeypatch, time_margin_s=0, signal_before_s=50)
    try:
        stage = py("import time; print('up', flush=True); time.sleep(600)", "s-slow", timeout_s=30)
        rec = launch_mod.launch_stage(ctx, stage)
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, poll_s=1.0, timeout_s=150)
        assert final.phase == Phase.TIMED_OUT, final
        assert "time limit" in final.reason
        log = (tmp_path / "remote" / rec.run_dir / names.STDOUT).read_text()
        assert "DUE TO TIME LIMIT" in log, log
        assert "time limit is near (USR1)" in log, log  # --signal=B:USR1@50 reached the job
        assert (tmp_path / "remote" / rec.run_dir / names.EXIT_CODE).read_text().strip() == "143"
    finally:
        ctx.close()


@pytest.mark.slow
def test_slurmd_killed_mid_run_is_lost_not_crashed(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch
):
    ctx = project(tmp_path, slurm_login, monkeypatch)
    rec = None
    try:
        stage = py("import time; print('up', flush=True); time.sleep(300)", "s-node")
        rec = launch_mod.launch_stage(ctx, stage)
        assert wait_phase(ctx, rec, {Phase.RUNNING}).phase == Phase.RUNNING
        slurm_cluster.kill_slurmd()
        final = wait_phase(ctx, rec, {p for p in Phase if p.is_terminal}, timeout=120)
        assert final.phase == Phase.LOST, final
        assert "NODE_FAIL" in final.reason, final.reason
        kinds = [r["kind"] for r in ctx.store.query("SELECT kind FROM alerts")]
        assert kinds == ["lost"], kinds
    finally:
        if rec is not None:
            kill_leftover(tmp_path / "remote", rec)
        ctx.close()


@pytest.mark.slow
def test_slurmd_killed_on_a_requeue_target_is_requeued_not_crashed(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch
):
    ctx = project(tmp_path, slurm_login, monkeypatch, requeue=True)
    rec = None
    try:
        stage = py("import time; print('up', flush=True); time.sleep(300)", "s-requeue")
        rec = launch_mod.launch_stage(ctx, stage)
        assert wait_phase(ctx, rec, {Phase.RUNNING}).phase == Phase.RUNNING
        slurm_cluster.kill_slurmd()
        deadline = time.monotonic() + 120
        got = rec
        while time.monotonic() < deadline:
            got = wait_phase(ctx, rec, {Phase.QUEUED, *(p for p in Phase if p.is_terminal)}, 5)
            if got.phase != Phase.RUNNING:
                break
        assert got.phase == Phase.QUEUED and "requeued 1 time" in got.reason, got
        assert not list(ctx.store.query("SELECT kind FROM alerts"))
    finally:
        if rec is not None:
            kill_leftover(tmp_path / "remote", rec)
        ctx.close()
