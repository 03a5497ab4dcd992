"""A worker-like process for monitor tests (test data, not a stand-in for the real worker).

    python tests/monitor_worker.py RUN_DIR --outcome succeed|fail|forever [--seconds S] [--every 0.2]

Writes status.json (seq going up) every `--every` seconds with state.protocol, exactly as the
worker does; at the end writes the artifacts, manifest.json and .run_complete (succeed) or
.run_failed (fail) and exits 0/1. `forever` keeps beating until killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from state import names
from state.models import RunComplete, RunFailed, RunStatus
from state.protocol import atomic_write_json, build_manifest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--outcome", choices=["succeed", "fail", "forever"], default="forever")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--every", type=float, default=0.2)
    args = ap.parse_args()
    rd = Path(args.run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    run_id = rd.name
    seq = 0
    t_end = time.monotonic() + args.seconds
    while args.outcome == "forever" or time.monotonic() < t_end:
        seq += 1
        atomic_write_json(
            rd / names.STATUS,
            RunStatus(
                run_id=run_id,
                stage="mon",
                seq=seq,
                pid=os.getpid(),
                step=seq,
                total_steps=1000,
                loss=round(2.0 / seq, 4),
                phase="training",
            ),
        )
        time.sleep(args.every)
    if args.outcome == "fail":
        atomic_write_json(
            rd / names.RUN_FAILED, RunFailed(run_id=run_id, reason="synthetic failure: bad batch")
        )
        return 1
    atomic_write_json(rd / names.METRICS, {"macro_acc": 0.5, "steps": seq})
    (rd / "predictions.txt").write_text("a\nb\n" * 100)
    manifest = build_manifest(rd, run_id)
    atomic_write_json(rd / names.MANIFEST, manifest)
    atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=run_id))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
