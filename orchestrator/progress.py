"""Progress wherever a person waits: `orch launch --wait/--watch`, `orch run-all`, and the steps
of a launch (code sync, bootstrap, pull).

    run_line(view, now) -> Text                  pure: one run's live line
    stages_table(rows, now) -> Table             pure: run-all's table of stages
    with RunProgress(console) as live:           the live loop: rich Live on a terminal; else one
        live.update(rec)                         plain line per run when it changes, at most
                                                 every few seconds (a log, never a flood)
    with StagesProgress(console, plan) as live:  the same for a pipeline (one row per stage)
    steps = Steps(console)                       what a step is doing: a spinner on a terminal,
    with steps.step("syncing code (12 files)") as s:   one line otherwise, and a last line
        ...; s.done("synced code: ...")              saying how it went

Ages are judged on this machine's clock (`RunView.heartbeat_age_s`: when the controller last
saw `seq` move), never on a timestamp written by the box.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, TypeVar

from rich import box
from rich.console import Console, Group, RenderableType
from rich.errors import LiveError
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.dashboard.render import (
    PHASE_STYLE,
    UNREACHABLE_STYLE,
    fmt_duration,
    fmt_loss,
    fmt_rate,
    heartbeat_style,
    progress_text,
)
from orchestrator.dashboard.snapshot import RunView, run_view
from state.models import RunRecord
from state.phases import Phase

#: In plain (non-terminal) output, a run's line is printed again at most this often.
PLAIN_EVERY_S = 5.0
#: The progress bar of a live line, in characters.
BAR_WIDTH = 16


_L = TypeVar("_L", bound="_LiveBase")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- pure rendering ------------------------------------------------------------------------------
def phase_label(view: RunView) -> Text:
    """`running (training)`, `hung`, `unreachable`, `succeeded`: words, readable without colour."""
    if view.is_active and view.unreachable_since is not None:
        return Text("unreachable", style=UNREACHABLE_STYLE)
    text = Text(view.phase.value, style=PHASE_STYLE.get(view.phase, ""))
    worker = view.worker_phase
    if view.is_active and worker and worker != view.phase.value:
        text.append(f" ({worker})", style="dim")
    return text


def step_text(view: RunView) -> str:
    """`step 10/150`, `step 10` (no total), or `step -` before the first one."""
    if view.total_steps:
        return f"step {view.step or 0}/{view.total_steps}"
    return f"step {view.step}" if view.step is not None else "step -"


def heartbeat_text(view: RunView, now: datetime) -> Text:
    """How long ago `seq` last moved, coloured against the stale limit; says so when none came."""
    if view.is_active and view.unreachable_since is not None:
        gone = fmt_duration((now - view.unreachable_since).total_seconds())
        return Text(f"no answer for {gone}", style=UNREACHABLE_STYLE)
    age = view.heartbeat_age_s(now)
    if age is None:
        return Text("no heartbeat yet", style="yellow")
    return Text(
        f"heartbeat {fmt_duration(age)} ago", style=heartbeat_style(age, view.stale_after_s)
    )


def run_line(view: RunView, now: datetime, *, bar_width: int = 0) -> Text:
    """One run on one line: stage and run id, phase, step/total (with a bar when `bar_width`),
    loss, tokens/s, ETA and the heartbeat's age (or, once it ended, how long it took).
    Pieces the run does not have yet (no loss before the first step) are left out."""
    line = Text.assemble((view.stage, "bold"), " ", (view.run_id, "dim"), "  ")
    line.append_text(phase_label(view))
    line.append(f"  {step_text(view)}")
    if bar_width and view.total_steps:
        line.append(" ")
        line.append_text(progress_text(view.step, view.total_steps, bar_width))
    if view.loss is not None:
        line.append(f"  loss {fmt_loss(view.loss)}")
    if view.is_active:
        if view.tokens_per_s is not None:
            line.append(f"  {fmt_rate(view.tokens_per_s)} tok/s")
        eta = view.remaining_s()
        if eta is not None:
            line.append(f"  ETA {fmt_duration(eta)}")
        line.append("  ")
        line.append_text(heartbeat_text(view, now))
        if view.message and not view.step:
            # before the first step the worker's own word says what it is doing (loading the
            # model, building the tiny model: "step 1200/4000, ETA 40 s")
            line.append(f"  {view.message[:80]}", style="dim")
    else:
        line.append(f"  after {fmt_duration(view.elapsed_s(now))}", style="dim")
        if view.exit_code is not None:
            line.append(f"  exit {view.exit_code}")
        if view.reason:
            line.append(f": {view.reason}", style="red" if view.phase.is_bad else "")
    return line


def _signature(view: RunView) -> tuple[Any, ...]:
    """What makes a plain line worth printing again (not the clock-driven parts)."""
    return (
        view.phase,
        view.unreachable_since is not None,
        view.worker_phase,
        view.step,
        view.total_steps,
        view.loss,
        view.last_beat_at is None,
        view.message if not view.step else "",
    )


@dataclass(frozen=True)
class StageRow:
    """One planned stage of a pipeline. `state` is `queued`, `launching`, or the run's phase."""

    stage: str
    target: str = ""
    state: str = "queued"
    run: RunView | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str = ""

    def elapsed_s(self, now: datetime) -> float | None:
        if self.started_at is None:
            return None
        return max(0.0, ((self.ended_at or now) - self.started_at).total_seconds())


