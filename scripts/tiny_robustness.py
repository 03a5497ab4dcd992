"""Does the tiny study's conclusion hold on every seed and every CPU kernel? Runs the study's
worker stages (1, 2, 3A -> 4A, 3B -> 4; the tiny profile's sizes) for each seed under each CPU
setting, and checks the study's claims (jobs.seeds.CLAIMS) per setting.

    .venv/bin/python scripts/tiny_robustness.py                       # seeds 0-4, all settings
    .venv/bin/python scripts/tiny_robustness.py --seeds 0,1 --settings native,avx2 --jobs 2

A setting is a CPU kernel (`ATEN_CPU_CAPABILITY`: `native` = what torch picks on this CPU,
`avx2`, `default` = no vector ISA) and a thread count. Float rounding differs between them,
so the tiny model built under each (its own cache dir) has other weights and every number
moves: the claims are what must not. Each (setting, seed) runs in its own process, which
builds the tiny model from the seed and runs the stages in-process through the worker's
lifecycle (the same code `orch launch` runs in tmux), so this measures the study, not orch.
Writes a JSON of every number (--out) and prints one table per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: name -> (ATEN_CPU_CAPABILITY or None for torch's choice, threads)
SETTINGS: dict[str, tuple[str | None, int]] = {
    "native": (None, 2),
    "native-1t": (None, 1),
    "avx2": ("avx2", 2),
    "default": ("default", 2),
}
EVAL_STAGES = ("stage1", "stage2", "stage4a", "stage4")


def one_seed(seed: int, work: Path) -> dict[str, dict[str, float]]:
    """In this process: the study's worker stages for `seed`; {stage: {task|macro: acc}}."""
    import contextlib
    import io

    from jobs.stages import get_stage
    from worker import lifecycle

    out: dict[str, dict[str, float]] = {}

    def run(stage: str, model: str | None = None) -> Path:
        spec = get_stage(stage, "tiny", {"seed": seed})
        args = dict(spec.task.args)
        if model is not None:
            args["model"] = model
        rd = work / f"seed{seed}" / stage
        with contextlib.redirect_stderr(io.StringIO()):
            rc = lifecycle.execute(rd, spec.task.command, args)
        if rc != 0:
            raise SystemExit(f"{stage} seed {seed} failed (exit {rc}): see {rd}")
        return rd

    def read(rd: Path) -> dict[str, float]:
        m = json.loads((rd / "metrics.json").read_text())
        return {"macro": m["macro_acc"], **{t: v["acc"] for t, v in m["tasks"].items()}}

    for stage in ("stage1", "stage2"):
        out[stage] = read(run(stage))
    for train, ev in (("stage3a", "stage4a"), ("stage3b", "stage4")):
        ckpt = run(train) / "checkpoints" / "final"
        out[ev] = read(run(ev, model=str(ckpt)))
    return out


def spawn(setting: str, seed: int, cache: Path, work: Path) -> dict:
    cap, threads = SETTINGS[setting]
    env = {**os.environ, "ORCH_CACHE_DIR": str(cache / setting), "HF_HUB_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if cap:
        env["ATEN_CPU_CAPABILITY"] = cap
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(seed), "--work", str(work / setting)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{setting} seed {seed}: {proc.stderr.strip().splitlines()[-1:]}")
    line = proc.stdout.strip().splitlines()[-1]
    return {
        "setting": setting,
        "seed": seed,
        "secs": round(time.monotonic() - t0),
        **json.loads(line),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--jobs", type=int, default=2, help="processes at once")
    ap.add_argument("--cache", type=Path, help="tiny model caches (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / ".bench" / "tiny_robustness.json")
    ap.add_argument(
        "--markdown", type=Path, help="print the tables of an earlier --out JSON as markdown"
    )
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(one_seed(a.child, a.work)))
        return 0
    if a.markdown is not None:
        print(markdown(json.loads(a.markdown.read_text())))
        return 0

    from jobs.seeds import across_seeds

    seeds = [int(s) for s in a.seeds.split(",")]
    settings = [s for s in a.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    tmp = Path(tempfile.mkdtemp(prefix="orch-robust-"))
    cache = a.cache or tmp / "cache"
    # native-1t shares native's models: the build is single-threaded in both (worker/tiny.py)
    cache.mkdir(parents=True, exist_ok=True)
    if "native-1t" in settings:
        (cache / "native").mkdir(exist_ok=True)
        link = cache / "native-1t"
        if not link.exists():
            link.symlink_to(cache / "native")
    jobs = [(s, seed) for s in settings for seed in seeds]
    # models first (the 2-thread settings), then the 1-thread reuse
    jobs.sort(key=lambda j: j[0] == "native-1t")
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda j: spawn(j[0], j[1], cache, tmp / "work"), jobs))
    report: dict = {"seeds": seeds, "settings": {}}
    ok = True
    for setting in settings:
        rows = {
            r["seed"]: {k: r[k] for k in EVAL_STAGES} for r in results if r["setting"] == setting
        }
        study = across_seeds(rows)
        report["settings"][setting] = {"per_seed": rows, **study.to_dict()}
        cap, threads = SETTINGS[setting]
        print(f"\n== {setting} (ATEN_CPU_CAPABILITY={cap or 'unset'}, {threads} threads)")
        print("seed  " + "  ".join(f"{s:>8}" for s in EVAL_STAGES))
        for seed, row in rows.items():
            print(f"{seed:>4}  " + "  ".join(f"{row[s]['macro']:8.4f}" for s in EVAL_STAGES))
        for key in ("delta", "vs_stage2_3A", "vs_stage2_3B"):
            f = study.figures[key]
            verdict = "larger than the spread" if f.beyond_noise else "within the spread"
            print(f"  {key:14s} {f.fmt(3, True)}  [{f.lo:+.3f} .. {f.hi:+.3f}]  {verdict}")
        for c in study.claims:
            ok &= c.holds
            print(f"  {'HOLDS' if c.holds else 'FAILS'} {c.held}/{len(c.per_seed)}: {c.text}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {a.out}; every claim holds in every setting: {ok}")
    return 0 if ok else 1


def markdown(report: dict) -> str:
    """The per-setting tables of a run's JSON, judged with the current jobs.seeds rules."""
    from jobs.seeds import CLAIMS, across_seeds

    out = []
    head = "| setting | seed | " + " | ".join(EVAL_STAGES) + " |"
    out += [head, "| --- | ---: | " + " | ".join("---:" for _ in EVAL_STAGES) + " |"]
    studies = {}
    for setting, data in report["settings"].items():
        rows = {int(k): v for k, v in data["per_seed"].items()}
        studies[setting] = across_seeds(rows)
        for seed, row in rows.items():
            cells = " | ".join(f"{row[s]['macro']:.4f}" for s in EVAL_STAGES)
            out.append(f"| {setting} | {seed} | {cells} |")
    out += [
        "",
        "| setting | stage 2 - 1 | 4A - 2 | 4 - 2 | " + " | ".join(k for k, _, _ in CLAIMS) + " |",
    ]
    out.append("| --- | --- | --- | --- | " + " | ".join("---" for _ in CLAIMS) + " |")
    for setting, st in studies.items():
        figs = []
        for key in ("delta", "vs_stage2_3A", "vs_stage2_3B"):
            f = st.figures[key]
            mark = "" if f.beyond_noise else " (within the spread)"
            figs.append(f"{f.fmt(3, True)} [{f.lo:+.3f}, {f.hi:+.3f}]{mark}")
        claims = [f"{c.held}/{len(c.per_seed)}" for c in st.claims]
        out.append(f"| {setting} | " + " | ".join(figs + claims) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
