"""`orch watch`: the foreground watcher (replaces the seed's hourly `wait_or_crash.sh`).

watch(ctx)                         poll until Ctrl-C / SIGTERM
watch(ctx, once=True)              one poll of every active run; exit 1 if any is in a bad state
watch(ctx, stop_when_idle=True)    `orch launch ... --watch`: return once nothing is left (no
                                   active run, no alert to send, no completion action under
                                   way or to retry: a pull, the next stage it launches)
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from orchestrator.monitor import ledger
from orchestrator.monitor.actions import MAX_ATTEMPTS, Actions, action_stuck, wanted_actions
from orchestrator.monitor.lock import WatcherBusyError, WatcherLock, watcher_running
from orchestrator.monitor.refresh import Poller
from orchestrator.monitor.scheduler import Watcher
from orchestrator.monitor.statemachine import RunState
from state.models import RunRecord
from state.phases import Phase

if TYPE_CHECKING:
    from orchestrator.context import Context

_STYLE = {"succeeded": "green", "running": "cyan", "cancelled": "yellow"}


def format_change(prev: RunState, new: RunState) -> str:
    """One line per change, for the terminal (pure)."""
    t = datetime.now(timezone.utc).strftime("%H:%M:%S")
    if new.phase == prev.phase:
        if new.unreachable_alerted and not prev.unreachable_alerted:
            what = "still unreachable (alert sent)"
        else:
            what = "unreachable" if new.unreachable_since is not None else "reachable again"
    else:
        what = f"{prev.phase.value} -> {new.phase.value}"
    reason = f": {new.reason}" if new.reason and new.phase != prev.phase else ""
    return f"{t} {new.stage_dir}/{new.run_id} on {new.target}: {what}{reason}"


def _bad(rec: RunRecord) -> bool:
    return rec.phase.is_bad or rec.unreachable_since is not None


def watch(
    ctx: Context,
    *,
    once: bool = False,
    targets: Iterable[str] | None = None,
    stop_when_idle: bool = False,
    on_tick: Callable[[], None] | None = None,
) -> int:
    """Watch runs and return an exit code. `once`: 1 if any run polled is in a bad state.
    `stop_when_idle`: 1 if any run watched ended in a bad state. Otherwise runs until Ctrl-C or
    SIGTERM and returns 0. `on_tick()` is called about once a second (live progress)."""
    ctx.config  # noqa: B018 - a bad orch.toml (e.g. a malformed alert URL) fails here, first
    only = list(targets) if targets is not None else None
    for name in only or []:
        ctx.config.target(name)  # ConfigError naming an unknown target, before anything runs

    def echo(prev: RunState, new: RunState) -> None:
        style = _STYLE.get(
            new.phase.value, "red" if new.phase.is_bad or new.unreachable_since else "white"
        )
        ctx.console.print(format_change(prev, new), style=style, markup=False, highlight=False)

    if once:
        return _once(ctx, only, echo)

    lock = WatcherLock(ctx.state_dir, holder="watch")
    try:
        lock.acquire()
    except WatcherBusyError as exc:
        if not stop_when_idle:
            raise  # one line naming the holder (a dashboard, another `orch watch`) and what to do
        # `orch launch --watch` beside a running watcher: that one polls and alerts; we only
        # follow the store until our runs end.
        ctx.console.print(f"{exc.who} is polling; following the store", style="dim", markup=False)
        return _follow_store(ctx, only, on_tick=on_tick)
    stop = threading.Event()
    watched: set[tuple[str, str]] = set()
    old_handlers = _install_signal_handlers(stop)
    watcher = Watcher(ctx, targets=only, lock=lock, on_change=echo, echo=True)
    try:
        watcher.start()
        n = len(ledger.load_states(ctx.store, targets=only))
        ctx.console.print(f"watching {n} active run(s); Ctrl-C to stop", style="dim", markup=False)
        while not stop.wait(1.0):
            if on_tick is not None:
                on_tick()
            for rec, _ in ledger.load_states(ctx.store, targets=only):
                watched.add((rec.stage_dir, rec.run_id))
            # Idle is not enough: a pull or a next stage may still be under way on the actions
            # thread, and returning would cut it off (a next stage never launched).
            if stop_when_idle and watcher.idle and not actions_left(ctx, watched):
                break
    finally:
        watcher.stop()
        lock.release()
        _restore_signal_handlers(old_handlers)
    if not stop_when_idle:
        return 0  # stopped by the user (Ctrl-C / SIGTERM): not a verdict on the runs
    finals = [ctx.store.get_run(sd, rid) for sd, rid in sorted(watched)]
    return 1 if any(r is not None and _bad(r) for r in finals) else 0


def actions_left(
    ctx: Context, keys: Iterable[tuple[str, str]], *, now: datetime | None = None
) -> bool:
    """Does a run among `keys` (stage_dir, run_id) that has ended still have a completion
    action to do (pull, next stage, ...) that has not failed for good? A stopped run has none;
    a pull stuck long enough to be alerted about no longer counts (it is retried meanwhile)."""
    now = now or datetime.now(timezone.utc)
    for stage_dir, run_id in keys:
        rec = ctx.store.get_run(stage_dir, run_id)
        if rec is None or not rec.phase.is_terminal or rec.phase is Phase.CANCELLED:
            continue
        done = ledger.actions_done(ctx.store, stage_dir, run_id)
        left = [a for a in wanted_actions(ctx, rec) if a not in done]
        if not left:
            continue
        row = ledger.monitor_row(ctx.store, stage_dir, run_id)
        if left[0] == "pull":
            stuck_after = ctx.config.monitor_for(rec.target).pull_stuck_alert_after_s
            if not action_stuck(row, stuck_after, now):
                return True
        elif int(row.get("action_attempts") or 0) < MAX_ATTEMPTS and not row.get("action_gave_up"):
            return True
    return False


def _follow_store(
    ctx: Context,
    only: list[str] | None,
    every_s: float = 2.0,
    on_tick: Callable[[], None] | None = None,
) -> int:
    keys = {(rec.stage_dir, rec.run_id) for rec, _ in ledger.load_states(ctx.store, targets=only)}
    while watcher_running(ctx) and ledger.load_states(ctx.store, targets=only):
        if on_tick is not None:
            on_tick()
        time.sleep(every_s)
    finals = [ctx.store.get_run(sd, rid) for sd, rid in sorted(keys)]
    for r in finals:
        if r is not None:
            ctx.console.print(
                f"{r.key} on {r.target}: {r.phase.value}", markup=False, highlight=False
            )
    return 1 if any(r is not None and _bad(r) for r in finals) else 0


def _once(ctx: Context, only: list[str] | None, echo: Callable[[RunState, RunState], None]) -> int:
    actions = Actions(ctx, echo=True)
    poller = Poller(
        ctx, on_final=actions.on_final, provider_verdict=actions.provider_verdict, on_change=echo
    )
    before = [rec for rec, _ in ledger.load_states(ctx.store, targets=only)]
    try:
        poller.poll(only)
        actions.retry_pending()
        poller.deliver_alerts()  # what the actions recorded (a `pull_stuck`)
    finally:
        poller.close()
    after = [ctx.store.get_run(r.stage_dir, r.run_id) for r in before]
    runs = [r for r in after if r is not None]
    for r in runs:
        extra = " (unreachable)" if r.unreachable_since else ""
        ctx.console.print(
            f"{r.key} on {r.target}: {r.phase.value}{extra}"
            + (f": {r.reason}" if r.reason else ""),
            markup=False,
            highlight=False,
        )
    if not runs:
        ctx.console.print("no active runs", style="dim", markup=False)
    return 1 if any(_bad(r) for r in runs) else 0


def _install_signal_handlers(stop: threading.Event) -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    old: dict[int, object] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, lambda *_: stop.set())
    return old


def _restore_signal_handlers(old: dict[int, object]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]
