"""The watcher lock: one `orch watch` per state dir, visible to `orch status`, released when
the holder dies (even by SIGKILL)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.monitor.lock import WatcherBusyError, WatcherLock, watcher_info
from orchestrator.monitor.refresh import watcher_running


def test_lock_is_exclusive_and_visible(tmp_path: Path) -> None:
    ctx = Context(cwd=tmp_path, state_dir=str(tmp_path / "state"))
    assert not watcher_running(ctx)
    with WatcherLock(ctx.state_dir):
        assert watcher_running(ctx)
        assert watcher_info(ctx)["pid"] > 0
        with pytest.raises(WatcherBusyError, match="already running"):
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
