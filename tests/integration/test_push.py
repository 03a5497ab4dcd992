"""Push (issue 14) against real OpenSSH sshd, real tmux and a real webhook receiver on loopback.

The poll cadence is set slow (30 s, safety net 60 s) wherever a test proves that a change came
by push: an alert within a few seconds can then only have been pushed.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.monitor.scheduler import Watcher
from orchestrator.monitor.statemachine import RunState
from orchestrator.targets.base import Target
from orchestrator.targets.factory import make_target
from state.phases import Phase
from tests.integration.monitor_harness import (
    REPO,
    Webhook,
    kill_session,
    prepare_target,
    signal_pid,
    start_run,
    wait_until,
    worker_pid,
    write_project,
)
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

SLOW_POLL = {
    "interval_s": 30.0,
    "jitter_s": 0.0,
    "push_poll_s": 60.0,
    "push_heartbeat_s": 0.5,
    "connect_timeout_s": 2.0,
    "command_timeout_s": 2.0,
    "unreachable_alert_after_s": 600.0,
    "pull_on_success": False,
}


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def _project(
    tmp_path: Path, target_toml: str, hook: Webhook, **monitor: object
) -> tuple[Context, Target]:
    root = write_project(
        tmp_path / "project", target_toml, hook_url=hook.url, monitor={**SLOW_POLL, **monitor}
    )
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    prepare_target(target, sync=False)  # same machine: the box's code dir links here
    return ctx, target


def _ssh(tmp_path: Path, server: SshServer) -> str:
    return server.toml("box", workdir=tmp_path / "box-work")


def _phase(ctx: Context, stage_dir: str, run_id: str) -> Phase:
    rec = ctx.store.get_run(stage_dir, run_id)
    assert rec is not None
    return rec.phase


def _agents(workdir: str) -> list[int]:
    """PIDs of `python -m state.agent --workdir WORKDIR` processes."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"state.agent" in argv and workdir.encode() in argv:
            out.append(int(d.name))
    return out


def _watch(ctx: Context, changes: list[tuple[RunState, RunState]] | None = None) -> Watcher:
    w = Watcher(
        ctx, on_change=(lambda p, n: changes.append((p, n))) if changes is not None else None
    )
    w.start()
    return w


def test_pushed_crash_is_alerted_once_and_fast(
    tmp_path: Path, sshd_server: SshServer, hook: Webhook
) -> None:
    ctx, target = _project(tmp_path, _ssh(tmp_path, sshd_server), hook)
    run = start_run(ctx, target)
    ok = start_run(ctx, target, outcome="succeed", seconds=2.0)
    pid = worker_pid(target, run)
    watcher = _watch(ctx)
    try:
        wait_until(lambda: watcher.push.active("box"), 20, what="a push subscription")
        time.sleep(0.5)
        t0 = time.monotonic()
        signal_pid(pid, signal.SIGKILL)
        got = hook.wait_for("CRASHED", run.run_id, timeout=10)
        took = time.monotonic() - t0
        assert took < 5.0, took  # polls come every 30 s here: this was pushed
        assert "SIGKILL" in got[0]["message"]
        hook.wait_for("succeeded", ok.run_id, timeout=15)
        time.sleep(1.5)  # more pushes, replays and heartbeats: nothing repeats
        assert len(hook.matching("CRASHED", run.run_id)) == 1
        assert len(hook.matching("succeeded", ok.run_id)) == 1
        assert _phase(ctx, run.stage_dir, run.run_id) is Phase.CRASHED
        assert _phase(ctx, ok.stage_dir, ok.run_id) is Phase.SUCCEEDED
        st = watcher.push.stats
        assert st.subscribed >= 1 and st.changes >= 2 and st.unsupported == 0
    finally:
        watcher.stop()
        for rec in (run, ok):
            kill_session(target, rec)
        target.close()


def test_local_target_pushes(tmp_path: Path, hook: Webhook) -> None:
    toml = f'[targets.box]\nkind = "local"\nworkdir = "{tmp_path / "local-work"}"\n'
    ctx, target = _project(tmp_path, toml, hook)
    run = start_run(ctx, target)
    pid = worker_pid(target, run)
    watcher = _watch(ctx)
    try:
        wait_until(lambda: watcher.push.active("box"), 20, what="a push subscription")
        t0 = time.monotonic()
        signal_pid(pid, signal.SIGKILL)
        hook.wait_for("CRASHED", run.run_id, timeout=10)
        assert time.monotonic() - t0 < 5.0
        time.sleep(1.0)
        assert len(hook.matching("CRASHED", run.run_id)) == 1
    finally:
        watcher.stop()
        kill_session(target, run)
        target.close()


