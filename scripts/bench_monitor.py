"""Benchmark of the monitor (issues 5 and 14): detection latency and the watcher's cost, for
today's poll and for push, side by side in one run.

    .venv/bin/python scripts/bench_monitor.py                      # 20 trials + 5 min cost runs
    .venv/bin/python scripts/bench_monitor.py --trials 5 --cost-seconds 60   # quicker
    .venv/bin/python scripts/bench_monitor.py --modes push         # push only

`--modes poll,push` (the default) measures both: `poll` is `[monitor] push = false` (every
5 s, as before issue 14), `push` the default settings (the agent pushes; a safety-net poll
every 30 s). Besides the kill -9 trials, `--complete-trials` runs end by themselves and the
time from their `.run_complete` (its mtime) to the `succeeded` alert is measured; the cost runs
also count the wire (TCP bytes of the sshd connections, from `ss`), the agents' CPU on the box
and the pushed lines, for quiet runs (status.json every 5 s, the worker's heartbeat) and busy
ones (every 0.2 s).

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
from tests.delay_proxy import DelayProxy  # noqa: E402
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


def project(
    root: Path,
    servers: dict[str, object],
    hook: Webhook,
    work: Path,
    mode: str = "poll",
    ports: dict[str, int] | None = None,
) -> Path:
    """orch.toml with the given ssh targets and DEFAULT monitor settings (`push = false` for
    mode "poll"; auto-pulls off in both, so a pull never competes with a trial)."""
    root.mkdir(parents=True, exist_ok=True)
    push = "true" if mode == "push" else "false"
    parts = [
        f'default_target = "{next(iter(servers))}"\n',
        f"[monitor]\npush = {push}\npull_on_success = false\n\n",
    ]
    for name, srv in servers.items():
        section = srv.toml(name, workdir=work / name)  # type: ignore[attr-defined]
        if ports and name in ports:  # through the delaying proxy
            section = section.replace(f"port = {srv.port}", f"port = {ports[name]}")  # type: ignore[attr-defined]
        parts.append(section)
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


def rtt(target: object, n: int = 20) -> float:
    """Median time of an agent `ping` round trip over the target's channel."""
    agent = target.agent()  # type: ignore[attr-defined]
    agent.request({"op": "ping"}, timeout=30)
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        agent.request({"op": "ping"}, timeout=30)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def latency(
    trials: int, tmp: Path, mode: str = "poll", complete_trials: int = 0, delay_ms: float = 0.0
) -> tuple[list[float], list[float], float]:
    tag = f"{mode}-{delay_ms:g}"
    srv = make_server(tmp / f"sshd-lat-{tag}")
    srv.start()
    proxy = DelayProxy(("127.0.0.1", srv.port), delay_ms / 2000.0) if delay_ms else None
    hook = Webhook()
    ports = {"box": proxy.port} if proxy else None
    root = project(tmp / f"lat-{tag}", {"box": srv}, hook, tmp / f"work-{tag}", mode, ports)
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    prepare_target(target, sync=False)
    round_trip = rtt(target)
    log = open(tmp / f"watch-lat-{tag}.log", "ab")  # noqa: SIM115
    watcher = subprocess.Popen(orch_argv("watch"), cwd=root, stdout=log, stderr=subprocess.STDOUT)
    out: list[float] = []
    done: list[float] = []
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
            print(f"{tag} kill trial {i + 1:2d}: {out[-1]:.2f} s", flush=True)
        for i in range(complete_trials):
            rec = start_run(
                ctx, target, stage="lat", outcome="succeed", seconds=random.uniform(1, 5)
            )
            hook.wait_for("succeeded", rec.run_id, timeout=60)
            arrived = next(t for t, p in hook.posts if rec.run_id in str(p.get("message")))
            marker = Path(target.workdir) / rec.run_dir / ".run_complete"
            arrived_wall = time.time() - (time.monotonic() - arrived)
            done.append(arrived_wall - marker.stat().st_mtime)
            print(f"{tag} complete trial {i + 1:2d}: {done[-1]:.2f} s", flush=True)
    finally:
        watcher.terminate()
        watcher.wait(20)
        for r in ctx.store.list_runs(active_only=True):
            kill_session(target, r)
        target.close()
        hook.close()
        if proxy is not None:
            proxy.close()
        srv.stop()
    return out, done, round_trip


