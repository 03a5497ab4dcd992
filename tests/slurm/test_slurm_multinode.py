"""Several torchrun agents through `srun` on the Slurm test cluster: the multi-node layout
(docs/slurm.md "Several nodes"), with two tasks on the one node standing in for two nodes.

`tasks_per_node=2` asks `--nodes=1 --ntasks-per-node=2`; the job script finds the rendezvous
in Slurm's environment and `srun` starts one `torchrun --nnodes=$SLURM_NTASKS` agent per task,
each with one rank: the two meet at a c10d store, train one model with DDP on gloo, and rank 0
alone writes the run dir. The result must be the one a single process with the same global
batch gets (DDP on gloo is deterministic up to the order of float sums).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.stages import get_stage
from orchestrator import launch as launch_mod
from orchestrator.monitor.refresh import wait_for_run
from orchestrator.slurm.jobscript import RDZV_PORT_BASE, RDZV_PORT_SPAN
from state import names
from state.phases import Phase
from tests.slurm.cluster import SlurmCluster
from tests.slurm.test_slurm_target import project

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

STEPS = 6
#: Per rank; the single-process reference trains on the same global batch, 2 x this.
BATCH = 4

# Measured (2026-12, torch 2.13 CPU, 6 steps, seeds 0, 1, 2, two ranks of 4 vs one of 8):
# |train_loss difference| 9.9e-8, 6.0e-8, 9.9e-8; the largest weight difference 2.2e-7,
# 9.8e-7, 3.5e-6 (float sums in another order, not another computation). The margins are
# 100x and about 30x those: a real difference (one rank's batch lost, the mean not taken, a
# rank training alone) moves the loss by 1e-2 or more.
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-4


def stage_overrides(small_model: str) -> dict[str, object]:
    return {
        "model": small_model,
        "max_steps": STEPS,
        "batch_size": BATCH,
        "warmup_steps": 2,
        "eval_every": 1000,
        "eval_batches": 1,
        "save_every": 1000,
        "log_every": 1,
        "probe_every": 1000,
        "probe_batch_size": 2,
        "timeout_s": 240,
        "tasks_per_node": 2,
    }


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((run_dir / names.CHECKPOINTS / "final").glob("*.safetensors"))
    assert files, f"no final weights in {run_dir}"
    out: dict = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def test_two_agents_meet_through_slurm_and_train_as_one_process(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch, small_model
):
    pytest.importorskip("torch")
    cache = os.environ.get("ORCH_CACHE_DIR") or str(tmp_path / "cache")
    env = {
        "ORCH_CACHE_DIR": cache,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    ctx = project(tmp_path, slurm_login, monkeypatch, partition="debug", env=env)
    stage = get_stage("stage3b", "tiny", stage_overrides(small_model))
    assert (stage.nodes, stage.tasks_per_node, stage.tasks) == (1, 2, 2)

    # The reference: one process, the same args but the global batch in one, trained here
    # while the cluster runs the job (2 cores: the job's two ranks and this one share them).
    ref_dir = tmp_path / "reference"
    ref_args = {**stage.task.args, "batch_size": 2 * BATCH}
    ref = subprocess.Popen(
        [sys.executable, "-m", "worker", "train", "--run-dir", str(ref_dir),
         "--args-json", json.dumps(ref_args)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    rec = None
    try:
        rec = launch_mod.launch_stage(ctx, stage)
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, poll_s=1.0, timeout_s=180)
        rd = tmp_path / "remote" / rec.run_dir
        log = (rd / names.STDOUT).read_text()
        assert final.phase == Phase.SUCCEEDED, (final, log[-4000:])

        # What was submitted: two tasks, and the rendezvous left to the compute node's shell.
        script = (rd / "job.sh").read_text()
        assert "--nodes=1 --ntasks-per-node=2" in script
        assert 'srun --kill-on-bad-exit=1 sh -c \'trap "" USR1; exec "$@"\' orch-agent' in script
        assert '"--rdzv_endpoint=$rdzv_head:$rdzv_port" "--rdzv_id=$SLURM_JOB_ID"' in script
        assert '"--nnodes=$SLURM_NTASKS"' in script

        # ... and what the job script found there: the first host of the job's node list, the
        # port from the job id.
        m = re.search(r"orch: rendezvous c10d at (\S+):(\d+) \(id (\d+)\): (\d+) torchrun", log)
        assert m, log[-4000:]
        head, port, rdzv_id, agents = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        assert head == slurm_cluster.node and rdzv_id == rec.job_id and agents == 2, m.group(0)
        assert port == RDZV_PORT_BASE + int(rec.job_id) % RDZV_PORT_SPAN

        # One run-dir protocol for the whole job: one pid (srun's), one exit code, rank 0's
        # status and summary; the world had two ranks.
        assert (rd / names.EXIT_CODE).read_text().strip() == "0"
        assert (rd / names.PID).read_text().strip().isdigit()
        summary = json.loads((rd / names.SUMMARY).read_text())
        assert summary["world_size"] == 2 and summary["config"]["world_size"] == 2, summary
        assert summary["steps"] == STEPS
        status = json.loads((rd / names.STATUS).read_text())
        assert status["step"] == STEPS, status

        out, _ = ref.communicate(timeout=120)
        assert ref.returncode == 0, out[-3000:]
        ref_summary = json.loads((ref_dir / names.SUMMARY).read_text())
        assert ref_summary["world_size"] == 1 and ref_summary["steps"] == STEPS
        assert abs(summary["train_loss"] - ref_summary["train_loss"]) <= LOSS_TOL, (
            summary["train_loss"],
            ref_summary["train_loss"],
        )
        mine, theirs = final_weights(rd), final_weights(ref_dir)
        assert mine.keys() == theirs.keys()
        worst = max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in mine)
        assert worst <= WEIGHT_TOL, worst
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
        if rec is not None and rec.job_id:
            slurm_cluster.client(["scancel", rec.job_id])
        ctx.close()


@pytest.mark.slow
def test_usr1_through_srun_checkpoints_and_the_agents_train_on(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch, small_model
):
    """The job script's USR1 goes to srun (the pid file), which signals every process of its
    step: the torchrun agents, which ignore it (else torchrun would stop the ranks and exit
    non-zero), and the ranks, which save a step checkpoint and train on to the end."""
    pytest.importorskip("torch")
    cache = os.environ.get("ORCH_CACHE_DIR") or str(tmp_path / "cache")
    env = {"ORCH_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ctx = project(tmp_path, slurm_login, monkeypatch, partition="debug", env=env)
    steps = 60  # at about 6 steps/s on two busy cores, seconds to signal it mid-training
    stage = get_stage("stage3b", "tiny", {**stage_overrides(small_model), "max_steps": steps})
    rec = None
    try:
        rec = launch_mod.launch_stage(ctx, stage)
        rd = tmp_path / "remote" / rec.run_dir
        deadline = time.monotonic() + 120
        step = 0
        while time.monotonic() < deadline:
            try:
                step = json.loads((rd / names.STATUS).read_text()).get("step") or 0
            except (OSError, ValueError):
                step = 0
            if step >= 2:
                break
            time.sleep(0.2)
        assert 2 <= step < steps, (step, (rd / names.STDOUT).read_text()[-3000:])
        res = slurm_cluster.client(["scancel", "--batch", "--signal=USR1", rec.job_id])
        assert res.returncode == 0, res.stderr
        final = wait_for_run(ctx, rec.stage_dir, rec.run_id, poll_s=1.0, timeout_s=180)
        log = (rd / names.STDOUT).read_text()
        assert final.phase == Phase.SUCCEEDED, (final, log[-4000:])
        assert "asking the worker for a checkpoint" in log, log[-3000:]
        evs = [json.loads(line) for line in (rd / names.EVENTS).read_text().splitlines()]
        asked = [e for e in evs if "time limit near (USR1)" in e.get("message", "")]
        assert len(asked) == 1, evs[-10:]
        at = asked[0]["step"]
        saved = [e for e in evs if e["kind"] == "checkpoint" and e.get("step") == at]
        assert step <= at < steps and saved, asked + saved  # (pruned once the final one is)
        summary = json.loads((rd / names.SUMMARY).read_text())
        assert summary["world_size"] == 2 and summary["steps"] == steps, summary
        assert (rd / names.EXIT_CODE).read_text().strip() == "0"
    finally:
        if rec is not None and rec.job_id:
            slurm_cluster.client(["scancel", rec.job_id])
        ctx.close()
