"""Fault campaign: the box's sshd fails under a real `orch watch` (a private OpenSSH sshd per
test, real tmux, a real webhook): the listener killed (open connections live on, new ones are
refused), the connection child serving orch frozen then killed, sshd down for 60 s. A box that
does not answer is `unreachable`, never `crashed`; each run's final state is right once it
answers again."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.context import Context
from state.models import RunRecord
from state.phases import Phase
from tests.faults.campaign import Scenario
from tests.faults.test_worker_faults import _seq, _stop, _watch
from tests.integration.monitor_harness import (
    Webhook,
    kill_session,
    start_run,
    wait_until,
)
from tests.integration.test_monitor import _project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def _phase(ctx: Context, rec: RunRecord) -> Phase:
    got = ctx.store.get_run(rec.stage_dir, rec.run_id)
    assert got is not None
    return got.phase


def _moves(ctx: Context, rec: RunRecord, timeout: float, what: str) -> None:
    """Wait until the stored seq of `rec` changes (a poll that reached the box)."""
    seq0 = _seq(ctx, rec.stage_dir, rec.run_id)
    wait_until(lambda: _seq(ctx, rec.stage_dir, rec.run_id) != seq0, timeout, what=what)


def _refused(server: SshServer) -> bool:
    try:
        with socket.create_connection((server.host, server.port), timeout=2):
            return False
    except OSError:
        return True


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def test_sshd_listener_killed(tmp_path: Path, fresh_sshd: SshServer, hook: Webhook) -> None:
    sc = Scenario(
        name="sshd listener killed",
        injected="kill -9 of the sshd listener (its connection children live on) for 8 s, while "
        "one run goes on and another succeeds",
        report="nothing to page: polls go on over the open connection (seq moves), new "
        "connections are refused; the success is pulled once the listener is back",
        within_s=60,
        survives="the open connection and the running run; the succeeded run's pull (retried "
        "every `pull_retry_s` = 1 s here; 60 s by default)",
    )
    ctx, target = _project(
        tmp_path, fresh_sshd, hook, unreachable_alert_after_s=30.0, pull_retry_s=1.0
    )
    going = start_run(ctx, target)
    ok = start_run(ctx, target, outcome="succeed", seconds=4.0)
    watcher = _watch(ctx.project_root, tmp_path / "watch.log")
    orphans: set[int] = set()
    try:
        wait_until(lambda: _seq(ctx, going.stage_dir, going.run_id), 30, what="first poll")
        orphans = set(fresh_sshd.connection_pids())
        assert fresh_sshd.proc is not None and orphans
        sc.start()
        fresh_sshd.proc.kill()
        fresh_sshd.proc.wait(10)
        fresh_sshd.proc = None
        assert _refused(fresh_sshd)
        _moves(ctx, going, sc.within_s, "polls over the open connection")
        sc.detected()
        hook.wait_for("succeeded", ok.run_id, timeout=60)
        time.sleep(max(0.0, 8.0 - (time.monotonic() - sc._t0)))
        assert _refused(fresh_sshd)
        assert ctx.store.get_run(ok.stage_dir, ok.run_id).pulled_at is None  # type: ignore[union-attr]
        t_back = time.monotonic()
        fresh_sshd.start()
        wait_until(
            lambda: ctx.store.get_run(ok.stage_dir, ok.run_id).pulled_at,  # type: ignore[union-attr]
            90,
            what="the pull once the listener is back",
        )
        sc.note(f"pulled {time.monotonic() - t_back:.1f} s after the listener came back")
        _moves(ctx, going, 30, "polls after the restart")
        assert _phase(ctx, going) is Phase.RUNNING and _phase(ctx, ok) is Phase.SUCCEEDED
        assert hook.matching("CRASHED") == [] and hook.matching("unreachable") == []
        sc.note(f"{len(hook.posts)} alert(s): {sorted(set(hook.titles()))}")
    finally:
        _stop(watcher)
        _kill(orphans)
        for rec in (going, ok):
            kill_session(target, rec)
        target.close()
        ctx.close()
    sc.record()


def test_sshd_connection_child_frozen_then_killed(
    tmp_path: Path, fresh_sshd: SshServer, hook: Webhook
) -> None:
    sc = Scenario(
        name="sshd connection child frozen, then killed",
        injected="SIGSTOP of the sshd child serving orch's connection, SIGKILL of it 5 s later",
        report="the poll's deadline passes, a new connection is made and polls go on; "
        "no `unreachable` (limit 30 s), no `crashed`",
        within_s=60,
        survives="the run (running, seq moving); the watcher (one process, no restart)",
    )
    ctx, target = _project(
        tmp_path,
        fresh_sshd,
        hook,
        connect_timeout_s=1.0,
        command_timeout_s=1.5,
        unreachable_alert_after_s=30.0,
    )
    run = start_run(ctx, target)
    watcher = _watch(ctx.project_root, tmp_path / "watch.log")
    frozen: set[int] = set()
    try:
        wait_until(lambda: _seq(ctx, run.stage_dir, run.run_id), 30, what="first poll")
        frozen = set(fresh_sshd.connection_pids())
        assert frozen
        sc.start()
        fresh_sshd.signal_connections(signal.SIGSTOP)
        wait_until(lambda: set(fresh_sshd.connection_pids()) - frozen, 40, what="a new connection")
        _moves(ctx, run, sc.within_s, "polls on the new connection")
        sc.detected()
        time.sleep(max(0.0, 5.0 - (time.monotonic() - sc._t0)))
        _kill(frozen)
        _moves(ctx, run, 30, "polls after the frozen child was killed")
        time.sleep(2.0)
        _moves(ctx, run, 30, "polls go on")
        assert watcher.poll() is None
        assert _phase(ctx, run) is Phase.RUNNING
        assert hook.posts == [], hook.titles()
        sc.note(f"{len(set(fresh_sshd.connection_pids()))} live connection(s) afterwards")
    finally:
        _kill(frozen)
        _stop(watcher)
        kill_session(target, run)
        target.close()
        ctx.close()
    sc.record()


def test_sshd_down_60_s(tmp_path: Path, fresh_sshd: SshServer, hook: Webhook) -> None:
    sc = Scenario(
        name="sshd down 60 s",
        injected="sshd stopped (listener and every connection) for 60 s while one run goes on "
        "and another succeeds meanwhile (unreachable limit 2 s)",
        report="one `unreachable` page, then one `reachable again`; never `crashed`",
        within_s=60,
        survives="both runs: the running one still running, the other `succeeded` and pulled "
        "once sshd is back",
    )
    ctx, target = _project(tmp_path, fresh_sshd, hook, connect_timeout_s=1.0, command_timeout_s=1.5)
    going = start_run(ctx, target)
    ok = start_run(ctx, target, outcome="succeed", seconds=6.0)
    watcher = _watch(ctx.project_root, tmp_path / "watch.log")
    try:
        for rec in (going, ok):
            wait_until(lambda r=rec: _seq(ctx, r.stage_dir, r.run_id), 30, what="first poll")
        sc.start()
        fresh_sshd.stop()
        hook.wait_for("unreachable", "box", timeout=sc.within_s)
        sc.detected()
        assert _phase(ctx, going) is Phase.RUNNING and _phase(ctx, ok) is Phase.RUNNING
        time.sleep(max(0.0, 60.0 - (time.monotonic() - sc._t0)))
        assert hook.matching("CRASHED") == [] and hook.matching("succeeded") == []
        assert len(hook.matching("unreachable")) == 1
        t_back = time.monotonic()
        fresh_sshd.start()
        hook.wait_for("reachable again", "box", timeout=60)
        hook.wait_for("succeeded", ok.run_id, timeout=60)
        sc.note(f"`reachable again` and the success {time.monotonic() - t_back:.1f} s after sshd")
        wait_until(
            lambda: ctx.store.get_run(ok.stage_dir, ok.run_id).pulled_at,  # type: ignore[union-attr]
            60,
            what="the success pulled",
        )
        _moves(ctx, going, 30, "polls after the outage")
        time.sleep(1.5)
        assert _phase(ctx, going) is Phase.RUNNING and _phase(ctx, ok) is Phase.SUCCEEDED
        assert hook.matching("CRASHED") == []
        assert len(hook.matching("unreachable")) == 1
        assert len(hook.matching("reachable again")) == 1
        assert len(hook.matching("succeeded", ok.run_id)) == 1
    finally:
        _stop(watcher)
        if fresh_sshd.proc is None:
            fresh_sshd.start()
        for rec in (going, ok):
            kill_session(target, rec)
        target.close()
        ctx.close()
    sc.record()
