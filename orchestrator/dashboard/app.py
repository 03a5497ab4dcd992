"""`orch dashboard`: a full-screen `rich.live.Live` loop over the store.

The loop only gathers a snapshot and calls `render.render`; everything it shows comes from the
store. When no `orch watch` is running it runs the monitor itself (the monitor's `Watcher`:
APScheduler poll jobs, alert delivery, completion actions, under the same lock `orch watch`
takes), so one command is enough. Keys are read in cbreak mode on a TTY and the terminal is
restored on every exit path; without a TTY on stdout it prints one static frame and exits.

    app.py        the loop, selection, background pull / log-tail jobs
    inprocess.py  the monitor run inside the dashboard, log capture, one-shot refresh
    keys.py       cbreak mode and key parsing
    snapshot.py   store -> Snapshot (the only store reads)
    render.py     Snapshot -> rich renderable (pure)
    table.py      fixed-width, never-wrapping tables (pure)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live

from orchestrator.dashboard.inprocess import (
    InProcessMonitor,
    monitor_label,
    quiet_logs,
    refresh_now,
)
from orchestrator.dashboard.keys import cbreak, read_keys
from orchestrator.dashboard.render import render
from orchestrator.dashboard.snapshot import KEEP_TERMINAL_S, RunView, Snapshot, gather, utcnow
from orchestrator.pull import pull_run
from orchestrator.targets.factory import make_target
from state import names
from state.errors import OrchError
from state.store import Store

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.targets.base import Target


#: Re-read the store at least this often even when nothing signalled a change.
REGATHER_S = 5.0
LOG_TAIL_LINES = 200
LOG_REFRESH_S = 2.0


# -- background jobs (pull, log tail) --------------------------------------------------------
@dataclass
class Job:
    """One background action; `result` is a line for the footer, `lines` a log tail."""

    what: str
    thread: threading.Thread | None = None
    result: str = ""
    lines: list[str] = field(default_factory=list)
    done: bool = False


def _background(what: str, fn: Callable[[Job], None]) -> Job:
    job = Job(what)

    def body() -> None:
        try:
            fn(job)
        except OrchError as exc:
            job.result = f"{what} failed: {exc}"
        except Exception as exc:  # shown, never raised into the render loop
            job.result = f"{what} failed: {type(exc).__name__}: {exc}"
        finally:
            job.done = True

    job.thread = threading.Thread(target=body, name=f"orch-dashboard-{what}", daemon=True)
    job.thread.start()
    return job


class TargetPool:
    """Targets opened for log tails, kept open between refreshes (an ssh connect costs ~0.3 s)
    and closed with the dashboard. Used from one background job at a time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._open: dict[str, Target] = {}

    def get(self, name: str) -> Target:
        if name not in self._open:
            self._open[name] = make_target(self.ctx, name)
        return self._open[name]

    def drop(self, name: str) -> None:
        target = self._open.pop(name, None)
        if target is not None:
            with contextlib.suppress(Exception):
                target.close()

    def close(self) -> None:
        for name in list(self._open):
            self.drop(name)


def log_tail(
    ctx: Context, run: RunView, pool: TargetPool | None = None, lines: int = LOG_TAIL_LINES
) -> list[str]:
    """The last lines of a run's stdout.log: the local copy once pulled, else from its target."""
    local = ctx.runs_dir / run.stage_dir / run.run_id / names.STDOUT
    if run.pulled_at is not None and local.exists():
        return _tail_file(local, lines)
    rec = ctx.store.get_run(run.stage_dir, run.run_id)
    if rec is None:
        return [f"run {run.key} is no longer in the store"]
    own = pool is None
    pool = pool or TargetPool(ctx)
    try:
        target = pool.get(rec.target)
        path = f"{target.workdir.rstrip('/')}/{rec.run_dir}/{names.STDOUT}"
        res = target.run(["tail", "-n", str(lines), path], timeout=15)
    except OrchError:
        pool.drop(rec.target)  # reconnect next time
        raise
    finally:
        if own:
            pool.close()
    if not res.ok:
        return [f"no log yet ({res.stderr.strip() or f'tail exited {res.returncode}'})"]
    return res.stdout.splitlines()


