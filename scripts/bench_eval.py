"""Benchmark: shared-context vs naive per-choice multiple-choice scoring (issue 3).

    .venv/bin/python scripts/bench_eval.py            # both configs, both masks
    .venv/bin/python scripts/bench_eval.py --quick    # fewer questions
    .venv/bin/python scripts/bench_eval.py --drop-only  # tiny model: causal vs prefix accuracy

Each (config, mask, strategy) runs in a fresh subprocess so peak memory is its own: on CPU the
growth of peak RSS (ru_maxrss) over the process with torch and the model loaded, on CUDA
torch.cuda.max_memory_allocated.
Configs:
  tiny   tiny://default on tiny:recall (4 choices, 1-token continuations)
  larger a random-init Mistral (hidden 256, 4 layers) on a synthetic 4-choice task with long
         contexts (~70 tokens) and multi-token choices (~6-14 tokens), HellaSwag-like shapes
Targets: tokens forwarded >= 2x fewer, wall time <= 0.6x (shared / naive).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _larger_model(work: Path) -> Path:
    """A randomly initialised, CPU-feasible Mistral with the tiny tokenizer (timing only)."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from worker import tiny

    out = work / "larger"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tiny.resolve("tiny://default"))
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        sliding_window=None,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    MistralForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _long_task(work: Path, n: int) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        ctx = (
            "count : "
            + " ".join(str(rng.randrange(19)) for _ in range(rng.randrange(60, 80)))
            + " next"
        )
        choices = [
            " ".join(str(rng.randrange(19)) for _ in range(rng.randrange(6, 15))) for _ in range(4)
        ]
        rows.append({"context": ctx, "choices": choices, "label": rng.randrange(4)})
    path = work / "long_mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def child(spec: dict) -> dict:
    """One measurement (runs in its own process)."""
    import torch

    from state.worker_config import EvalArgs, TaskSource
    from worker import evaluate, modeling

    torch.set_num_threads(spec["threads"])
    args = EvalArgs(
        model=spec["model"],
        mask=spec["mask"],
        shared_context=spec["shared"],
        batch_size=spec["batch"],
        tasks=[
            TaskSource(name="t", source=spec["source"], format="mc", split="test", limit=spec["n"])
        ],
        max_length=256,
    )
    loaded = modeling.load(args)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # torch + model, no eval yet
    # warm-up on one question so one-off costs (first kernels) are not timed; one question
    # keeps its own memory far below the measured run's
    warm = args.model_copy(update={"tasks": [args.tasks[0].model_copy(update={"limit": 1})]})
    evaluate.evaluate(warm, loaded=loaded)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = evaluate.evaluate(args, loaded=loaded)
    wall = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if loaded.device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    return {
        "wall_s": wall,
        "tokens": res["tokens_forwarded"],
        "positions": res["positions_forwarded"],
        "peak_mib": peak,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "acc": res["macro_acc"],
        "device": str(loaded.device),
    }


def drop_table(threads: int, n: int) -> None:
    """Accuracy of tiny://default per task under causal vs prefix masks (what stage 1 vs 2
    measure on the tiny profile)."""
    import torch

    from state.worker_config import EvalArgs, TaskSource
    from worker import evaluate, modeling, tiny

    torch.set_num_threads(threads)
    tasks = [TaskSource(name=t, source=f"tiny:{t}", split="test", limit=n) for t in tiny.TASKS]
    args = EvalArgs(tasks=tasks)
    loaded = modeling.load(args)
    res = {
        m: evaluate.evaluate(args.model_copy(update={"mask": m}), loaded=loaded)
        for m in ("causal", "prefix")
    }
    print(f"\n| tiny task (n={n}, chance 0.25) | causal acc | prefix acc | prefix / causal |")
    print("| --- | ---: | ---: | ---: |")
    for t in [*tiny.TASKS, "macro"]:
        c = res["causal"]["macro_acc"] if t == "macro" else res["causal"]["tasks"][t]["acc"]
        p = res["prefix"]["macro_acc"] if t == "macro" else res["prefix"]["tasks"][t]["acc"]
        print(f"| {t} | {c:.3f} | {p:.3f} | {p / c if c else float('nan'):.3f} |")


def measure(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child")
    ap.add_argument(
        "--drop-only", action="store_true", help="only the causal-vs-prefix accuracy table"
    )
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.drop_only:
        drop_table(a.threads, 200)
        return
    work = Path(os.environ.get("BENCH_WORK", tempfile.mkdtemp(prefix="bench-eval-")))
    work.mkdir(parents=True, exist_ok=True)
    n_tiny, n_long = (100, 40) if a.quick else (400, 120)
    configs = {
        "tiny": {"model": "tiny://default", "source": "tiny:recall", "n": n_tiny, "batch": 32},
        "larger": {
            "model": str(_larger_model(work)),
            "source": str(_long_task(work, n_long)),
            "n": n_long,
            "batch": 16,
        },
    }
    print(f"# bench_eval  threads={a.threads}  cpu_count={os.cpu_count()}  work={work}")
    print(
        "| config | mask | strategy | tokens fwd | positions fwd | wall s | peak MiB (growth) | peak RSS MiB | acc |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for name, cfg in configs.items():
        for mask in ("causal", "prefix"):
            r = {}
            for shared in (False, True):
                r[shared] = measure({**cfg, "mask": mask, "shared": shared, "threads": a.threads})
                m = r[shared]
                print(
                    f"| {name} | {mask} | {'shared' if shared else 'naive'} | {m['tokens']} | "
                    f"{m['positions']} | {m['wall_s']:.2f} | {m['peak_mib']:.1f} | {m['rss_mib']:.0f} | {m['acc']:.3f} |"
                )
            ratios.append(
                (
                    name,
                    mask,
                    r[True]["tokens"] / r[False]["tokens"],
                    r[True]["wall_s"] / r[False]["wall_s"],
                    r[True]["peak_mib"],
                    r[False]["peak_mib"],
                )
            )
    print(
        "\n| config | mask | tokens shared/naive | wall shared/naive | peak MiB shared vs naive |"
    )
    print("| --- | --- | ---: | ---: | --- |")
    for name, mask, tok, wall, p_s, p_n in ratios:
        print(f"| {name} | {mask} | {tok:.3f} | {wall:.3f} | {p_s:.1f} vs {p_n:.1f} |")
    drop_table(a.threads, 200)


if __name__ == "__main__":
    main()