_STATE_STYLE = {"queued": "dim", "launching": "cyan", "writing": "cyan"}


def _row_state(row: StageRow) -> Text:
    if row.state == "failed" and row.run is not None and row.run.phase.is_bad:
        return phase_label(row.run)  # crashed, hung, timed_out: the run's own word
    if row.run is not None and row.state not in ("succeeded", "failed"):
        return phase_label(row.run)
    try:
        return Text(row.state, style=PHASE_STYLE.get(Phase(row.state), ""))
    except ValueError:  # queued, launching, writing: before there is a run
        return Text(row.state, style=_STATE_STYLE.get(row.state, ""))


def stages_table(rows: Sequence[StageRow], now: datetime, *, title: str = "") -> Table:
    """The pipeline at a glance: stage, target, phase, step/total, loss, ETA, elapsed."""
    table = Table(title=title or None, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("stage", no_wrap=True, style="bold")
    table.add_column("target", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    table.add_column("step", no_wrap=True, justify="right")
    table.add_column("loss", no_wrap=True, justify="right")
    table.add_column("ETA", no_wrap=True, justify="right")
    table.add_column("elapsed", no_wrap=True, justify="right")
    for row in rows:
        run = row.run
        step = step_text(run).removeprefix("step ") if run is not None else "-"
        loss = fmt_loss(run.loss) if run is not None else "-"
        eta = fmt_duration(run.remaining_s()) if run is not None else "-"
        elapsed = row.elapsed_s(now)
        table.add_row(
            row.stage,
            row.target or "-",
            _row_state(row),
            step,
            loss,
            eta,
            fmt_duration(elapsed) if elapsed is not None else "-",
        )
    return table


# -- the live loop -------------------------------------------------------------------------------
class _LiveBase:
    """A rich Live on a terminal (re-rendered a few times a second, so ages tick); in plain
    output nothing is drawn and subclasses print a line per change instead. Whatever else is
    printed on the same console meanwhile appears above the live view (rich keeps it at the
    bottom). Thread-safe: pipeline threads update it while the main thread waits."""

    def __init__(
        self,
        console: Console,
        *,
        live: bool | None = None,
        every_s: float = PLAIN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.console = console
        self.use_live = (
            (console.is_terminal and not console.is_dumb_terminal) if live is None else live
        )
        self.every_s = every_s
        self.clock = clock
        self.now = now
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._printed: dict[str, tuple[tuple[Any, ...], float]] = {}

    def render(self) -> RenderableType:  # pragma: no cover - overridden
        raise NotImplementedError

    def _renderable(self) -> RenderableType:
        with self._lock:
            return self.render()

    def start(self) -> None:
        if not self.use_live or self._live is not None:
            return
        live = Live(
            get_renderable=self._renderable,
            console=self.console,
            refresh_per_second=2,
            transient=False,
        )
        try:
            live.start()
        except LiveError:  # another live display owns this console: print lines instead
            self.use_live = False
            return
        self._live = live

    def stop(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def __enter__(self: _L) -> _L:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _plain(self, key: str, view: RunView, line: Callable[[], str]) -> None:
        """Print `line()` for `key` if it changed since last printed, and either its phase
        changed or `every_s` passed since then."""
        sig = _signature(view)
        at = self.clock()
        last = self._printed.get(key)
        if last is not None:
            if last[0] == sig:
                return
            if last[0][:2] == sig[:2] and at - last[1] < self.every_s:
                return  # same phase: wait a little, the next update prints the newest
        self._printed[key] = (sig, at)
        self.console.print(line(), markup=False, highlight=False, soft_wrap=True)


class RunProgress(_LiveBase):
    """A live line per run being waited on (`orch launch --wait/--watch`)."""

    def __init__(self, console: Console, **kwargs: Any) -> None:
        super().__init__(console, **kwargs)
        self._views: dict[str, RunView] = {}

    def update(self, rec: RunRecord) -> None:
        view = run_view(rec)
        with self._lock:
            self._views[rec.key] = view
            if not self.use_live and not view.phase.is_terminal:  # the caller says how it ended
                self._plain(rec.key, view, lambda: run_line(view, self.now()).plain)

    def render(self) -> RenderableType:
        now = self.now()
        return Group(*(run_line(v, now, bar_width=BAR_WIDTH) for v in self._views.values()))


class StagesProgress(_LiveBase):
    """run-all's live table: one row per planned stage, from queued to its run's end."""

    def __init__(self, console: Console, stages: Sequence[str], *, title: str = "", **kwargs: Any):
        super().__init__(console, **kwargs)
        self.title = title
        self._rows: dict[str, StageRow] = {s: StageRow(stage=s) for s in stages}

    def set(
        self,
        stage: str,
        *,
        target: str | None = None,
        state: str | None = None,
        rec: RunRecord | None = None,
        error: str | None = None,
    ) -> None:
        """Record what a stage is doing; a record's phase becomes the row's state."""
        with self._lock:
            row = self._rows.get(stage) or StageRow(stage=stage)
            now = self.now()
            changes: dict[str, Any] = {}
            view = run_view(rec) if rec is not None else None
            if target is not None:
                changes["target"] = target
            if view is not None:
                changes["run"] = view
                changes["state"] = view.phase.value
            if state is not None:
                changes["state"] = state
            if error is not None:
                changes["error"] = error
            if row.started_at is None and changes.get("state", row.state) != "queued":
                changes["started_at"] = now
            row = replace(row, **changes)
            if row.ended_at is None and row.state in ("succeeded", "failed"):
                row = replace(row, ended_at=now)
            self._rows[stage] = row
            if not self.use_live and view is not None and not view.phase.is_terminal:
                shown = view
                self._plain(stage, shown, lambda: run_line(shown, self.now()).plain)

    def rows(self) -> list[StageRow]:
        with self._lock:
            return list(self._rows.values())

    def render(self) -> RenderableType:
        return stages_table(list(self._rows.values()), self.now(), title=self.title)


# -- steps ---------------------------------------------------------------------------------------
class _Step:
    def __init__(self) -> None:
        self.final: str | None = None

    def done(self, text: str) -> None:
        """The line that stays once the step is over (how it went)."""
        self.final = text


class Steps:
    """Says what a multi-step operation is doing. `step(text)` shows a spinner with `text` on a
    terminal (one plain line otherwise) while the block runs; `done(...)` inside it leaves a
    line saying how it went. `note(text)` is one line. `Steps(None)` says nothing (callers that
    are not a person waiting: the watcher's pulls, tests)."""

    def __init__(self, console: Console | None, *, prefix: str = "", spinner: bool = True):
        self.console = console
        self.prefix = prefix
        self.spinner = spinner

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(
                f"{self.prefix}{text}", markup=False, highlight=False, soft_wrap=True
            )

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[_Step]:
        handle = _Step()
        console = self.console
        if console is None:
            yield handle
            return
        status = None
        if self.spinner and console.is_terminal and not console.is_dumb_terminal:
            status = console.status(Text(f"{self.prefix}{text}"))
            try:
                status.start()
            except LiveError:  # a live display is already up on this console
                status = None
        if status is None:
            self.note(text)
        try:
            yield handle
        finally:
            if status is not None:
                status.stop()
        if handle.final:
            self.note(handle.final)


#: Says nothing.
QUIET = Steps(None)


def fmt_size(n: float) -> str:
    """Bytes for a person: `3.4 MB`, `812 KB`, `12 B` (decimal units, like rsync and pip)."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit != "MB" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