def _tail_file(path: Path, lines: int) -> list[str]:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        data = f.read().decode("utf-8", "replace")
    return data.splitlines()[-lines:]


def pull_selected(ctx: Context, run: RunView) -> str:
    """Pull one run (no checkpoints) and say what happened, in one footer line."""
    rec = ctx.store.get_run(run.stage_dir, run.run_id)
    if rec is None:
        return f"run {run.key} is no longer in the store"
    result = pull_run(ctx, rec, checkpoints=False)
    checked = (
        f"{result.verified} files verified" if result.verified is not None else "no manifest yet"
    )
    return f"pulled {run.key}: {checked}"


# -- the app ---------------------------------------------------------------------------------
class Dashboard:
    """State of one dashboard session: selection, log view, background jobs, last snapshot."""

    def __init__(
        self,
        ctx: Context,
        *,
        fps: float = 1.0,
        include_all: bool = False,
        keep_terminal_s: float = KEEP_TERMINAL_S,
        run_monitor: bool = True,
        console: Console | None = None,
    ) -> None:
        self.ctx = ctx
        self.fps = max(0.2, min(fps, 20.0))
        self.include_all = include_all
        self.keep_terminal_s = keep_terminal_s
        self.run_monitor = run_monitor
        self.console = console or ctx.console
        self.snapshot: Snapshot | None = None
        self.selected_key: str | None = None
        self.show_log = False
        self.message = ""
        self.monitor: InProcessMonitor | None = None
        self.pull_job: Job | None = None
        self.log_job: Job | None = None
        self.log_lines: list[str] = []
        self._log_at = 0.0
        self._gathered_at = 0.0
        self._data_version: Any = None
        self._reader: Store | None = None
        self.targets = TargetPool(ctx)
        self._log_notes: list[str] = []

    @property
    def reader(self) -> Store:
        """Our own connection for reading: SQLite's `data_version` moves only for commits made
        by OTHER connections, and the in-process monitor writes through `ctx.store`."""
        if self._reader is None:
            self._reader = Store(self.ctx.state_dir / "state.db")
        return self._reader

    def close(self) -> None:
        self.targets.close()
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- data --------------------------------------------------------------------------------
    def _store_changed(self) -> bool:
        """True when anyone (a watcher, our own monitor, a launch) committed since last asked."""
        version = self.reader.query("PRAGMA data_version")[0][0]
        changed = version != self._data_version
        self._data_version = version
        return changed

    def gather(self, force: bool = False) -> Snapshot:
        changed = self._store_changed()
        if (
            force
            or changed
            or self.snapshot is None
            or time.monotonic() - self._gathered_at > REGATHER_S
        ):
            label = self.monitor.label if self.monitor else (monitor_label(self.ctx) or "off")
            self.snapshot = gather(
                self.reader,
                self.ctx.config,
                include_all=self.include_all,
                keep_terminal_s=self.keep_terminal_s,
                monitor=label,
            )
            self._gathered_at = time.monotonic()
        return self.snapshot

    def selected_index(self) -> int | None:
        runs = self.snapshot.runs if self.snapshot else ()
        if not runs:
            return None
        for i, r in enumerate(runs):
            if r.key == self.selected_key:
                return i
        self.selected_key = runs[0].key
        return 0

    def selected_run(self) -> RunView | None:
        i = self.selected_index()
        return self.snapshot.runs[i] if self.snapshot is not None and i is not None else None

    # -- keys --------------------------------------------------------------------------------
    def handle(self, key: str, page: int = 10) -> bool:
        """Apply one key; False means quit."""
        runs = self.snapshot.runs if self.snapshot else ()
        i = self.selected_index()
        moves = {"up": -1, "down": 1, "pageup": -page, "pagedown": page}
        if key == "quit":
            return False
        before = self.selected_key
        if key in moves and runs and i is not None:
            self.selected_key = runs[max(0, min(len(runs) - 1, i + moves[key]))].key
        elif key in ("home", "end") and runs:
            self.selected_key = runs[0 if key == "home" else -1].key
        elif key == "refresh":
            poked = self.monitor is not None and self.monitor.poke()
            self.message = "polling the targets now" if poked else "re-read the store"
            self._gathered_at = 0.0
        elif key == "log" or (key == "escape" and self.show_log):
            self.show_log = not self.show_log and key == "log"
            self._log_at = 0.0
            self.log_lines = []
        elif key == "pull":
            self._start_pull()
        if self.selected_key != before and self.show_log:
            self.log_lines, self._log_at = [], 0.0  # the log follows the selection
        return True

    def _start_pull(self) -> None:
        run = self.selected_run()
        if run is None:
            self.message = "no run selected"
        elif self.pull_job is not None and not self.pull_job.done:
            self.message = f"already pulling {self.pull_job.what}"
        else:
            self.message = f"pulling {run.key}…"

            def body(job: Job) -> None:
                job.result = pull_selected(self.ctx, run)

            self.pull_job = _background(f"pull {run.key}", body)

    def _tick_jobs(self) -> None:
        if self.pull_job is not None and self.pull_job.done:
            self.message = self.pull_job.result
            self.pull_job = None
            self._gathered_at = 0.0
        if self.log_job is not None and self.log_job.done:
            self.log_lines = self.log_job.lines or [self.log_job.result]
            self.log_job = None
        run = self.selected_run()
        due = time.monotonic() - self._log_at >= LOG_REFRESH_S
        if self.show_log and run is not None and self.log_job is None and due:
            self._log_at = time.monotonic()

            def body(job: Job) -> None:
                job.lines = log_tail(self.ctx, run, self.targets)

            self.log_job = _background(f"log {run.key}", body)

    # -- frames ------------------------------------------------------------------------------
    def frame(self, now: datetime | None = None, interactive: bool = True) -> Any:
        snap = self.gather()
        size = self.console.size
        run = self.selected_run()
        notes = [self.message]
        if self.monitor is not None:
            notes.append(self.monitor.error)
        if self._log_notes:
            notes.append(self._log_notes[-1])
        message = "  ".join(n for n in notes if n)
        return render(
            snap,
            size.width,
            now or utcnow(),
            height=size.height if interactive else None,
            selected=self.selected_index() if interactive else None,
            log_lines=self.log_lines if (self.show_log and interactive) else None,
            log_title=run.key if run else "",
            message=message,
        )

    def start_monitor(self) -> None:
        if not self.run_monitor:
            return
        try:
            import orchestrator.monitor.scheduler  # noqa: F401
        except ImportError:
            self.message = "monitor not available: showing the store only"
            return
        self.monitor = InProcessMonitor(self.ctx)
        self.monitor.ensure()

    def _note(self, line: str) -> None:
        self._log_notes = [*self._log_notes[-9:], line]

    def run(self) -> int:
        """The live loop; returns the exit code."""
        fd: int | None
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError, AttributeError):
            fd = None
        self.ctx.store  # noqa: B018 - open it here, not racing in the monitor thread
        try:
            with (
                quiet_logs(self._note),
                cbreak(fd) as keys_ok,
                Live(
                    console=self.console,
                    screen=True,
                    auto_refresh=False,
                    redirect_stdout=False,
                    redirect_stderr=False,
                ) as live,
            ):
                self.start_monitor()
                period = 1.0 / self.fps
                while True:
                    if self.monitor is not None:
                        self.monitor.ensure()
                    self._tick_jobs()
                    live.update(self.frame(), refresh=True)
                    deadline = time.monotonic() + period
                    quit_now = False
                    while not quit_now:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        if keys_ok and fd is not None:
                            pressed = read_keys(fd, left)
                            if pressed:
                                page = max(1, self.console.size.height // 2)
                                quit_now = not all(self.handle(k, page) for k in pressed)
                                break  # redraw at once after a key
                        else:
                            time.sleep(left)
                    if quit_now:
                        return 0
        finally:
            self.close()  # after the screen is restored: stopping may wait for a poll

    def print_once(self) -> int:
        """One static frame for a pipe or CI: refresh once if nobody else does, print, exit."""
        if self.run_monitor and monitor_label(self.ctx) == "":
            refresh_now(self.ctx, self.ctx.err)
        try:
            self.console.print(self.frame(interactive=False))
        finally:
            self.close()
        return 0
