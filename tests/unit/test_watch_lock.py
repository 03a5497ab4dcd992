"""The watcher lock: one watcher per state dir, visible to `orch status`, released when the
holder dies (even by SIGKILL), and a refusal that names who holds it (`orch watch` or a
dashboard) and what to do."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.monitor.lock import (
    WatcherBusyError,
    WatcherLock,
    busy_message,
    describe_holder,
    watcher_info,
)
from orchestrator.monitor.refresh import watcher_running


def test_lock_is_exclusive_and_visible(tmp_path: Path) -> None:
    ctx = Context(cwd=tmp_path, state_dir=str(tmp_path / "state"))
    assert not watcher_running(ctx)
    with WatcherLock(ctx.state_dir):
        assert watcher_running(ctx)
        assert watcher_info(ctx)["pid"] > 0
        with pytest.raises(WatcherBusyError, match="already watching"):
            WatcherLock(ctx.state_dir).acquire()
    assert not watcher_running(ctx)
    assert watcher_info(ctx) == {}


def test_lock_dies_with_its_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = (
        "import sys, time; from pathlib import Path; from orchestrator.monitor.lock import WatcherLock; "
        f"lk = WatcherLock(Path({str(state)!r})); lk.acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        ctx = Context(cwd=tmp_path, state_dir=str(state))
        assert watcher_running(ctx)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not watcher_running(ctx)  # no stale lock after kill -9
        with WatcherLock(state):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()


REPO = Path(__file__).resolve().parents[2]


def _hold(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    """A real second process that takes the lock (its code prints `held` once it has it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _orch_watch(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "watch"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"},
    )


def test_orch_watch_refusal_names_a_running_dashboard(tmp_path: Path) -> None:
    # The dashboard's own in-process monitor (APScheduler watcher and all) holds the lock.
    before = datetime.now()
    dashboard = _hold(
        "import time; from orchestrator.context import Context; "
        "from orchestrator.dashboard.inprocess import InProcessMonitor; "
        "m = InProcessMonitor(Context()); m.ensure(); "
        "assert m.running, m.error; print('held', flush=True); time.sleep(60)",
        tmp_path,
    )
    try:
        res = _orch_watch(tmp_path)
    finally:
        _stop(dashboard)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and res.stdout == "", res.stdout + res.stderr
    assert len(lines) == 1, res.stderr  # one line
    line = lines[0]
    assert line.startswith("error: a dashboard (pid ") and f"pid {dashboard.pid}," in line
    started = re.search(r"since (\d\d:\d\d)\)", line)
    minutes = {(before + timedelta(minutes=m)).strftime("%H:%M") for m in range(3)}
    assert started and started.group(1) in minutes, line  # local time, when it took the lock
    assert "is already watching" in line
    assert line.endswith("quit it (q) or use it instead"), line


def test_refusal_names_an_orch_watch(tmp_path: Path) -> None:
    state = Path(os.environ["ORCH_STATE_DIR"])
    watcher = _hold(
        "import time; from pathlib import Path; from orchestrator.monitor.lock import WatcherLock; "
        f"lk = WatcherLock(Path({str(state)!r}), holder='watch'); lk.acquire(); print('held', flush=True); "
        "time.sleep(60)",
        tmp_path,
    )
    try:
        with pytest.raises(WatcherBusyError) as err:
            WatcherLock(state, holder="dashboard").acquire()
    finally:
        _stop(watcher)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"an `orch watch` (pid {watcher.pid}, since ")
    assert "orch status" in msg and err.value.holder["holder"] == "watch"
    assert err.value.who.startswith("an `orch watch` (pid ")
    with WatcherLock(state):  # its holder is gone: free again
        pass


def test_holder_in_words() -> None:
    now = datetime(2026, 3, 4, 22, 30, tzinfo=timezone.utc)
    started = now.astimezone().replace(hour=22, minute=1)
    info = {"holder": "dashboard", "pid": 1234, "host": socket.gethostname()}
    assert (
        describe_holder({**info, "started_at": started.isoformat()}, now=now)
        == "a dashboard (pid 1234, since 22:01)"
    )
    yesterday = (started - timedelta(days=1)).isoformat()
    assert describe_holder({**info, "started_at": yesterday}, now=now).endswith(
        f"since {(started - timedelta(days=1)).strftime('%Y-%m-%d')} 22:01)"
    )
    elsewhere = {"holder": "watch", "pid": 7, "host": "laptop-2"}
    assert describe_holder(elsewhere) == "an `orch watch` (pid 7, on laptop-2)"
    assert describe_holder({}) == "another watcher"
    msg = busy_message({}, Path("/p/.orch"))
    assert (
        msg
        == "another watcher is already watching /p/.orch; stop it first, or just read `orch status`"
    )
