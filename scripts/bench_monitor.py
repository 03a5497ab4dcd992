"""Benchmark of the monitor (issue 5): crash-detection latency and the watcher's cost.

    .venv/bin/python scripts/bench_monitor.py                      # 20 trials + 5 min cost run
    .venv/bin/python scripts/bench_monitor.py --trials 5 --cost-seconds 60   # quicker

Everything is real and on loopback: OpenSSH sshd (tests/sshd.py), tmux, the launcher's wrapper,
worker-like processes (tests/monitor_worker.py), `orch watch` as a subprocess with DEFAULT
[monitor] settings (interval 5 s, jitter 1 s), and a local HTTP server receiving Apprise
`json://` webhooks.

1. Latency: a run is started, the watcher sees it, we wait a random 0-5 s (so the kill lands
   anywhere in the poll cycle), `kill -9` the worker, and time until the `crashed` alert arrives
   at the webhook. Median and p95 over the trials. The seed's `wait_or_crash.sh` checks every
   3600 s, so its latency is uniform on [0, 3600] s: median 1800 s, worst 3600 s.
2. Cost: 20 active runs on 2 ssh targets (two sshd servers), `orch watch` for --cost-seconds;
   CPU = (utime + stime) of the watcher process over the window / wall time; round trips per
   poll from the watcher's heartbeat (agent requests / target polls).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.context import Context  # noqa: E402
from orchestrator.monitor.lock import HEARTBEAT_FILE, read_heartbeat  # noqa: E402
from orchestrator.targets.factory import make_target  # noqa: E402
from tests.integration.monitor_harness import (  # noqa: E402
    kill_session,
    orch_argv,
    prepare_target,
    signal_pid,
    start_run,
    wait_until,
    worker_pid,
)
from tests.sshd import make_server  # noqa: E402
from tests.webhook import Webhook  # noqa: E402


def project(root: Path, servers: dict[str, object], hook: Webhook, work: Path) -> Path:
    """orch.toml with the given ssh targets and DEFAULT monitor settings."""
    root.mkdir(parents=True, exist_ok=True)
    parts = [f'default_target = "{next(iter(servers))}"\n']
    for name, srv in servers.items():
        parts.append(srv.toml(name, workdir=work / name))  # type: ignore[attr-defined]
        parts.append(f'python = "{sys.executable}"\n\n')
    parts.append(f'[alerts]\nurls = ["{hook.url}"]\n')
    (root / "orch.toml").write_text("".join(parts))
    return root


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def latency(trials: int, tmp: Path) -> list[float]:
    srv = make_server(tmp / "sshd-lat")
    srv.start()
    hook = Webhook()
    root = project(tmp / "lat", {"box": srv}, hook, tmp / "work")
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    prepare_target(target, sync=False)
    log = open(tmp / "watch-lat.log", "ab")  # noqa: SIM115
    watcher = subprocess.Popen(orch_argv("watch"), cwd=root, stdout=log, stderr=subprocess.STDOUT)
    out: list[float] = []
    try:
        for i in range(trials):
            rec = start_run(ctx, target, stage="lat")
            pid = worker_pid(target, rec)
            wait_until(
                lambda r=rec: (g := ctx.store.get_run(r.stage_dir, r.run_id)) and g.last_seq,
                30,
                what="watcher sees the run",
            )
            time.sleep(random.uniform(0, 5))
            t0 = time.monotonic()
            signal_pid(pid, signal.SIGKILL)
            hook.wait_for("CRASHED", rec.run_id, timeout=60)
            arrived = next(t for t, p in hook.posts if rec.run_id in str(p.get("message")))
            out.append(arrived - t0)
            print(f"trial {i + 1:2d}: {out[-1]:.2f} s", flush=True)
    finally:
        watcher.terminate()
        watcher.wait(20)
        for r in ctx.store.list_runs(active_only=True):
            kill_session(target, r)
        target.close()
        hook.close()
        srv.stop()
    return out


def cost(seconds: float, runs: int, tmp: Path) -> dict[str, float]:
    servers = {"box1": make_server(tmp / "sshd-a"), "box2": make_server(tmp / "sshd-b")}
    for s in servers.values():
        s.start()
    hook = Webhook()
    root = project(tmp / "cost", servers, hook, tmp / "work")
    ctx = Context(cwd=root)
    targets = {n: make_target(ctx, n) for n in servers}
    recs = []
    for t in targets.values():
        prepare_target(t, sync=False)
    for i in range(runs):
        t = list(targets.values())[i % 2]
        recs.append((t, start_run(ctx, t, stage="cost")))
    log = open(tmp / "watch-cost.log", "ab")  # noqa: SIM115
    watcher = subprocess.Popen(orch_argv("watch"), cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(15)  # start-up (imports, connects, Apprise) is not the steady state
        hb0 = read_heartbeat(ctx.state_dir / HEARTBEAT_FILE)
        c0, w0 = cpu_seconds(watcher.pid), time.monotonic()
        time.sleep(seconds)
        c1, w1 = cpu_seconds(watcher.pid), time.monotonic()
        hb1 = read_heartbeat(ctx.state_dir / HEARTBEAT_FILE)
        active = [r for r in ctx.store.list_runs(active_only=True)]
    finally:
        watcher.terminate()
        watcher.wait(20)
        for t, r in recs:
            kill_session(t, r)
        for t in targets.values():
            t.close()
        hook.close()
        for s in servers.values():
            s.stop()
    polls = hb1.get("polls", 0) - hb0.get("polls", 0)
    trips = hb1.get("round_trips", 0) - hb0.get("round_trips", 0)
    return {
        "cpu_pct": 100.0 * (c1 - c0) / (w1 - w0),
        "window_s": w1 - w0,
        "polls": polls,
        "round_trips": trips,
        "trips_per_poll": trips / polls if polls else float("nan"),
        "active_runs": len(active),
        "alerts": len(hook.posts),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--cost-seconds", type=float, default=300.0)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    os.environ.setdefault("ORCH_STATE_DIR", str(tmp / "state"))
    os.environ["HOME"] = str(tmp / "home")
    (tmp / "home").mkdir()
    print(f"machine: {os.cpu_count()} CPU(s), {sys.platform}, python {sys.version.split()[0]}")
    if not args.skip_latency:
        os.environ["ORCH_STATE_DIR"] = str(tmp / "state-lat")
        lat = latency(args.trials, tmp)
        print(
            f"detection latency kill -9 -> webhook, default settings, {len(lat)} trials: "
            f"median {statistics.median(lat):.2f} s, p95 {pct(lat, 0.95):.2f} s, "
            f"min {min(lat):.2f} s, max {max(lat):.2f} s"
        )
        print(
            f"seed watcher (CHECK_EVERY=3600): median 1800 s, worst 3600 s "
            f"-> {1800 / statistics.median(lat):.0f}x faster at the median"
        )
    if not args.skip_cost:
        os.environ["ORCH_STATE_DIR"] = str(tmp / "state-cost")
        c = cost(args.cost_seconds, args.runs, tmp)
        print(
            f"watcher cost, {c['active_runs']} active runs on 2 targets, {c['window_s']:.0f} s window: "
            f"CPU {c['cpu_pct']:.2f} % of one core; {c['polls']} target polls, {c['round_trips']} round trips "
            f"({c['trips_per_poll']:.2f} per target poll); alerts sent: {c['alerts']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
