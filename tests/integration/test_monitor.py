"""The monitor against real OpenSSH sshd, real tmux and a real webhook receiver on 127.0.0.1.

Worker-like processes (tests/monitor_worker.py, beating status.json every 0.2 s) run under tmux
through the launcher's own wrapper, over ssh; alerts go out through Apprise's `json://` to a
local HTTP server. Intervals are short so the whole file stays well under a minute and a half.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.monitor.scheduler import Watcher
from orchestrator.targets.base import Target
from orchestrator.targets.factory import make_target
from state import names
from state.models import Manifest
from state.phases import Phase
from state.protocol import read_model, verify_manifest
from tests.integration.monitor_harness import (
    Webhook,
    kill_session,
    orch_argv,
    prepare_target,
    signal_pid,
    start_run,
    wait_until,
    worker_pid,
    write_project,
)
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

FAST = {
    "interval_s": 0.3,
    "jitter_s": 0.1,
    "connect_timeout_s": 2.0,
    "command_timeout_s": 2.0,
    "unreachable_alert_after_s": 2.0,
    "stop_on_timeout": True,
    "pull_on_success": True,
}


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def _project(
    tmp_path: Path, server: SshServer, hook: Webhook, **monitor: object
) -> tuple[Context, Target]:
    root = write_project(
        tmp_path / "project",
        server.toml("box", workdir=tmp_path / "box-work"),
        hook_url=hook.url,
        monitor={**FAST, **monitor},
    )
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    # Same machine: the box's code dir links to this checkout (code sync has its own tests).
    prepare_target(target, sync=False)
    return ctx, target


def _phase(ctx: Context, key: str) -> Phase:
    stage_dir, run_id = key.split("/")
    rec = ctx.store.get_run(stage_dir, run_id)
    assert rec is not None
    return rec.phase


def _start_watcher(root: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        orch_argv("watch"), cwd=root, stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )


def test_watch_end_to_end_with_restart(
    tmp_path: Path, sshd_server: SshServer, hook: Webhook
) -> None:
    ctx, target = _project(tmp_path, sshd_server, hook)
    root = ctx.project_root
    log = tmp_path / "watch.log"
    crash = start_run(ctx, target)
    hang = start_run(ctx, target, stale_after_s=3.0)
    slow = start_run(ctx, target, timeout_s=4.0)
    ok = start_run(ctx, target, outcome="succeed", seconds=1.5)
    watcher = _start_watcher(root, log)
    try:
        # kill -9 of the worker: exactly one `crashed` alert.
        signal_pid(worker_pid(target, crash), signal.SIGKILL)
        got = hook.wait_for("CRASHED", crash.run_id)
        assert "SIGKILL" in got[0]["message"] and f"orch logs {crash.key}" in got[0]["message"]

        # SIGSTOP: `hung` once the stale limit passes; SIGCONT: back to running.
        hpid = worker_pid(target, hang)
        signal_pid(hpid, signal.SIGSTOP)
        hook.wait_for("HUNG", hang.run_id)
        assert _phase(ctx, hang.key) is Phase.HUNG
        signal_pid(hpid, signal.SIGCONT)
        wait_until(lambda: _phase(ctx, hang.key) is Phase.RUNNING, 15, what="hung run recovering")

        # Past its timeout: `timed_out`, and stopped (stop_on_timeout) -> the wrapper records 129.
        hook.wait_for("TIMED OUT", slow.run_id)
        exit_file = Path(target.workdir) / slow.run_dir / names.EXIT_CODE
        wait_until(exit_file.exists, 15, what="timed-out run stopped")
        assert _phase(ctx, slow.key) is Phase.TIMED_OUT

        # Success: alert, then pulled into the project's runs/ and verified against the manifest.
        hook.wait_for("succeeded", ok.run_id)
        rec = wait_until(
            lambda: (r := ctx.store.get_run(ok.stage_dir, ok.run_id)) and r.pulled_at and r,
            30,
            what="pull after success",
        )
        local = root / "runs" / ok.stage_dir / ok.run_id
        manifest = read_model(local / names.MANIFEST, Manifest).value
        assert manifest is not None and rec.phase is Phase.SUCCEEDED
        assert verify_manifest(local, manifest) == len(manifest.files) >= 2

        # The webhook goes down: a failure is recorded in the store, not delivered; then the
        # watcher is killed, and a crash happens while nobody watches.
        hook.fail_with = 500
        failing = start_run(ctx, target, outcome="fail", seconds=0.5)
        row = wait_until(
            lambda: [
                a
                for a in ctx.store.recent_alerts(50)
                if a["run_id"] == failing.run_id and a["attempts"] >= 1
            ],
            20,
            what="failed alert attempted",
        )[0]
        assert row["delivered_at"] is None and row["last_error"]  # recorded, to be retried
        late = start_run(ctx, target)
        lpid = worker_pid(target, late)
        wait_until(
            lambda: (r := ctx.store.get_run(late.stage_dir, late.run_id)) and r.last_seq,
            15,
            what="watcher saw the late run",
        )
        watcher.kill()
        watcher.wait(10)
        signal_pid(lpid, signal.SIGKILL)
        time.sleep(0.5)
        hook.fail_with = None
        watcher = _start_watcher(root, log)
        hook.wait_for("FAILED", failing.run_id)  # retried on restart: not lost
        hook.wait_for("CRASHED", late.run_id)  # happened while no watcher ran: not missed
        time.sleep(1.0)  # a few more polls: nothing may repeat
        assert len(hook.matching("CRASHED", crash.run_id)) == 1
        assert len(hook.matching("FAILED", failing.run_id)) == 1
        assert len(hook.matching("CRASHED", late.run_id)) == 1
        assert len(hook.matching("HUNG", hang.run_id)) == 1
        assert len(hook.matching("synthetic failure: bad batch")) == 1
        assert _phase(ctx, failing.key) is Phase.FAILED
        watcher.terminate()
        assert watcher.wait(20) == 0

        # `orch watch --once`: exit 0 while every active run is fine, 1 once one is bad.
        res = subprocess.run(orch_argv("watch", "--once"), cwd=root, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        signal_pid(hpid, signal.SIGKILL)
        wait_until(
            (Path(target.workdir) / hang.run_dir / names.EXIT_CODE).exists, 10, what="exit code"
        )
        res = subprocess.run(orch_argv("watch", "--once"), cwd=root, capture_output=True, text=True)
        assert res.returncode == 1, res.stdout + res.stderr
        assert f"{hang.key} on box: crashed" in res.stdout
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)
        for rec in ctx.store.list_runs(active_only=True):
            kill_session(target, rec)
        target.close()
    text = log.read_text()
    assert "running -> crashed" in text and "running -> hung" in text
    assert hook.url.split("//")[1] not in text  # the alert URL never reaches the output


def test_unreachable_is_never_a_crash(tmp_path: Path, fresh_sshd: SshServer, hook: Webhook) -> None:
    ctx, target = _project(tmp_path, fresh_sshd, hook, connect_timeout_s=1.0, command_timeout_s=1.5)
    run = start_run(ctx, target)
    pid = worker_pid(target, run)
    watcher = Watcher(ctx)
    watcher.start()
    listener = fresh_sshd.proc.pid if fresh_sshd.proc else 0
    try:
        wait_until(
            lambda: (r := ctx.store.get_run(run.stage_dir, run.run_id)) and r.last_seq,
            15,
            what="first poll",
        )
        # A frozen connection (its sshd child SIGSTOPped; the box itself fine): the poll's
        # deadline passes, the connection is dropped and rebuilt, polling goes on.
        frozen = set(fresh_sshd.signal_connections(signal.SIGSTOP))
        assert frozen
        seq0 = ctx.store.get_run(run.stage_dir, run.run_id).last_seq  # type: ignore[union-attr]
        wait_until(lambda: set(fresh_sshd.connection_pids()) - frozen, 20, what="a new connection")
        wait_until(
            lambda: ctx.store.get_run(run.stage_dir, run.run_id).last_seq != seq0,
            20,  # type: ignore[union-attr]
            what="polls on the new connection",
        )
        for child in frozen:
            signal_pid(child, signal.SIGCONT)
        assert _phase(ctx, run.key) is Phase.RUNNING and hook.matching("CRASHED") == []
        # (On a slow machine the frozen connection may itself have been a paged outage, with
        # its own "reachable again": count from here, once those are delivered.)
        wait_until(
            lambda: all(a["delivered_at"] for a in ctx.store.recent_alerts(50)),
            15,
            what="alerts so far delivered",
        )
        back0 = len(hook.matching("reachable again"))
        # A frozen box: the connection child and the listener stop answering (SIGSTOP).
        fresh_sshd.signal_connections(signal.SIGSTOP)
        signal_pid(listener, signal.SIGSTOP)
        wait_until(
            lambda: ctx.store.get_run(run.stage_dir, run.run_id).unreachable_since,
            15,  # type: ignore[union-attr]
            what="unreachable overlay",
        )
        hook.wait_for("unreachable", "box", timeout=20)
        assert _phase(ctx, run.key) is Phase.RUNNING
        assert hook.matching("CRASHED") == []
        # It answers again: back to running, overlay cleared, still no crash.
        signal_pid(listener, signal.SIGCONT)
        fresh_sshd.signal_connections(signal.SIGCONT)
        wait_until(
            lambda: ctx.store.get_run(run.stage_dir, run.run_id).unreachable_since is None,
            30,  # type: ignore[union-attr]
            what="recovery",
        )
        assert _phase(ctx, run.key) is Phase.RUNNING
        # The researcher paged "unreachable" is told it is back: one alert for the target,
        # saying how long it was silent; still no crash.
        back = hook.wait_for("reachable again", "box", timeout=15, count=back0 + 1)[-1]
        assert back["title"] == "orch: target box reachable again" and back["type"] == "info"
        assert "answers again after" in back["message"] and run.key in back["message"]
        time.sleep(1.0)  # a few more polls: nothing repeats
        assert len(hook.matching("reachable again")) == back0 + 1
        assert hook.matching("CRASHED") == []
        # One alert each way for the outage, keyed by it: a restarted watcher derives the same.
        keys = {a["kind"]: a["dedup_key"] for a in reversed(ctx.store.recent_alerts(50))}
        assert keys["reachable"] == keys["unreachable"].replace("/unreachable/", "/reachable/")
        # The box goes away entirely and the job dies meanwhile: once the box answers again
        # the crash is seen and reported, exactly once (and no "reachable again" for that
        # outage: the crash alert already says the box answers).
        fresh_sshd.stop()
        time.sleep(1.5)
        signal_pid(pid, signal.SIGKILL)
        assert _phase(ctx, run.key) is Phase.RUNNING
        fresh_sshd.start()
        hook.wait_for("CRASHED", run.run_id, timeout=40)
        assert _phase(ctx, run.key) is Phase.CRASHED
        time.sleep(1.0)
        assert len(hook.matching("CRASHED")) == 1
        assert len(hook.matching("unreachable")) >= 1  # the outage while sshd was down is a new one
        assert len(hook.matching("reachable again")) == back0 + 1
    finally:
        signal_pid(listener, signal.SIGCONT)
        fresh_sshd.signal_connections(signal.SIGCONT)
        watcher.stop()
        kill_session(target, run)
        target.close()
