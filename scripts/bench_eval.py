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


def _setup(spec: dict):
    import torch

    from state.worker_config import EvalArgs, TaskSource
    from worker import evaluate, modeling

    torch.set_num_threads(spec["threads"])
    task = TaskSource(name="t", source=spec["source"], format="mc", split="test", limit=spec["n"])
    args = EvalArgs(
        model=spec["model"],
        mask=spec["mask"],
        batch_size=spec["batch"],
        tasks=[task],
        max_length=256,
    )
    loaded = modeling.load(args)
    return torch, evaluate, args, loaded


def child_time(spec: dict) -> dict:
    """Wall time of both strategies in ONE process, interleaved, median of `reps`: the load
    of a shared machine hits both alike."""
    import statistics

    torch, evaluate, args, loaded = _setup(spec)
    runs = {s: args.model_copy(update={"shared_context": s}) for s in (False, True)}
    few = [args.tasks[0].model_copy(update={"limit": 2})]
    for s in (False, True):  # warm-up: first kernels, allocator
        evaluate.evaluate(runs[s].model_copy(update={"tasks": few}), loaded=loaded)
    walls: dict[bool, list[float]] = {False: [], True: []}
    res = {}
    for _ in range(spec["reps"]):
        for s in (False, True):
            t0 = time.perf_counter()
            res[s] = evaluate.evaluate(runs[s], loaded=loaded)
            walls[s].append(time.perf_counter() - t0)
    return {
        str(s).lower(): {
            "wall_s": statistics.median(walls[s]),
            "walls": walls[s],
            "tokens": res[s]["tokens_forwarded"],
            "positions": res[s]["positions_forwarded"],
            "acc": res[s]["macro_acc"],
        }
        for s in (False, True)
    }


def child_mem(spec: dict) -> dict:
    """Peak memory of one strategy, alone in its process."""
    torch, evaluate, args, loaded = _setup(spec)
    run = args.model_copy(update={"shared_context": spec["shared"]})
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # torch + model, no eval yet
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    evaluate.evaluate(run, loaded=loaded)
    if loaded.device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "rss_mib": 0.0}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (rss - base_rss) / 1024, "rss_mib": rss / 1024}


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


def measure(kind: str, spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)],
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
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--drop-only", action="store_true", help="only the causal-vs-prefix accuracy table"
    )
    a = ap.parse_args()
    if a.child:
        fn = child_time if a.child[0] == "time" else child_mem
        print(json.dumps(fn(json.loads(a.child[1]))))
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
    load = os.getloadavg()[0]
    print(
        f"# bench_eval  threads={a.threads}  cpu_count={os.cpu_count()}  reps={a.reps}  load={load:.1f}"
    )
    print(
        "| config | mask | strategy | tokens fwd | positions fwd | wall s (median) "
        "| peak MiB (growth) | peak RSS MiB | acc |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for name, cfg in configs.items():
        for mask in ("causal", "prefix"):
            spec = {**cfg, "mask": mask, "threads": a.threads, "reps": a.reps}
            t = measure("time", spec)
            mem = {s: measure("mem", {**spec, "shared": s}) for s in (False, True)}
            for s in (False, True):
                m = {**t[str(s).lower()], **mem[s]}
                print(
                    f"| {name} | {mask} | {'shared' if s else 'naive'} | {m['tokens']} | "
                    f"{m['positions']} | {m['wall_s']:.2f} | {m['peak_mib']:.1f} | "
                    f"{m['rss_mib']:.0f} | {m['acc']:.3f} |"
                )
            sh, nv = t["true"], t["false"]
            ratios.append(
                (
                    name,
                    mask,
                    sh["tokens"] / nv["tokens"],
                    sh["wall_s"] / nv["wall_s"],
                    mem[True]["peak_mib"],
                    mem[False]["peak_mib"],
                )
            )
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    print(
        "\n| config | mask | tokens shared/naive | wall shared/naive | peak MiB shared vs naive |"
    )
    print("| --- | --- | ---: | ---: | --- |")
    for name, mask, tok, wall, p_s, p_n in ratios:
        print(f"| {name} | {mask} | {tok:.3f} | {wall:.3f} | {p_s:.1f} vs {p_n:.1f} |")
    drop_table(a.threads, 200)


if __name__ == "__main__":
    main()
