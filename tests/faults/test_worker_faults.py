"""Fault campaign: the worker dies or freezes under a real `orch watch` process, on a real sshd,
tmux and a real webhook receiver (tests/monitor_worker.py beats status.json every 0.2 s through
the launcher's own wrapper, as the worker does). Bounds are generous on purpose: they say what
a slow CI box must still meet, the measured times go to docs/RELIABILITY.md."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.context import Context
from state import names
from state.phases import Phase
from tests.faults.campaign import Scenario
from tests.integration.monitor_harness import (
    Webhook,
    kill_session,
    orch_argv,
    signal_pid,
    start_run,
    wait_until,
    worker_pid,
)
from tests.integration.test_monitor import _project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def _watch(root: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        orch_argv("watch"), cwd=root, stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _seq(ctx: Context, stage_dir: str, run_id: str) -> int | None:
    rec = ctx.store.get_run(stage_dir, run_id)
    return rec.last_seq if rec is not None else None


def test_worker_sigkill(tmp_path: Path, sshd_server: SshServer, hook: Webhook) -> None:
    sc = Scenario(
        name="worker SIGKILL",
        injected="kill -9 of the worker of one of two runs on a box",
        report="one `crashed` alert naming SIGKILL (exit 137) and the logs command",
        within_s=60,
        survives="the other run (still running, seq moving); the killed run's files on the box",
    )
    ctx, target = _project(tmp_path, sshd_server, hook)
    victim, bystander = start_run(ctx, target), start_run(ctx, target)
    watcher = _watch(ctx.project_root, tmp_path / "watch.log")
    try:
        for r in (victim, bystander):
            wait_until(lambda r=r: _seq(ctx, r.stage_dir, r.run_id), 30, what="first poll")
        sc.start()
        signal_pid(worker_pid(target, victim), signal.SIGKILL)
        [alert] = hook.wait_for("CRASHED", victim.run_id, timeout=sc.within_s)
        sc.detected()
        msg = str(alert["message"])
        assert "SIGKILL" in msg and "exit 137" in msg and f"orch logs {victim.key}" in msg
        seq0 = _seq(ctx, bystander.stage_dir, bystander.run_id)
        wait_until(
            lambda: _seq(ctx, bystander.stage_dir, bystander.run_id) != seq0, 30, what="bystander"
        )
        time.sleep(2.0)  # several more polls: nothing repeats
        assert len(hook.matching("CRASHED", victim.run_id)) == 1
        assert hook.matching(bystander.run_id) == []
        assert ctx.store.get_run(victim.stage_dir, victim.run_id).phase is Phase.CRASHED  # type: ignore[union-attr]
        assert ctx.store.get_run(bystander.stage_dir, bystander.run_id).phase is Phase.RUNNING  # type: ignore[union-attr]
        box = Path(target.workdir) / victim.run_dir
        assert (box / names.EXIT_CODE).read_text().strip() == "137"
        assert (box / names.STATUS).stat().st_size > 0
        sc.note(f"{len(hook.posts)} alert(s) in all")
    finally:
        _stop(watcher)
        for rec in (victim, bystander):
            kill_session(target, rec)
        target.close()
        ctx.close()
    sc.record()


def test_worker_sigstop_then_sigcont(tmp_path: Path, sshd_server: SshServer, hook: Webhook) -> None:
    sc = Scenario(
        name="worker SIGSTOP, then SIGCONT",
        injected="SIGSTOP of the worker (stale limit 3 s), SIGCONT after the alert",
        report="one `hung` alert; back to `running` once seq moves, no `crashed`",
        within_s=60,
        survives="the process, which carries on where it stopped",
    )
    ctx, target = _project(tmp_path, sshd_server, hook)
    run = start_run(ctx, target, stale_after_s=3.0)
    watcher = _watch(ctx.project_root, tmp_path / "watch.log")
    try:
        wait_until(lambda: _seq(ctx, run.stage_dir, run.run_id), 30, what="first poll")
        pid = worker_pid(target, run)
        sc.start()
        signal_pid(pid, signal.SIGSTOP)
        hook.wait_for("HUNG", run.run_id, timeout=sc.within_s)
        sc.detected()
        assert ctx.store.get_run(run.stage_dir, run.run_id).phase is Phase.HUNG  # type: ignore[union-attr]
        t_cont = time.monotonic()
        signal_pid(pid, signal.SIGCONT)
        wait_until(
            lambda: ctx.store.get_run(run.stage_dir, run.run_id).phase is Phase.RUNNING,  # type: ignore[union-attr]
            60,
            what="recovery after SIGCONT",
        )
        sc.note(f"running again {time.monotonic() - t_cont:.1f} s after SIGCONT")
        time.sleep(2.0)
        assert len(hook.matching("HUNG", run.run_id)) == 1
        assert hook.matching("CRASHED") == []
        assert not (Path(target.workdir) / run.run_dir / names.EXIT_CODE).exists()
    finally:
        _stop(watcher)
        kill_session(target, run)
        target.close()
        ctx.close()
    sc.record()
