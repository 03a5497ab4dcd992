"""A real tiny training run on the Slurm test cluster: the time-limit warning becomes a step
checkpoint, the time limit a `timed_out` run, and a requeue of the job resumes from that
checkpoint.

`--time=1` (a stage timeout of 30 s, no margin) and `signal_before_s=45`: Slurm sends USR1 to
the job script about 15 s into the job (up to ~60 s earlier still, so possibly before the worker
is up: then the `.checkpoint_request` file tells it at start); the job script forwards it to the
worker, whose trainer saves `checkpoints/step-N` at its next step boundary and trains on, until
Slurm's TERM at the limit.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from jobs.stages import get_stage
from orchestrator import launch as launch_mod
from orchestrator.monitor.refresh import wait_for_run
from state import names
from state.phases import Phase
from tests.slurm.cluster import SlurmCluster
from tests.slurm.test_slurm_target import project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Far more steps than a minute allows (the tiny model trains at tens of steps/s on a CPU core).
STEPS = 1_000_000


def events(run_dir: Path) -> list[dict]:
    path = run_dir / names.EVENTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_stage(small_model: str):
    return get_stage(
        "stage3b",
        "tiny",
        {
            "model": small_model,
            "max_steps": STEPS,
            "batch_size": 4,
            "warmup_steps": 0,
            "eval_every": STEPS,
            "eval_batches": 1,
            "save_every": STEPS,
            "log_every": 50,
            "probe_every": STEPS,
            "probe_batch_size": 2,
            "timeout_s": 30,
        },
    )


def test_time_limit_warning_checkpoints_and_a_requeue_resumes(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch, small_model
):
    pytest.importorskip("torch")
    cache = os.environ.get("ORCH_CACHE_DIR") or str(tmp_path / "cache")
    env = {"ORCH_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ctx = project(
        tmp_path,
        slurm_login,
        monkeypatch,
        time_margin_s=0,
        signal_before_s=45,
        requeue=True,
        env=env,
    )
    rec = None
    try:
        rec = launch_mod.launch_stage(ctx, train_stage(small_model))
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, poll_s=1.0, timeout_s=180)
        assert final.phase == Phase.TIMED_OUT, final
        rd = tmp_path / "remote" / rec.run_dir
        log = (rd / names.STDOUT).read_text()
        assert "asking the worker for a checkpoint" in log, log[-3000:]
        asked = [e for e in events(rd) if "time limit near (USR1)" in e.get("message", "")]
        assert len(asked) == 1, events(rd)[-10:]
        step = asked[0]["step"]
        saved = [e for e in events(rd) if e["kind"] == "checkpoint" and e.get("step") == step]
        assert saved and (rd / names.CHECKPOINTS / f"step-{step}").is_dir(), saved
        # it trained on after the checkpoint, until Slurm's TERM at the limit
        status = json.loads((rd / names.STATUS).read_text())
        assert status["step"] > step, status
        assert (rd / names.EXIT_CODE).read_text().strip() == "143"
        assert not (rd / names.CHECKPOINT_REQUEST).exists()

        # A requeue (what a preemption or node failure does on a requeue partition) reruns the
        # job script in the same run dir: the worker resumes from the USR1 checkpoint.
        res = slurm_cluster.client(["scontrol", "requeue", rec.job_id])
        assert res.returncode == 0, res.stderr
        slurm_cluster.client(["scontrol", "update", f"JobId={rec.job_id}", "StartTime=now"])
        deadline = time.monotonic() + 150
        resumed: list[dict] = []
        while time.monotonic() < deadline and not resumed:
            resumed = [e for e in events(rd) if e.get("message") == f"resumed from step-{step}"]
            time.sleep(1.0)
        assert resumed, (events(rd)[-10:], (rd / names.STDOUT).read_text()[-2000:])
        assert "restarted (restart 1)" in (rd / names.STDOUT).read_text()
    finally:
        if rec is not None and rec.job_id:
            slurm_cluster.client(["scancel", rec.job_id])
        ctx.close()
