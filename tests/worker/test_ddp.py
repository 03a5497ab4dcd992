"""`torchrun --nproc_per_node 2` on CPU (gloo): two ranks train one model, rank 0 reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from state import names
from state.models import RunStatus
from state.protocol import read_events, read_model
from tests.worker.test_train import train_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path: Path, small_model: str) -> None:
    rd = tmp_path / "ddp" / "r1"
    args = train_args(
        small_model, max_steps=6, batch_size=4, eval_every=3, probe_every=3, save_every=3
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "worker", "train", "--run-dir", str(rd), "--args-json", json.dumps(args),
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (rd / names.RUN_COMPLETE).exists() and not (rd / names.RUN_FAILED).exists()
    s = json.loads((rd / names.SUMMARY).read_text())
    assert s["world_size"] == 2 and s["steps"] == 6 and s["config"]["world_size"] == 2
    # Losses are averaged over both ranks and logged once (rank 0 alone writes the run dir).
    train_events = [e for e in read_events(rd) if e.kind == "train"]
    assert [e.step for e in train_events] == list(range(1, 7))
    st = read_model(rd / names.STATUS, RunStatus).value
    assert st.step == 6 and st.pid is not None
    # Two ranks see twice the tokens of one rank per step.
    assert s["train_tokens_per_second"] > 0
    assert (rd / "checkpoints" / "final" / "config.json").exists()
