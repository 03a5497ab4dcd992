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
from state.observe import ObserveRequest, observe
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
    # One more rewrite: whether or not the last tick above pushed, this one is pending now
    # (not left to where float steps of 0.05 s fall against the 0.5 s window).
    atomic_write_json(rd / "status.json", RunStatus(run_id="r1", stage="s", seq=99, pid=1))
    last = [json.loads(x) for x in w.tick(t + 1.0)]  # the pending progress goes out
    assert last and "obs" in last[0] and last[0]["obs"]["runs"][0]["status"]["seq"] == 99
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
    sub._handle(_obs_line(7, exit_code=137))
    assert len(fed) == 2 and fed[-1].runs[0].exit_code == 137
    assert sub.cache["runs/s/r1"].exit_code == 137  # what the replays judge again
    # 8 and 9 never came: nothing is applied over the hole; the listener ends the
    # subscription and its full poll subscribes again from a whole observation.
    sub._handle(_obs_line(10, exit_code=1))
    assert len(fed) == 2 and sub.broken and sub.hub.stats.gaps == 1
    sub2, fed2, _ = _sub()
    sub2._handle(_obs_line(5, chan="other"))  # not this channel's: trust neither, look again
    assert fed2 == [] and sub2.broken


def test_deltas_carry_only_what_changed_and_patch_back_to_the_whole(tmp_path: Path) -> None:
    """The agent's delta line and the controller's patch give exactly the observation a full
    line would have carried."""
    rel, rd = _run_dir(tmp_path)
    events = [{"kind": "train", "ts": "2026-01-01T00:00:00+00:00"}] * 5
    (rd / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    q = {"run_dir": rel, "events_tail": 5}
    req = WatchRequest(runs=[q], gpus=False, progress_s=0.0, min_gap_s=0.0, delta=True)  # type: ignore[list-item]
    w = BoxWatcher(tmp_path, req)
    answer = json.loads(w.subscribe(req))
    sub, fed, _ = _sub()
    sub.runs = frozenset({rel})
    sub.chan, sub.last_seq = answer["chan"], answer["push"]
    sub.box_raw = {"disk_free_bytes": answer["disk_free_bytes"], "gpus": answer["gpus"]}
    sub.raw = {d["run_dir"]: d for d in answer["runs"]}
    t = time.monotonic() + 2.0
    atomic_write_json(rd / "status.json", RunStatus(run_id="r1", stage="s", seq=1, step=7, pid=1))
    lines = [json.loads(x) for x in w.tick(t)]
    assert len(lines) == 1 and "delta" in lines[0] and "obs" not in lines[0]
    patch = lines[0]["delta"]["runs"][0]
    assert "status" in patch and "last_events" not in patch  # not the events again
    assert not {"complete", "failed", "exit_code", "manifest_present"} & set(patch)
    sub._handle(lines[0])
    full = observe(tmp_path, ObserveRequest(runs=[q], gpus=False))  # type: ignore[list-item]
    assert len(fed) == 1
    got = fed[0].runs[0]
    assert got.model_dump(exclude={"run_dir"}) == full.runs[0].model_dump(exclude={"run_dir"})
    assert got.status is not None and got.status.step == 7 and len(got.last_events) == 5
    # A patch of a run the controller holds no copy of cannot be applied: subscribe again.
    stray = {**lines[0], "push": lines[0]["push"] + 1}
    stray["delta"] = {**stray["delta"], "runs": [{"run_dir": "runs/s/other", "exit_code": 1}]}
    sub._handle(stray)
    assert len(fed) == 1 and sub.broken
    w.close()


def _follow_text(lines: list[dict[str, Any]]) -> str:
    return "".join(x["log"]["text"] for x in lines if "log" in x)


def test_follow_streams_whole_lines_then_the_rest_and_eof(tmp_path: Path) -> None:
    rel, rd = _run_dir(tmp_path)
    log = rd / "stdout.log"
    log.write_bytes(b"l1\nl2\nl3\npar")
    req = WatchRequest(follow=[{"run_dir": rel, "lines": 2}], gpus=False, min_gap_s=0.0)  # type: ignore[list-item]
    w = BoxWatcher(tmp_path, req)
    w.subscribe(req)
    t = time.monotonic()
    first = [json.loads(x) for x in w.tick(t + 0.1)]
    assert _follow_text(first) == "l3\n"  # the last 2 lines, one of them still being written
    assert first[0]["log"]["offset"] == 6 and first[0]["log"]["next"] == 9
    assert w.tick(t + 0.2) == []  # "par" waits for its newline
    with open(log, "ab") as f:
        f.write("tial é\nl5\n".encode())
    got = [json.loads(x) for x in w.tick(t + 0.3)]
    assert _follow_text(got) == "partial é\nl5\n"
    with open(log, "ab") as f:
        f.write(b"last words")
    (rd / "exit_code").write_text("0\n")
    end = [json.loads(x) for x in w.tick(t + 0.4)]
    assert _follow_text(end) == "last words" and end[-1]["log"]["eof"] is True
    assert end[-1]["log"]["next"] == log.stat().st_size
    assert [x for x in w.tick(t + 0.5) if "log" in x] == []  # eof once
    w.close()


def test_follow_resumes_from_an_offset_and_chunks_a_flood(tmp_path: Path) -> None:
    from state.watch import LOG_CHUNK

    rel, rd = _run_dir(tmp_path)
    body = b"".join(b"%07d\n" % i for i in range(100_000))  # 800 kB: four chunks
    (rd / "stdout.log").write_bytes(body)
    req = WatchRequest(follow=[{"run_dir": rel, "offset": 8}], gpus=False, min_gap_s=0.0)  # type: ignore[list-item]
    w = BoxWatcher(tmp_path, req)
    w.subscribe(req)
    t = time.monotonic()
    out: list[dict[str, Any]] = []
    for i in range(10):
        got = [json.loads(x) for x in w.tick(t + 0.1 * (i + 1))]
        assert all(len(x["log"]["text"]) <= LOG_CHUNK for x in got if "log" in x)
        out += got
    assert _follow_text(out).encode() == body[8:]  # from the offset, every line once, in order
    assert all(x["log"]["text"].endswith("\n") for x in out if "log" in x)
    # A missing log with no exit code: nothing yet, and no error.
    req2 = WatchRequest(follow=[{"run_dir": "runs/s/none"}], gpus=False)  # type: ignore[list-item]
    w2 = BoxWatcher(tmp_path, req2)
    w2.subscribe(req2)
    assert [x for x in w2.tick(t + 5) if "log" in x] == []
    w.close()
    w2.close()


def test_run_patch_round_trips() -> None:
    from state.watch import apply_patch, run_patch

    base = {"run_dir": "r", "exit_code": None, "status": {"seq": 1, "loss": 2.0, "x": 1}, "ev": [1]}
    cases = [
        {"run_dir": "r", "exit_code": None, "status": {"seq": 2, "loss": None, "x": 1}, "ev": [1]},
        {"run_dir": "r", "exit_code": 137, "status": None, "ev": [1, 2]},
        {"run_dir": "r", "exit_code": None, "status": {"seq": 3}, "ev": [1]},  # keys gone
        {"run_dir": "r", "exit_code": None, "status": {"seq": 1, "loss": 2.0, "x": 1}, "ev": [1]},
    ]
    for new in cases:
        patch = run_patch(base, new)
        assert apply_patch(base, patch) == new
    assert run_patch(base, cases[0]) == {"run_dir": "r", "~status": {"seq": 2, "loss": None}}
    assert run_patch(base, cases[3]) == {"run_dir": "r"}
    assert apply_patch(base, {"run_dir": "r"}) == base and base["status"]["seq"] == 1
