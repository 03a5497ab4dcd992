"""GPU paths: bf16 training through the real worker entry point, and the mask forms of every
attention implementation (sdpa, eager, flex_attention) agreeing on CUDA. Skipped without a GPU;
run on a GPU box with `python -m pytest -m gpu tests/worker/test_gpu.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]


def test_bf16_prefix_training_on_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Stage-3B-style training on CUDA: bf16 autocast on, loss finite and going down, the
    leakage guard passes, and the final checkpoint is written."""
    args = {
        "model": "tiny://default",
        "device": "cuda",
        "dtype": "auto",
        "attn_implementation": "sdpa",
        "max_length": 128,
        "data": {"name": "recall_sft", "source": "tiny:recall", "format": "sft", "split": "train"},
        "mask": "prefix",
        "max_steps": 60,
        "batch_size": 16,
        "lr": 1e-3,
        "eval_every": 30,
        "save_every": 60,
        "probe_every": 30,
        "heartbeat_s": 1.0,
    }
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "train",
            "--run-dir",
            str(run_dir),
            "--args-json",
            json.dumps(args),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    assert summary["autocast_bf16"] is True
    assert summary["leak_flag"] is False
    losses = [
        json.loads(line)["data"]["loss"]
        for line in (run_dir / "events.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train" and "loss" in json.loads(line).get("data", {})
    ]
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (run_dir / "checkpoints" / "final" / "config.json").exists()
    assert (run_dir / ".run_complete").exists()


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_mask_forms_agree_on_cuda(tiny_model_dir: Path, mode: str) -> None:
    """The same mode gives the same logits through eager (float mask), sdpa (bool mask) and
    flex_attention (BlockMask) on CUDA, with right and left padding in the batch."""
    from state.worker_config import EvalArgs
    from worker import masks, modeling

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (3, 24), generator=g).cuda()
    am = torch.ones(3, 24, dtype=torch.long)
    am[1, 18:] = 0  # right padding
    am[2, :5] = 0  # left padding
    prompt_lens = torch.tensor([10, 8, 12])
    am = am.cuda()
    logits = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        loaded = modeling.load(
            EvalArgs(
                model=str(tiny_model_dir), attn_implementation=impl, device="cuda", dtype="float32"
            )
        )
        with torch.no_grad():
            logits[impl] = masks.forward(loaded.model, ids, am, prompt_lens, mode).float()
    valid = am.bool()
    for impl in ("sdpa", "flex_attention"):
        diff = (logits[impl] - logits["eager"]).abs()[valid].max().item()
        assert diff < 2e-3, f"{impl} vs eager differ by {diff} in {mode} mode"
