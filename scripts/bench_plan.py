"""Benchmark of `orch plan`'s estimates: peak training memory and checkpoint bytes, estimated
(`jobs.plan`, `state.footprint`) against measured, on CPU.

    .venv/bin/python scripts/bench_plan.py [--json .bench/plan.json] [--device cpu|cuda]

For each model (the tiny profile's model, the Ministral 3 replica of the worker tests, and a
wide-vocabulary replica whose vocab/hidden ratio is the real model's) and each training setup
(gradient checkpointing off/on, causal and prefix masks):

- **memory**: two training steps exactly as `worker.train.Trainer.train_step` does them
  (`worker.masks.forward` with the dense 4D mask, `worker.probe.token_loss_sum`, backward,
  clipping, AdamW from `worker.optimizer`, `zero_grad(set_to_none=True)`), on a full batch of
  `batch_size` x `max_length` tokens. Measured: the peak of live tensor memory during the second
  step (the first has no optimizer state yet), by torch's `MemTracker`
  (`torch.distributed._tools.mem_tracker`), which counts every tensor storage the step allocates
  (parameters, gradients, optimizer state, activations, temporaries) as it is allocated and
  freed: on CPU this is what `torch.cuda.max_memory_allocated` is on a GPU (with `--device cuda`
  the script reads that too). Not measured: allocator caching and fragmentation, the CUDA
  context, RSS of the Python process.
- **disk**: `worker.checkpoints.save_checkpoint` writes a real step checkpoint (weights,
  optimizer, scheduler, RNG states, tokenizer, meta) and a `final/` one; measured: the bytes of
  every file in each dir.

The estimate is `jobs.plan.train_memory_for(...)` / `state.footprint.checkpoint_bytes(...)` with
the arguments `orch plan` passes for such a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from state import footprint  # noqa: E402
from state.phases import MaskMode  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str  # tiny | replica | replica-wide
    batch_size: int
    max_length: int
    mask: str
    gradient_checkpointing: bool
    #: bf16 autocast around the forward, fp32 weights: what the trainer does on CUDA, run
    #: here with CPU autocast as a stand-in for the GPU's dtype flow
    autocast: bool = False


def build(model: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer or None, config dict) for a case's model, in fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    if model == "tiny":
        from worker import tiny

        path = tiny.resolve("tiny://default")
        from transformers import AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        return (
            m,
            AutoTokenizer.from_pretrained(path),
            json.loads((path / "config.json").read_text()),
        )
    from transformers import Ministral3Config, Ministral3ForCausalLM

    # tests/worker/test_ministral_loading.py's replica text config (the real one's keys and rope
    # block, sizes shrunk); `replica-wide` keeps the real vocab/hidden ratio (131072/3072)
    sizes = dict(vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    if model == "replica-wide":
        sizes = dict(vocab_size=32768, hidden_size=768, intermediate_size=2304,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=96)  # fmt: skip
    rope = {"type": "yarn", "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
            "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}  # fmt: skip
    cfg = Ministral3Config(
        **sizes, max_position_embeddings=262144, rope_parameters=rope, tie_word_embeddings=True,
        sliding_window=None, pad_token_id=11, bos_token_id=1, eos_token_id=2,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return Ministral3ForCausalLM(cfg), None, cfg.to_dict()


def _batch(vocab: int, b: int, t: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    plens = torch.full((b,), t // 2, dtype=torch.long)
    labels = ids.clone()
    labels[:, : t // 2] = -100
    am = torch.ones(b, t, dtype=torch.long)
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": am, "prompt_lens": plens, "labels": labels}.items()}  # fmt: skip


def measure_memory(case: Case, device: torch.device) -> tuple[int, dict[str, int], float]:
    """(peak bytes, peak by category, seconds) of the second of two training steps."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from state.worker_config import TaskSource, TrainArgs
    from worker import masks
    from worker.optimizer import build_optimizer
    from worker.probe import token_loss_sum

    model, _, cfg = build(case.model)
    model.to(device)
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    args = TrainArgs(data=TaskSource(name="x", source="tiny:dup"), lr=1e-4,
                     batch_size=case.batch_size, max_length=case.max_length)  # fmt: skip
    opt, sched = build_optimizer(model, args)
    mode = MaskMode(case.mask)
    batch = _batch(int(model.config.vocab_size), case.batch_size, case.max_length, device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=case.autocast):
            logits = masks.forward(model, batch["input_ids"], batch["attention_mask"],
                                   batch["prompt_lens"], mode, use_cache=False)  # fmt: skip
        s, n = token_loss_sum(logits, batch["labels"])
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as in every later step
    del cfg
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    mt = MemTracker()
    mt.track_external(model, opt)
    t0 = time.perf_counter()
    with mt:
        step()
    secs = time.perf_counter() - t0
    snap = mt.get_tracker_snapshot("peak")
    dev = next(k for k in snap if str(k).startswith(device.type))
    parts = {str(getattr(k, "value", k)): int(v) for k, v in snap[dev].items()}
    peak = parts.pop("Total")
    if device.type == "cuda":
        parts["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated()) - base
    return peak, parts, secs


def estimate_memory(case: Case, cfg: dict[str, Any]) -> footprint.MemoryEstimate:
    from jobs.plan import train_memory_for

    return train_memory_for(
        footprint.ModelShape.from_config(cfg),
        batch_size=case.batch_size,
        seq_len=case.max_length,
        dtype="float32",
        device="cuda" if case.autocast else "cpu",  # autocast is what the CUDA path adds
        gradient_checkpointing=case.gradient_checkpointing,
    )


def measure_disk(model_name: str) -> dict[str, Any]:
    """Bytes of a real step checkpoint and final/ of `model_name`, and their estimates."""
    from state.worker_config import TaskSource, TrainArgs
    from worker import checkpoints
    from worker.optimizer import build_optimizer

    model, tok, cfg = build(model_name)
    model.train()
    args = TrainArgs(data=TaskSource(name="x", source="tiny:dup"))
    opt, sched = build_optimizer(model, args)
    ids = torch.randint(3, int(model.config.vocab_size), (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    shape = footprint.ModelShape.from_config(cfg)
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d)
        meta = {"step": 1, "config": {}, "probes": []}
        state = checkpoints.trainer_state(opt, sched)
        step_dir = checkpoints.save_checkpoint(ck, "step-1", model, tok, meta, state)
        final_dir = checkpoints.save_checkpoint(ck, "final", model, tok, meta, None)

        def size(p: Path) -> int:
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

        def tok_bytes(p: Path) -> int:
            weights = {"model.safetensors", checkpoints.TRAINER_STATE}
            return sum(f.stat().st_size for f in p.iterdir() if f.name.startswith("tok") or
                       (f.name.endswith(".json") and f.name not in weights and "token" in f.name))  # fmt: skip

        extra = tok_bytes(step_dir)
        est_step = footprint.checkpoint_bytes(shape.parameters, "float32", tensors=shape.tensors,
                                              extra_bytes=extra)  # fmt: skip
        est_final = footprint.checkpoint_bytes(shape.parameters, "float32", optimizer=False,
                                               tensors=shape.tensors, extra_bytes=extra)  # fmt: skip
        return {"model": model_name, "params": shape.parameters, "step_bytes": size(step_dir),
                "step_estimate": est_step, "final_bytes": size(final_dir),
                "final_estimate": est_final, "tokenizer_bytes": extra}  # fmt: skip


CASES = [
    Case("tiny", 16, 128, "prefix", False),  # the tiny profile's stage 3B
    Case("tiny", 16, 128, "causal", True),
    Case("replica", 8, 256, "prefix", False),
    Case("replica", 8, 256, "prefix", True),
    Case("replica-wide", 4, 256, "prefix", False),
    Case("replica-wide", 4, 256, "causal", True),
    # the ministral profile's setup (fp32 weights, bf16 autocast, checkpointing), shrunk
    Case("replica-wide", 4, 256, "prefix", True, autocast=True),
    Case("replica-wide", 4, 256, "prefix", False, autocast=True),
]


def pct(est: int, meas: int) -> float:
    return 100.0 * (est - meas) / meas


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(REPO / ".bench" / "plan.json"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", default="", help="comma-separated model names")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    device = torch.device(a.device)
    only = {x for x in a.only.split(",") if x}
    mem_rows, disk_rows = [], []
    for case in CASES:
        if only and case.model not in only:
            continue
        peak, parts, secs = measure_memory(case, device)
        _, _, cfg = build(case.model)
        est = estimate_memory(case, cfg)
        row = {**case.__dict__, "measured": peak, "measured_parts": parts, "estimate": est.total,
               "estimate_parts": est.parts(), "error_pct": round(pct(est.total, peak), 1),
               "step_s": round(secs, 3)}  # fmt: skip
        mem_rows.append(row)
        print(json.dumps(row), flush=True)
    for name in ("tiny", "replica", "replica-wide"):
        if only and name not in only:
            continue
        row = measure_disk(name)
        row["step_error_pct"] = round(pct(row["step_estimate"], row["step_bytes"]), 2)
        row["final_error_pct"] = round(pct(row["final_estimate"], row["final_bytes"]), 2)
        disk_rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    out.write_text(
        json.dumps({"machine": machine, "memory": mem_rows, "disk": disk_rows}, indent=2)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
