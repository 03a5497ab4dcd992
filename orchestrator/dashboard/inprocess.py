"""The monitor inside `orch dashboard` / `orch status` when no `orch watch` is running."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rich.console import Console

from state.errors import OrchError

if TYPE_CHECKING:
    from orchestrator.context import Context


class InProcessMonitor:
    """The monitor engineer's `Watcher` (APScheduler poll jobs, alert delivery, completion
    actions), run inside the dashboard while no `orch watch` holds the state dir's lock.

    It takes the same lock, so `orch status` elsewhere knows the store is being kept fresh and a
    second watcher cannot start beside it. `ensure()` is cheap and is called now and then: if an
    `orch watch` ends while the dashboard is open, the dashboard takes over.
    """

    RETRY_S = 10.0

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.error = ""
        self.label = "starting"
        self._watcher: Any = None
        self._lock: Any = None
        self._tried_at = -1e9

    @property
    def running(self) -> bool:
        return self._watcher is not None

    def ensure(self) -> None:
        if self._watcher is not None or time.monotonic() - self._tried_at < self.RETRY_S:
            return
        self._tried_at = time.monotonic()
        # lazy, for start-up time: only this path needs orchestrator.monitor.lock
        from orchestrator.monitor.lock import WatcherBusyError, WatcherLock
        from orchestrator.monitor.scheduler import Watcher

        # holder="dashboard": a refused `orch watch` then says a dashboard holds the lock.
        lock = WatcherLock(self.ctx.state_dir, holder="dashboard")
        try:
            lock.acquire(holder_wait_s=0.0)  # retried every RETRY_S: never stall the screen
        except WatcherBusyError as exc:
            self.label = (
                "orch watch" if exc.holder.get("holder") != "dashboard" else "other dashboard"
            )
            return
        try:
            watcher = Watcher(self.ctx, lock=lock, echo=False)
            watcher.start()
        except Exception as exc:  # shown in the footer; the view goes on from the store
            lock.release()
            self.label, self.error = "off", f"monitor did not start: {exc}"
            return
        self._watcher, self._lock, self.label = watcher, lock, "in-process"

    def poke(self) -> bool:
        """Run every poll job now (False when another process does the polling)."""
        if self._watcher is None:
            return False
        now = datetime.now(timezone.utc)
        for target in list(self._watcher.active_targets):
            with contextlib.suppress(Exception):  # the job may have just been removed
                self._watcher.scheduler.modify_job(f"poll:{target}", next_run_time=now)
        return True

    def stop(self) -> None:
        if self._watcher is not None:
            try:
                self._watcher.stop()
            finally:
                self._lock.release()
                self._watcher = self._lock = None


@contextlib.contextmanager
def quiet_logs(sink: Callable[[str], None]) -> Iterator[None]:
    """Route the monitor's and APScheduler's log records to `sink` (the footer) while the
    screen is ours: a stray line on stderr would tear the full-screen view."""
    handler = _SinkHandler(sink)
    loggers = [logging.getLogger(n) for n in ("orch", "apscheduler")]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    try:
        yield
    finally:
        for lg, prop in saved:
            lg.removeHandler(handler)
            lg.propagate = prop


class _SinkHandler(logging.Handler):
    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.sink(f"{record.name}: {record.getMessage()}")


def monitor_label(ctx: Context) -> str:
    """Who keeps the store fresh: `orch watch`, this process, or nobody."""
    try:
        # lazy, for start-up time: only this path needs orchestrator.monitor.refresh
        from orchestrator.monitor.refresh import watcher_running
    except ImportError:
        return "unavailable"
    try:
        return "orch watch" if watcher_running(ctx) else ""
    except Exception:
        return ""


def refresh_now(ctx: Context, err: Console) -> bool:
    """One `refresh_once` of every active run; a failure is one yellow line, not an exit."""
    try:
        # lazy, for start-up time: only this path needs orchestrator.monitor.refresh
        from orchestrator.monitor.refresh import refresh_once
    except ImportError:
        err.print("[yellow]warning:[/] the monitor is not installed; showing the store as it is")
        return False
    if not ctx.store.list_runs(active_only=True, limit=1):
        return True
    try:
        refresh_once(ctx)
    except OrchError as exc:
        err.print(
            f"[yellow]warning:[/] refresh failed, showing the store as it is: {exc}", soft_wrap=True
        )
        return False
    return True
