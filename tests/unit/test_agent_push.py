"""The agent's `watch` (state/watch.py) as a real subprocess, and the controller's handling of
pushed lines (orchestrator/monitor/push.py): duplicates, gaps, other channels."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.monitor.push import PushHub, Subscription
from state.models import RunStatus, TargetObservation
from state.protocol import atomic_write_json
from state.watch import BoxWatcher, WatchRequest

REPO = Path(__file__).resolve().parents[2]


class _Agent:
    def __init__(self, workdir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "state.agent", "--workdir", str(workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert self.line()["ready"] is True

    def send(self, req: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no line from the agent"
        return dict(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        self.send({"op": "exit"})
        self.proc.wait(10)


def _run_dir(root: Path, name: str = "r1") -> tuple[str, Path]:
    rel = f"runs/s/{name}"
    (root / rel).mkdir(parents=True)
    return rel, root / rel


def test_watch_pushes_a_death_and_the_exit_code(tmp_path: Path) -> None:
    rel, rd = _run_dir(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    (rd / "pid").write_text(f"{sleeper.pid}\n")
    agent = _Agent(tmp_path)
    try:
        agent.send({"op": "watch", "runs": [{"run_dir": rel}], "heartbeat_s": 0.3, "gpus": False})
        answer = agent.line()
        assert answer["ok"] is True and answer["watching"] == 1 and answer["push"] == 0
        obs = TargetObservation.model_validate(answer)  # a poll answer's shape
        assert obs.runs[0].pid_alive is True
        beat = agent.line()
        assert beat == {"push": 1, "chan": answer["chan"], "beat": True}
        t0 = time.monotonic()
        sleeper.kill()
        sleeper.wait()
        (rd / "exit_code").write_text("137\n")  # the wrapper writes it right after
        got = agent.line()
        while "obs" not in got:
            got = agent.line()
        [run] = TargetObservation.model_validate(got["obs"]).runs
        assert run.pid_alive is False and run.exit_code == 137
        assert time.monotonic() - t0 < 1.0
        assert got["push"] >= 2 and got["chan"] == answer["chan"]
        # A second watch keeps the channel and its numbering; ping still answers.
        agent.send({"op": "watch", "runs": [{"run_dir": rel}], "gpus": False})
        again = agent.line()
        while "ok" not in again:
            again = agent.line()
        assert again["chan"] == answer["chan"] and again["push"] >= got["push"]
        agent.send({"op": "ping"})
        pong = agent.line()
        while "ok" not in pong:
            pong = agent.line()
        assert "pong" in pong
    finally:
        sleeper.kill()
        agent.close()


def test_watcher_coalesces_progress_and_beats_when_quiet(tmp_path: Path) -> None:
    rel, rd = _run_dir(tmp_path)
    req = WatchRequest(runs=[{"run_dir": rel}], gpus=False, heartbeat_s=1.0, progress_s=0.5)  # type: ignore[list-item]
    w = BoxWatcher(tmp_path, req)
    json.loads(w.subscribe(req))
    t = time.monotonic()
    lines: list[dict[str, Any]] = []
    for i in range(20):  # status.json rewritten every "50 ms" for 1 s
        atomic_write_json(rd / "status.json", RunStatus(run_id="r1", stage="s", seq=i, pid=1))
        t += 0.05
        lines += [json.loads(x) for x in w.tick(t)]
    changes = [x for x in lines if "obs" in x]
    assert 1 <= len(changes) <= 3  # at most one progress line per progress_s
    assert [x["push"] for x in lines] == list(range(1, len(lines) + 1))
    last = [json.loads(x) for x in w.tick(t + 1.0)]  # the pending progress goes out
    assert last and "obs" in last[0] and last[0]["obs"]["runs"][0]["status"]["seq"] == 19
    assert w.tick(t + 1.5) == []
    quiet = [json.loads(x) for x in w.tick(t + 2.1)]  # nothing changed for heartbeat_s
    assert quiet and quiet[-1].get("beat") is True
    # A decisive file is pushed at once (min_gap after the last line of the run).
    (rd / ".run_failed").write_text("{}")
    urgent = [json.loads(x) for x in w.tick(t + 2.3)]
    assert urgent and "obs" in urgent[0]
    assert urgent[0]["obs"]["runs"][0]["failed_marker"] is True
    w.close()


class _Quiet:
    on_push = None

    def drain(self, wait: float) -> bool:
        return True


def _sub() -> tuple[Subscription, list[TargetObservation], list[str]]:
    fed: list[TargetObservation] = []
    polled: list[str] = []
    hub = PushHub(None, feed=lambda n, o: fed.append(o), poll=polled.append)  # type: ignore[arg-type]
    sub = Subscription(hub, "box", _Quiet(), frozenset({"runs/s/r1"}))  # type: ignore[arg-type]
    sub.chan, sub.last_seq = "c1", 4
    return sub, fed, polled


def _obs_line(seq: int, chan: str = "c1", exit_code: int | None = None) -> dict[str, Any]:
    obs = {"runs": [{"run_dir": "runs/s/r1", "exit_code": exit_code}]}
    return {"push": seq, "chan": chan, "obs": obs}


def test_pushed_lines_duplicated_reordered_or_lost() -> None:
    sub, fed, polled = _sub()
    sub._handle(_obs_line(5))
    sub._handle(_obs_line(5))  # duplicated
    sub._handle(_obs_line(3))  # reordered: older than what was seen
    assert len(fed) == 1 and sub.hub.stats.duplicates == 2 and polled == []
    sub._handle({"push": 6, "chan": "c1", "beat": True})
    assert len(fed) == 1 and sub.hub.stats.beats == 1
    sub._handle(_obs_line(9, exit_code=137))  # 7 and 8 never came: a full poll fills the hole
    assert len(fed) == 2 and fed[-1].runs[0].exit_code == 137 and polled == ["box"]
    sub._handle(_obs_line(10, chan="other"))  # not this channel's: look again, trust neither
    assert len(fed) == 2 and polled == ["box", "box"]
    assert sub.cache["runs/s/r1"].exit_code == 137  # what the replays judge again