def test_dropped_connection_loses_and_doubles_nothing(
    tmp_path: Path, fresh_sshd: SshServer, hook: Webhook
) -> None:
    ctx, target = _project(tmp_path, _ssh(tmp_path, fresh_sshd), hook)
    runs = [start_run(ctx, target, outcome="succeed", seconds=s) for s in (2.0, 2.5, 3.0)]
    crash = start_run(ctx, target)
    cpid = worker_pid(target, crash)
    target.close()  # the harness's own connection: only the watcher's remains
    watcher = _watch(ctx)
    try:
        wait_until(lambda: watcher.push.active("box"), 20, what="a push subscription")
        subscribed = watcher.push.stats.subscribed
        # Kill the sshd child serving the channel while the runs finish; kill the crash's worker
        # while the channel is down.
        killed = fresh_sshd.signal_connections(signal.SIGKILL)
        assert killed
        signal_pid(cpid, signal.SIGKILL)
        for rec in runs:
            hook.wait_for("succeeded", rec.run_id, timeout=30)
        hook.wait_for("CRASHED", crash.run_id, timeout=30)
        wait_until(
            lambda: watcher.push.active("box") and watcher.push.stats.subscribed > subscribed,
            20,
            what="subscribed again on a new connection",
        )
        # Again, mid-flight: whatever arrives twice or late, the store writes each change once.
        fresh_sshd.signal_connections(signal.SIGKILL)
        time.sleep(3.0)
        for rec in runs:
            assert len(hook.matching("succeeded", rec.run_id)) == 1
            assert _phase(ctx, rec.stage_dir, rec.run_id) is Phase.SUCCEEDED
        assert len(hook.matching("CRASHED", crash.run_id)) == 1
        history = ctx.store.query(
            "SELECT run_id, phase, COUNT(*) AS n FROM phase_history GROUP BY run_id, phase"
        )
        assert all(r["n"] == 1 for r in history), [dict(r) for r in history]
        assert watcher.push.stats.lost >= 1
    finally:
        watcher.stop()
        t = make_target(ctx, "box")
        for rec in [*runs, crash]:
            kill_session(t, rec)
        t.close()


def test_agent_without_push_is_polled(
    tmp_path: Path, sshd_server: SshServer, hook: Webhook
) -> None:
    # A box whose code predates push: its agent answers `watch` with "unknown op".
    code = tmp_path / "old-code"
    shutil.copytree(REPO / "state", code / "state", ignore=shutil.ignore_patterns("__pycache__"))
    agent_py = code / "state" / "agent.py"
    text = agent_py.read_text()
    assert text.count('req.get("op") == "watch"') == 1
    agent_py.write_text(text.replace('req.get("op") == "watch"', 'req.get("op") == "(none)"'))
    ctx, target = _project(tmp_path, _ssh(tmp_path, sshd_server), hook, interval_s=0.3)
    target.run(["rm", "-f", f"{target.workdir}/code"], timeout=10, check=True)
    target.run(["ln", "-sfn", str(code), f"{target.workdir}/code"], timeout=10, check=True)
    run = start_run(ctx, target)
    pid = worker_pid(target, run)
    watcher = _watch(ctx)
    try:
        wait_until(
            lambda: (r := ctx.store.get_run(run.stage_dir, run.run_id)) and r.last_seq,
            20,
            what="first poll",
        )
        signal_pid(pid, signal.SIGKILL)
        hook.wait_for("CRASHED", run.run_id, timeout=15)
        st = watcher.push.stats
        assert st.unsupported >= 1 and st.subscribed == 0 and not watcher.push.active("box")
        assert watcher.poller.round_trips >= 2
        time.sleep(1.0)
        assert len(hook.matching("CRASHED", run.run_id)) == 1
    finally:
        watcher.stop()
        kill_session(target, run)
        target.close()


def test_frozen_agent_is_unreachable_never_crashed(
    tmp_path: Path, fresh_sshd: SshServer, hook: Webhook
) -> None:
    # Polls every second once push is lost (the fallback cadence), every 60 s while it works.
    ctx, target = _project(
        tmp_path,
        _ssh(tmp_path, fresh_sshd),
        hook,
        interval_s=1.0,
        command_timeout_s=1.5,
        connect_timeout_s=1.5,
    )
    run = start_run(ctx, target)
    target.close()
    changes: list[tuple[RunState, RunState]] = []
    watcher = _watch(ctx, changes)
    frozen: list[int] = []
    try:
        wait_until(
            lambda: (
                watcher.push.active("box")
                and watcher.push.stats.beats >= 2
                and watcher._polling.get("box") == 60.0
            ),
            20,
            what="a push subscription, heartbeats, the poll job slowed to its safety net",
        )
        frozen = _agents(str(tmp_path / "box-work"))
        assert frozen
        changes.clear()  # (a slow first connect on a loaded machine may have been an outage)
        sub = watcher.push._subs["box"]
        t0 = time.monotonic()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        # the silence counts from the last line received, which can be up to a heartbeat (more
        # on a loaded machine) before the freeze; none arrives after it
        last_line = sub.last_line
        # Heartbeats stop: after the silence rule a full poll goes out, gets no answer within
        # its deadline, and the run is marked unreachable (not crashed).
        wait_until(
            lambda: any(n.unreachable_since is not None for _, n in changes),
            20,
            what="unreachable overlay",
        )
        seen = time.monotonic()
        took = seen - t0
        hb = ctx.config.monitor_for("box").push_heartbeat_s
        # never before the silence rule: not paged while the box may still be talking
        assert seen - last_line >= watcher.push.silence_s("box"), (seen - last_line, took)
        assert took < 2.5 * hb + 1.0 + 3 * 1.5 + 5.0, took
        assert _phase(ctx, run.stage_dir, run.run_id) is Phase.RUNNING
        assert watcher.push.stats.silences >= 1
        # A new connection starts a new agent: the target answers and pushes again.
        wait_until(lambda: watcher.push.active("box"), 30, what="push again")
        wait_until(
            lambda: (
                (r := ctx.store.get_run(run.stage_dir, run.run_id)) and r.unreachable_since is None
            ),
            20,
            what="reachable again",
        )
        assert _phase(ctx, run.stage_dir, run.run_id) is Phase.RUNNING
        assert hook.matching("CRASHED") == []
    finally:
        for pid in frozen:
            signal_pid(pid, signal.SIGCONT)
        watcher.stop()
        t = make_target(ctx, "box")
        kill_session(t, run)
        t.close()