def agent_pids(workdir: Path) -> list[int]:
    """`python -m state.agent --workdir WORKDIR` processes (the box is this machine)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0") if d.name.isdigit() else []
        except OSError:
            continue
        if b"state.agent" in argv and str(workdir).encode() in argv:
            out.append(int(d.name))
    return out


def wire_bytes(port: int) -> int:
    """TCP bytes sent + received on the established connections of the sshd on `port`."""
    res = subprocess.run(
        ["ss", "-tniH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    )
    total = 0
    for word in res.stdout.split():
        for key in ("bytes_sent:", "bytes_received:"):
            if word.startswith(key):
                total += int(word[len(key) :])
    return total


def cost(
    seconds: float, runs: int, tmp: Path, mode: str = "poll", every: float = 0.2
) -> dict[str, float]:
    tag = f"{mode}-{every:g}"
    servers = {
        "box1": make_server(tmp / f"sshd-a-{tag}"),
        "box2": make_server(tmp / f"sshd-b-{tag}"),
    }
    for s in servers.values():
        s.start()
    hook = Webhook()
    work = tmp / f"work-{tag}"
    root = project(tmp / f"cost-{tag}", servers, hook, work, mode)
    ctx = Context(cwd=root)
    targets = {n: make_target(ctx, n) for n in servers}
    recs = []
    for t in targets.values():
        prepare_target(t, sync=False)
    for i in range(runs):
        t = list(targets.values())[i % 2]
        recs.append((t, start_run(ctx, t, stage="cost", every=every)))
    for t in targets.values():
        t.close()  # only the watcher's connections are on the wire
    log = open(tmp / f"watch-cost-{tag}.log", "ab")  # noqa: SIM115
    watcher = subprocess.Popen(orch_argv("watch"), cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(15)  # start-up (imports, connects, Apprise) is not the steady state
        agents = [p for n in servers for p in agent_pids(work / n)]
        hb0 = read_heartbeat(ctx.state_dir / HEARTBEAT_FILE)
        b0 = sum(wire_bytes(s.port) for s in servers.values())
        a0 = sum(cpu_seconds(p) for p in agents)
        c0, w0 = cpu_seconds(watcher.pid), time.monotonic()
        time.sleep(seconds)
        c1, w1 = cpu_seconds(watcher.pid), time.monotonic()
        a1 = sum(cpu_seconds(p) for p in agents)
        b1 = sum(wire_bytes(s.port) for s in servers.values())
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
    pushed = hb1.get("pushed_lines", 0) - hb0.get("pushed_lines", 0)
    minutes = (w1 - w0) / 60.0
    n_targets = len(servers)
    return {
        "mode": mode,  # type: ignore[dict-item]
        "every": every,
        "agents": len(agents),
        "agent_cpu_pct": 100.0 * (a1 - a0) / (w1 - w0) / max(1, len(agents)),
        "bytes_per_min_target": (b1 - b0) / minutes / n_targets,
        "lines_per_min_target": (2 * trips + pushed) / minutes / n_targets,
        "pushing": len(hb1.get("pushing", [])),
        "cpu_pct": 100.0 * (c1 - c0) / (w1 - w0),
        "window_s": w1 - w0,
        "polls": polls,
        "round_trips": trips,
        "trips_per_poll": trips / polls if polls else float("nan"),
        "active_runs": len(active),
        "alerts": len(hook.posts),
    }


def summary(values: list[float]) -> str:
    if not values:
        return "no trials"
    return (
        f"median {statistics.median(values):.2f} s, p95 {pct(values, 0.95):.2f} s, "
        f"min {min(values):.2f} s, max {max(values):.2f} s ({len(values)} trials)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--complete-trials", type=int, default=20)
    ap.add_argument("--cost-seconds", type=float, default=300.0)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--modes", default="poll,push", help="comma-separated: poll, push")
    ap.add_argument("--busy-every", type=float, default=0.2, help="status.json period, busy runs")
    ap.add_argument("--quiet-every", type=float, default=5.0, help="status.json period, quiet runs")
    ap.add_argument(
        "--idle-every", type=float, default=3600.0, help="status.json period, idle runs (never)"
    )
    ap.add_argument(
        "--delay-ms",
        type=float,
        default=100.0,
        help="also time detection with this much added round trip (a delaying proxy); 0: not",
    )
    ap.add_argument("--delay-trials", type=int, default=10)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    os.environ.setdefault("ORCH_STATE_DIR", str(tmp / "state"))
    os.environ["HOME"] = str(tmp / "home")
    (tmp / "home").mkdir()
    print(f"machine: {os.cpu_count()} CPU(s), {sys.platform}, python {sys.version.split()[0]}")
    results: list[str] = []
    if not args.skip_latency:
        for mode in modes:
            os.environ["ORCH_STATE_DIR"] = str(tmp / f"state-lat-{mode}")
            kill, done, rt = latency(args.trials, tmp, mode, args.complete_trials)
            results.append(
                f"[{mode}] kill -9 -> crashed alert at the webhook: {summary(kill)}; "
                f"agent round trip {rt * 1000:.1f} ms"
            )
            results.append(f"[{mode}] .run_complete -> succeeded alert: {summary(done)}")
            print(results[-2], results[-1], sep="\n", flush=True)
        if args.delay_ms:
            for mode in modes:
                os.environ["ORCH_STATE_DIR"] = str(tmp / f"state-lat-{mode}-{args.delay_ms:g}")
                kill, done, rt = latency(
                    args.delay_trials, tmp, mode, args.delay_trials, args.delay_ms
                )
                results.append(
                    f"[{mode}, +{args.delay_ms:g} ms] kill -9 -> crashed alert: {summary(kill)}; "
                    f".run_complete -> succeeded alert: {summary(done)}; agent round trip "
                    f"measured {rt * 1000:.1f} ms"
                )
                print(results[-1], flush=True)
    if not args.skip_cost:
        for every in (args.idle_every, args.quiet_every, args.busy_every):
            for mode in modes:
                os.environ["ORCH_STATE_DIR"] = str(tmp / f"state-cost-{mode}-{every:g}")
                c = cost(args.cost_seconds, args.runs, tmp, mode, every)
                results.append(
                    f"[{mode}] cost, {c['active_runs']} runs on 2 targets writing status.json every "
                    f"{every:g} s, {c['window_s']:.0f} s window: watcher CPU {c['cpu_pct']:.2f} % "
                    f"of a core; agent CPU {c['agent_cpu_pct']:.2f} % per agent ({c['agents']} "
                    f"agents); wire {c['bytes_per_min_target'] / 1024:.1f} KiB/min and "
                    f"{c['lines_per_min_target']:.0f} lines/min per target; {c['polls']} polls, "
                    f"{c['round_trips']} round trips; targets pushing: {c['pushing']}; "
                    f"alerts sent: {c['alerts']}"
                )
                print(results[-1], flush=True)
    print("\nsummary:")
    for line in results:
        print(" ", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
