"""The watcher's clock: APScheduler 3.x jobs, one per target that has active runs.

    poll:<target>   IntervalTrigger(interval_s, jitter), max_instances=1, coalesce=True,
                    (`push_poll_s` instead while the target's agent pushes: monitor/push.py)
                    every `[monitor] interval_s` of the target, or faster while a run of a stage
                    with a shorter `poll_interval_s` is active on it (see `poll_interval`),
                    misfire_grace_time=misfire_grace_s: a laptop that slept polls once on
                    waking instead of a burst, and a slow box never gets two polls at once
    reconcile       every couple of seconds, reads the store only (no remote call): adds a poll
                    job when a target gets an active run (e.g. `orch launch` in another
                    terminal), removes it when the target has none left, beats the heartbeat
    alerts          retries undelivered alerts whose backoff is over
    actions         retries completion actions (pulls) that failed or were cut off
    idle            paid boxes with nothing running: their idle policy
    checkpoints     only when a target sets `pull_checkpoints_every_s`: mirrors the new
                    checkpoints of active training runs (what an auto-relaunch resumes from)

Nothing contacts a target that has no active run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from orchestrator.alerturls import check_urls
from orchestrator.monitor import alerts as alerts_mod
from orchestrator.monitor import ledger
from orchestrator.monitor.actions import Actions
from orchestrator.monitor.lock import WatcherLock
from orchestrator.monitor.push import attach
from orchestrator.monitor.refresh import Poller
from orchestrator.monitor.statemachine import RunState
from state.models import RunRecord

if TYPE_CHECKING:
    from orchestrator.context import Context

log = logging.getLogger("orch.monitor.scheduler")

RECONCILE_S = 2.0
ALERT_RETRY_S = 5.0
ACTION_RETRY_S = 10.0  # how often failed actions are looked at (each has its own next try)
IDLE_CHECK_S = 60.0  # how often paid boxes are checked for idleness
CHECKPOINT_CHECK_S = 15.0  # how often runs are checked for a due checkpoint mirror
HEARTBEAT_S = 10.0  # the lock says a watcher runs; the heartbeat file is for humans
MIN_POLL_S = 0.5  # no stage may make a box be polled faster than this


def poll_interval(target_s: float, stage_s: float | None) -> float:
    """Pure: how often to poll a target: its own interval, or the shortest interval a stage
    running on it asks for when that is shorter; never below MIN_POLL_S. One poll carries
    every run on the target, so the most demanding active stage sets the pace."""
    want = target_s if stage_s is None else min(target_s, stage_s)
    return max(MIN_POLL_S, want)


class Watcher:
    """Polls every target with active runs on its own schedule until stopped."""

    def __init__(
        self,
        ctx: Context,
        *,
        targets: Iterable[str] | None = None,
        lock: WatcherLock | None = None,
        on_change: Callable[[RunState, RunState], None] | None = None,
        echo: bool = False,
    ) -> None:
        self.ctx = ctx
        self.only = set(targets) if targets is not None else None
        self.lock = lock
        self.actions = Actions(ctx, echo=echo)
        # Pulls can take minutes: they run on their own thread, so the target keeps being polled.
        self._finals: queue.Queue[RunRecord | None] = queue.Queue()
        self._actions_thread = threading.Thread(
            target=self._run_actions, name="orch-actions", daemon=True
        )
        self.poller = Poller(
            ctx,
            on_final=self._finals.put,
            provider_verdict=self.actions.provider_verdict,
            on_change=on_change,
        )
        # Agents that can push are subscribed by the polls; pushed lines take the poll path.
        self.push = attach(self.poller)
        # "skipped: maximum number of running instances reached" is max_instances=1 doing its
        # job (a slow box is never polled twice at once), not something to warn about.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        self._polling: dict[str, float] = {}  # target -> interval of its job
        self._mutex = threading.Lock()
        self.active_targets: list[str] = []
        self.polls = 0
        self._beat_at = -1e9

    # -- jobs ----------------------------------------------------------------------------------
    def _poll(self, target: str) -> None:
        try:
            self.poller.poll_target(target, collect=False)
            self.polls += 1
        except Exception:  # one bad poll must not end the job
            log.exception("poll of %s failed", target)

    def reconcile(self) -> None:
        """Match poll jobs to the targets that have active runs (store only, no remote call)."""
        with self._mutex:
            by_target = ledger.active_poll_intervals(self.ctx.store)
            active = list(by_target)
            if self.only is not None:
                active = [t for t in active if t in self.only]
            self.active_targets = active
            for t in active:
                mon = self.ctx.config.monitor_for(t)
                every = poll_interval(mon.interval_s, by_target[t])
                if self.push.active(t):  # pushes arrive: the poll is only a safety net
                    every = max(every, mon.push_poll_s)
                if self._polling.get(t) == every:
                    continue
                trigger = IntervalTrigger(
                    seconds=every,
                    jitter=min(mon.jitter_s, every / 2) or None,
                    timezone=timezone.utc,
                )
                if t in self._polling:  # the pace changed (a fast stage started or ended)
                    self.scheduler.reschedule_job(f"poll:{t}", trigger=trigger)
                else:
                    self.scheduler.add_job(
                        self._poll,
                        trigger,
                        args=[t],
                        id=f"poll:{t}",
                        name=f"poll {t}",
                        max_instances=1,
                        coalesce=True,
                        misfire_grace_time=int(mon.misfire_grace_s),
                        next_run_time=datetime.now(timezone.utc),  # a new run: look at once
                        replace_existing=True,
                    )
                self._polling[t] = every
            for t in list(self._polling):
                if t not in active:
                    self.scheduler.remove_job(f"poll:{t}")
                    del self._polling[t]
        if self.lock is not None and time.monotonic() - self._beat_at >= HEARTBEAT_S:
            self._beat_at = time.monotonic()
            try:
                self.lock.beat(
                    targets=active,
                    polls=self.polls,
                    round_trips=self.poller.round_trips,
                    pushed_lines=self.push.stats.lines,
                    pushing=[t for t in active if self.push.active(t)],
                )
            except OSError as exc:
                log.warning("heartbeat: %s", exc)

    def _run_actions(self) -> None:
        while (rec := self._finals.get()) is not None:
            try:
                self.actions.on_final(rec)
            except Exception:
                log.exception("completion actions for %s failed", rec.key)

    def _deliver(self) -> None:
        try:
            self.poller.deliver_alerts()
        except Exception:
            log.exception("alert delivery failed")

    def _retry_actions(self) -> None:
        try:
            self.actions.retry_pending()
        except Exception:
            log.exception("retrying actions failed")

    def _check_idle(self) -> None:
        """Paid boxes with nothing running: alert / stop / destroy per their idle policy."""
        for name, cfg in self.ctx.config.targets.items():
            if cfg.kind == "vast" and self.ctx.store.live_instance_for(name) is not None:
                self.actions.check_idle(name)

    def _mirror(self) -> None:
        try:
            self.actions.mirror_checkpoints()
        except Exception:
            log.exception("mirroring checkpoints failed")

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume: undelivered alerts are due now, unfinished actions retried, then schedule."""
        check_urls(self.ctx.config.alerts.urls, deep=True)  # a bad URL stops us here
        alerts_mod.reset_retry_schedule(self.ctx.store)
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": 3600}
        self.scheduler.add_job(
            self.reconcile,
            IntervalTrigger(seconds=RECONCILE_S),
            id="reconcile",
            next_run_time=datetime.now(timezone.utc),
            **common,
        )
        self.scheduler.add_job(
            self._deliver,
            IntervalTrigger(seconds=ALERT_RETRY_S),
            id="alerts",
            next_run_time=datetime.now(timezone.utc),
            **common,
        )
        self.scheduler.add_job(
            self._retry_actions,
            IntervalTrigger(seconds=ACTION_RETRY_S),
            id="actions",
            next_run_time=datetime.now(timezone.utc),
            **common,
        )
        self.scheduler.add_job(
            self._check_idle,
            IntervalTrigger(seconds=IDLE_CHECK_S),
            id="idle",
            **common,
        )
        if any(
            self.ctx.config.monitor_for(name).pull_checkpoints_every_s > 0
            for name in self.ctx.config.targets
        ):
            self.scheduler.add_job(
                self._mirror,
                IntervalTrigger(seconds=CHECKPOINT_CHECK_S),
                id="checkpoints",
                **common,
            )
        self._actions_thread.start()
        self.scheduler.start()

    @property
    def idle(self) -> bool:
        """No active run to watch and no alert waiting to be sent."""
        if (
            ledger.active_targets(self.ctx.store)
            if self.only is None
            else [t for t in ledger.active_targets(self.ctx.store) if t in self.only]
        ):
            return False
        return not self.ctx.store.query(
            "SELECT 1 FROM alerts WHERE delivered_at IS NULL AND gave_up = 0 LIMIT 1"
        )

    def stop(self, actions_grace_s: float = 5.0) -> None:
        """Stop polling; give a running action a moment (an interrupted pull resumes on the
        next start: the action ledger still lists it as not done)."""
        try:
            self.scheduler.shutdown(wait=True)
        except Exception as exc:  # already stopped
            log.debug("scheduler shutdown: %s", exc)
        self._finals.put(None)
        if self._actions_thread.is_alive():
            self._actions_thread.join(actions_grace_s)
        self.poller.close()
