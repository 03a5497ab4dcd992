"""SFT training on a tiny model (CPU, real transformers): loss goes down, kill + resume is exact,
a checkpoint from another config is refused, bad input is one clear `.run_failed`."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from state import names
from state.models import Manifest, RunFailed, RunStatus
from state.phases import WorkerExit
from state.protocol import read_events, read_model, verify_manifest
from worker import lifecycle, tiny

REPO = Path(__file__).resolve().parents[2]


def random_sft(
    path: Path, n: int, seed: int, resp_words: int = 4, prompt_words: int = 1
) -> dict[str, Any]:
    """Prompt/response rows whose responses are random words: unpredictable causally, trivial
    to read off for a mask that shows them (the leak's signature). Returns the TaskSource."""
    rng = random.Random(seed)
    words = tiny.task_words()
    with path.open("w") as f:
        for _ in range(n):
            prompt = "count : " + " ".join(rng.choice(words) for _ in range(prompt_words))
            response = " " + " ".join(rng.choice(words) for _ in range(resp_words))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return {"name": path.stem, "source": str(path), "format": "sft"}


def train_args(model: str, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": model,
        "data": {
            "name": "recall",
            "source": "tiny:recall",
            "format": "sft",
            "split": "train",
            "limit": 160,
        },
        "eval_data": {
            "name": "recall-val",
            "source": "tiny:recall",
            "format": "sft",
            "split": "validation",
            "limit": 16,
        },
        "mask": "prefix",
        "max_steps": 30,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 10,
        "eval_batches": 2,
        "probe_every": 10,
        "probe_batch_size": 8,
        "save_every": 1000,
        "heartbeat_s": 0.5,
    }
    args.update(over)
    return args


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from events.jsonl (the last value wins for a replayed step)."""
    return {
        e.step: e.data["loss"]
        for e in read_events(run_dir)
        if e.kind == "train" and e.step is not None
    }


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / names.SUMMARY).read_text())


def test_loss_goes_down_and_run_is_complete(tmp_path: Path, small_model: str) -> None:
    rd = tmp_path / "stage3b" / "r1"
    assert lifecycle.execute(rd, "train", train_args(small_model)) == 0
    s = summary_of(rd)
    losses = step_losses(rd)
    assert sorted(losses) == list(range(1, 31))
    first = sum(losses[i] for i in range(1, 6)) / 5
    last = sum(losses[i] for i in range(26, 31)) / 5
    # measured: last/first 0.500 (3.41 -> 1.70) under ATEN_CPU_CAPABILITY native (AVX-512),
    # avx2 and default, 1 and 2 threads; 0.8 leaves a wide margin
    assert last < 0.8 * first, (first, last)
    for key in (
        "train_loss",
        "eval_loss",
        "train_steps_per_second",
        "train_runtime",
        "train_tokens_per_second",
    ):
        assert isinstance(s[key], float) and math.isfinite(s[key]) and s[key] > 0, key
    assert s["mask"] == "prefix" and s["steps"] == 30 and s["structural_check"] == "passed"
    assert s["leak_flag"] is False and [p["step"] for p in s["probes"]] == [0, 10, 20, 30]
    # the counterfactual leakage probe: a prefix mask's predictions never see later tokens
    assert all(p["max_logit_diff"] == 0.0 and not p["leak"] for p in s["probes"])
    # The final model is a plain save_pretrained dir that stage 4 loads with the run's loader.
    final = rd / "checkpoints" / "final"
    from state.worker_config import EvalArgs
    from worker import modeling

    loaded = modeling.load(EvalArgs(model=str(final)))
    assert loaded.tokenizer.pad_token_id is not None
    assert not list((rd / "checkpoints").glob("step-*")), "step checkpoints kept after success"
    # TensorBoard event files, listed in the manifest; the marker last.
    assert list((rd / names.TENSORBOARD).glob("events.out.tfevents.*"))
    manifest = read_model(rd / names.MANIFEST, Manifest).value
    paths = {f.path for f in manifest.files}
    assert names.SUMMARY in paths and "checkpoints/final/config.json" in paths
    assert any(p.startswith("tb/") for p in paths)
    assert verify_manifest(rd, manifest) == len(manifest.files)
    st = read_model(rd / names.STATUS, RunStatus).value
    assert st.step == 30 and st.total_steps == 30 and st.eval_loss is not None and st.losses


def _spawn_train(rd: Path, args: dict[str, Any]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "train",
            "--run-dir",
            str(rd),
            "--args-json",
            json.dumps(args),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses(
    tmp_path: Path, small_model: str
) -> None:
    args = train_args(
        small_model, max_steps=16, save_every=4, keep_checkpoints=2, eval_every=8, probe_every=8
    )
    ref = tmp_path / "ref"
    assert lifecycle.execute(ref, "train", args) == 0
    expected = step_losses(ref)

    rd = tmp_path / "killed"
    proc = _spawn_train(rd, args)
    try:
        deadline = time.monotonic() + 300
        while not (rd / "checkpoints" / "step-4" / "meta.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)  # no handler, no marker: a real crash
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (rd / names.RUN_COMPLETE).exists(), "the run finished before the kill"
    killed_at = max(step_losses(rd))
    assert killed_at < 16

    # A relaunch with a different config must refuse the checkpoint, not silently mix runs.
    code = lifecycle.execute(rd, "train", {**args, "lr": 1e-3})
    assert code == WorkerExit.BAD_INPUT
    reason = read_model(rd / names.RUN_FAILED, RunFailed).value.reason
    assert "different config" in reason and "lr" in reason

    assert lifecycle.execute(rd, "train", args) == 0
    s = summary_of(rd)
    resumed_step = int(s["resumed_from"].split("-")[1])
    assert resumed_step >= 4 and s["steps"] == 16
    got = step_losses(rd)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):  # replayed steps and post-resume steps alike
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    assert s["eval_loss"] == pytest.approx(summary_of(ref)["eval_loss"], rel=1e-6)
    assert s["train_loss"] == pytest.approx(summary_of(ref)["train_loss"], rel=1e-6)


def test_checkpoints_keep_last_k_with_meta(tmp_path: Path, small_model: str) -> None:
    from worker import checkpoints

    rd = tmp_path / "r"
    args = train_args(
        small_model, max_steps=9, save_every=2, keep_checkpoints=2, eval_every=100, probe_every=100
    )
    assert lifecycle.execute(rd, "train", args) == 0
    events = [e for e in read_events(rd) if e.kind == "checkpoint"]
    saved = [e.data["path"] for e in events if e.message.startswith("saved step")]
    assert saved == [f"checkpoints/step-{i}" for i in (2, 4, 6, 8)]
    pruned = [p for e in events for p in e.data.get("pruned", [])]
    assert pruned == ["step-2", "step-4"]  # only the last 2 were kept while running
    meta = json.loads((rd / "checkpoints" / "final" / "meta.json").read_text())
    assert meta["step"] == 9 and meta["config_hash"] == checkpoints.config_hash(meta["config"])


def test_lr_schedule_shapes() -> None:
    from worker.optimizer import lr_factor

    assert [lr_factor(s, warmup=4, total=10, kind="constant") for s in range(6)] == [
        0.25,
        0.5,
        0.75,
        1,
        1,
        1,
    ]
    assert lr_factor(4, warmup=4, total=10, kind="cosine") == pytest.approx(1.0)
    assert lr_factor(7, warmup=4, total=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(10, warmup=4, total=10, kind="cosine") == pytest.approx(0.0)
    assert lr_factor(7, warmup=4, total=10, kind="linear") == pytest.approx(0.5)


def test_batch_order_is_a_pure_function_and_shards_ranks() -> None:
    from worker.train import BatchOrder

    a, b = BatchOrder(20, 3, 2, seed=7), BatchOrder(20, 3, 2, seed=7)
    assert a.per_epoch == 3
    seq = [(a.indices(p, 0), a.indices(p, 1)) for p in range(6)]
    assert seq == [(b.indices(p, 0), b.indices(p, 1)) for p in range(6)]
    epoch0 = [i for p in range(3) for r in (0, 1) for i in a.indices(p, r)]
    assert len(set(epoch0)) == 18  # no example twice within an epoch, ranks disjoint
    assert seq[3] != seq[0]  # a new permutation each epoch


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("unloadable model", "cannot load model"),
        ("schema mismatch", "response"),
        ("empty data", "no rows"),
        ("prompt too long", "longer than max_length"),
        ("too few examples", "fewer than one global batch"),
        ("flash attention", "attn_implementation"),
    ],
)
def test_bad_input_fails_with_reason(
    tmp_path: Path, small_model: str, case: str, needle: str
) -> None:
    data = tmp_path / "d.jsonl"
    over: dict[str, Any] = {}
    if case == "unloadable model":
        bad = tmp_path / "not-a-model"
        bad.mkdir()
        (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
        over["model"] = str(bad)
    elif case == "schema mismatch":
        data.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
        over["data"] = {"name": "d", "source": str(data), "format": "sft"}
    elif case == "empty data":
        data.write_text("")
        over["data"] = {"name": "d", "source": str(data), "format": "sft"}
    elif case == "prompt too long":
        over["max_length"] = 8
    elif case == "too few examples":
        over["data"] = {**train_args(small_model)["data"], "limit": 3}
    elif case == "flash attention":
        over["attn_implementation"] = "flash_attention_2"
    rd = tmp_path / "r"
    code = lifecycle.execute(rd, "train", train_args(over.pop("model", small_model), **over))
    failed = read_model(rd / names.RUN_FAILED, RunFailed).value
    assert code == WorkerExit.BAD_INPUT, failed
    assert needle in failed.reason and failed.exit_code == WorkerExit.BAD_INPUT
    assert not (rd / names.RUN_COMPLETE).exists()
