"""What the watcher does when a run ends, and the provider's word on a silent box.

All configurable in `[monitor]` (per target), costly ones off by default:

    pull_on_success = true     pull + verify the run's artifacts (orchestrator.pull.pull_run)
    pull_on_failure = false    also pull failed/crashed/timed-out runs (logs, partial results)
    stop_on_timeout = false    kill the tmux session of a run past its stage timeout
    launch_next_stage = false  launch the stages that were waiting for this one (same target,
                               not waited on: the watcher picks the new run up)
    pull_checkpoints_every_s = 0
                               while a training run is active, mirror its new checkpoints to
                               this machine this often (what an auto-relaunch resumes from)
    idle instances             `[targets.X] idle_action` of a vast target (alert/stop/destroy)
    auto relaunch              `[targets.X] auto_relaunch` of a vast target: a lost training run
                               is relaunched on a new box from its newest checkpoint
                               (orchestrator.vast.relaunch)

Each action is recorded in the store's `run_monitor.actions_done`, so a restarted watcher
neither repeats a pull nor launches a stage twice. A failed action is retried a few times
(MAX_ATTEMPTS in a row), except the pull: while a run's results are only on the box it is
retried every `pull_retry_s`, backing off up to `pull_backoff_cap_s` while the box does not
answer, and ONE `pull_stuck` alert goes out once no pull has worked for
`pull_stuck_alert_after_s` (or at once when it cannot work: a file that does not match its
manifest MAX_ATTEMPTS times in a row, the target gone from orch.toml, the instance destroyed).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.checkpoints import is_training, pull_checkpoints
from orchestrator.launch import kill_session, launch_stage
from orchestrator.monitor import ledger
from orchestrator.monitor.alerts import alert_payload, format_alert
from orchestrator.monitor.statemachine import Alert
from orchestrator.pull import pull_run
from orchestrator.targets.factory import make_target
from orchestrator.vast.cost import apply_idle_policy
from orchestrator.vast.provider import check_instance
from state.errors import ConfigError, HostKeyError, UnreachableError, VerifyError
from state.models import RunRecord
from state.phases import Phase
from state.store import parse_time

if TYPE_CHECKING:
    from orchestrator.context import Context

log = logging.getLogger("orch.monitor.actions")

MAX_ATTEMPTS = 3
PULL_PHASES_ON_FAILURE = frozenset({Phase.FAILED, Phase.CRASHED, Phase.TIMED_OUT})


def wanted_actions(ctx: Context, rec: RunRecord) -> list[str]:
    """The actions the config asks for this final run, in order (pure apart from config)."""
    mon = ctx.config.monitor_for(rec.target)
    out: list[str] = []
    if rec.phase is Phase.TIMED_OUT and mon.stop_on_timeout:
        out.append("stop")
    if (rec.phase is Phase.SUCCEEDED and mon.pull_on_success) or (
        rec.phase in PULL_PHASES_ON_FAILURE and mon.pull_on_failure
    ):
        out.append("pull")
    if rec.phase is Phase.SUCCEEDED and mon.launch_next_stage:
        out.append("next")
    if rec.phase is Phase.LOST:
        # lazy, for start-up time: only this path needs orchestrator.vast.relaunch
        from orchestrator.vast.relaunch import is_relaunchable

        if is_relaunchable(ctx, rec):
            out.append("relaunch")
    return out


def pull_delay_s(failures: int, error: BaseException, retry_s: float, cap_s: float) -> float:
    """Seconds before the next pull after `failures` failures in a row (pure): `retry_s` while
    the box answers; doubling from `retry_s` up to `cap_s` while it does not (or refuses)."""
    if isinstance(error, (UnreachableError, HostKeyError)):
        return min(cap_s, retry_s * 2 ** max(0, failures - 1))
    return min(cap_s, retry_s)


def pull_stuck_alert(rec: RunRecord, why: str, *, final: bool) -> Alert:
    """The one `pull_stuck` alert of a run (keyed by the run: sent once whatever follows)."""
    return Alert(
        kind="pull_stuck",
        dedup_key=f"{rec.stage_dir}/{rec.run_id}/pull_stuck",
        stage=rec.stage,
        stage_dir=rec.stage_dir,
        run_id=rec.run_id,
        target=rec.target,
        phase=rec.phase.value,
        reason=why,
        step=rec.step,
        total_steps=rec.total_steps,
        loss=rec.loss,
        extra={
            "fix": ("orch gave up pulling it; " if final else "orch keeps trying; ")
            + f"pull by hand with `orch pull {rec.stage_dir}/{rec.run_id}` once the box answers"
        },
    )


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def action_may_run(row: dict[str, Any], now: datetime) -> bool:
    """May a run's pending actions be tried now (pure): not given up, and the failed one's next
    try is due."""
    if row.get("action_gave_up"):
        return False
    due = parse_time(row.get("action_next_try"))
    return due is None or now >= due


def action_stuck(row: dict[str, Any], stuck_after_s: float, now: datetime) -> bool:
    """Has a run's pending action given up, or failed for `stuck_after_s` (pure)? `orch launch
    --watch` stops waiting for it then: the `pull_stuck` alert has said where the results are."""
    if row.get("action_gave_up"):
        return True
    since = parse_time(row.get("action_failing_since"))
    return since is not None and (now - since).total_seconds() >= stuck_after_s


class Actions:
    """Completion hooks and provider verdicts for one watcher."""

    def __init__(
        self, ctx: Context, *, echo: bool = False, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.ctx = ctx
        self.echo = echo
        self.clock = clock
        # Runs whose actions are under way: the watcher's actions thread and its periodic
        # retry job both call on_final, and a pull can take minutes; without this the retry
        # would start a second pull and launch the next stage twice.
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._mirrored_at: dict[str, float] = {}  # run key -> monotonic time of the last mirror

    def _say(self, text: str) -> None:
        log.info(text)
        if self.echo:
            self.ctx.console.print(text, markup=False, highlight=False)

    # -- completion -------------------------------------------------------------------------
    def on_final(self, rec: RunRecord) -> None:
        """Run every configured action not yet done for a run in a final phase (at once a
        no-op for a run whose actions another thread is already running)."""
        with self._busy_lock:
            if rec.key in self._busy:
                return
            self._busy.add(rec.key)
        try:
            self._run_actions(rec)
        finally:
            with self._busy_lock:
                self._busy.discard(rec.key)

    def _run_actions(self, rec: RunRecord) -> None:
        store = self.ctx.store
        done = ledger.actions_done(store, rec.stage_dir, rec.run_id)
        row = ledger.monitor_row(store, rec.stage_dir, rec.run_id)
        if not action_may_run(row, self.clock()):
            return
        for action in wanted_actions(self.ctx, rec):
            if action in done:
                continue
            if action != "pull" and int(row.get("action_attempts") or 0) >= MAX_ATTEMPTS:
                return
            fresh = store.get_run(rec.stage_dir, rec.run_id)
            if action == "pull" and fresh is not None and fresh.pulled_at is not None:
                # Pulled and verified already (`orch pull` by hand): nothing is only on the box.
                ledger.record_action(store, rec.stage_dir, rec.run_id, action)
                row = {}
                continue
            try:
                getattr(self, f"_do_{action}")(rec)
            except Exception as exc:  # recorded and retried; never stops the watcher
                msg = f"{type(exc).__name__}: {exc}"
                if action == "pull":
                    self._pull_failed(rec, row, exc, msg)
                else:
                    ledger.record_action(store, rec.stage_dir, rec.run_id, action, error=msg[:500])
                self._say(f"{rec.key}: {action} failed: {msg}")
                return  # later actions depend on earlier ones (next stage needs the pull)
            ledger.record_action(store, rec.stage_dir, rec.run_id, action)
            row = {}  # the streak ended: the next action starts with a clean slate
        self.check_idle(rec.target)

    def _pull_failed(
        self, rec: RunRecord, row: dict[str, Any], exc: BaseException, msg: str
    ) -> None:
        """Schedule the next pull (or give it up when it cannot work) and, once, alert."""
        now = self.clock()
        mon = self.ctx.config.monitor_for(rec.target)
        failures = int(row.get("action_attempts") or 0) + 1
        since = parse_time(row.get("action_failing_since")) or now
        gone = self._results_gone(rec)
        final = (
            gone is not None
            or isinstance(exc, ConfigError)
            or (isinstance(exc, VerifyError) and failures >= MAX_ATTEMPTS)
        )
        delay = pull_delay_s(failures, exc, mon.pull_retry_s, mon.pull_backoff_cap_s)
        ledger.record_action(
            self.ctx.store,
            rec.stage_dir,
            rec.run_id,
            "pull",
            error=msg[:500],
            at=now,
            next_try=None if final else now + timedelta(seconds=delay),
            gave_up=final,
        )
        waited = (now - since).total_seconds()
        if not final and waited < mon.pull_stuck_alert_after_s:
            return
        where = f"{gone}, and its results with it" if gone else "still only on the box"
        why = (
            f"results not pulled after {failures} tries over {waited:.0f} s, {where}; "
            f"last error: {msg[:300]}"
        )
        alert = pull_stuck_alert(rec, why, final=final)
        payload = alert_payload(alert)
        title, body = format_alert(payload)
        if ledger.record_alerts(self.ctx.store, [(alert, title, body, payload)]):
            self._say(f"{rec.key}: {why}")

    def _results_gone(self, rec: RunRecord) -> str | None:
        """Why nothing is left to pull from (a vast instance destroyed), or None."""
        cfg = self.ctx.config.targets.get(rec.target)
        if (
            cfg is not None
            and cfg.kind == "vast"
            and not self.ctx.store.live_instance_for(rec.target)
        ):
            return f"the instance of target {rec.target} was destroyed"
        return None

    def retry_pending(self) -> None:
        """Re-run actions that failed earlier (or were cut off by a watcher restart)."""
        for rec in self.ctx.store.list_runs(limit=200):
            if not rec.phase.is_terminal or rec.phase is Phase.CANCELLED:
                continue
            wanted = wanted_actions(self.ctx, rec)
            if not wanted:
                continue
            if set(wanted) - ledger.actions_done(self.ctx.store, rec.stage_dir, rec.run_id):
                self.on_final(rec)

    def _do_stop(self, rec: RunRecord) -> None:
        target = make_target(self.ctx, rec.target)
        try:
            if rec.job_id:  # a Slurm job (Slurm enforces its own --time too)
                # lazy, for start-up time: only this path needs orchestrator.slurm.submit
                from orchestrator.slurm.submit import cancel_job

                cancel_job(target, rec.job_id)
            else:
                kill_session(target, rec.session)
        finally:
            with contextlib.suppress(Exception):
                target.close()
        self._say(f"{rec.key}: stopped (past its timeout)")

    def _do_pull(self, rec: RunRecord) -> None:
        res = pull_run(self.ctx, rec)
        what = (
            f"{res.verified} files verified"
            if res.verified is not None
            else "no manifest to verify"
        )
        self._say(f"{rec.key}: pulled to {res.local_dir} ({what})")

    def _do_next(self, rec: RunRecord) -> None:
        """Launch (without waiting) every stage that takes this one's output and whose other
        inputs have a succeeded run on the same target; the watcher then watches it too."""
        # lazy, for start-up time: only this path needs jobs.pipeline
        from jobs.pipeline import dependency_graph
        from jobs.stages import get_stage

        graph = dependency_graph()
        exp = self.ctx.config.experiment
        succeeded = {
            r.stage
            for r in self.ctx.store.list_runs(target=rec.target)
            if r.phase is Phase.SUCCEEDED
        }
        running = {r.stage for r in self.ctx.store.list_runs(active_only=True, target=rec.target)}
        for child, deps in graph.items():
            if rec.stage not in deps or child in running or not set(deps) <= succeeded:
                continue
            spec = get_stage(child, exp.profile, shared=exp.overrides)
            if spec.local_only:
                continue
            new = launch_stage(self.ctx, spec, rec.target, profile=exp.profile)
            self._say(f"{rec.key}: launched next stage {child} as {new.key}")

    def _do_relaunch(self, rec: RunRecord) -> None:
        # lazy, for start-up time: only this path needs orchestrator.vast.relaunch
        from orchestrator.vast.relaunch import relaunch_failed, relaunch_lost

        try:
            res = relaunch_lost(self.ctx, rec)
        except Exception as exc:
            relaunch_failed(self.ctx, rec, exc, MAX_ATTEMPTS)
            raise
        start = res.resumed_from.describe() if res.resumed_from else "step 0"
        self._say(
            f"{rec.key}: lost; relaunched as {res.new.key} on instance "
            f"{res.instance_id}, resuming from {start}"
        )

    # -- while running -----------------------------------------------------------------------
    def mirror_checkpoints(self, now: float | None = None) -> list[str]:
        """Pull the new checkpoints of every active training run whose target asks for it
        (`pull_checkpoints_every_s` > 0) and is due. Returns the keys of the runs mirrored."""
        now = time.monotonic() if now is None else now
        done: list[str] = []
        for rec in self.ctx.store.list_runs(active_only=True):
            every = self.ctx.config.monitor_for(rec.target).pull_checkpoints_every_s
            if every <= 0 or rec.phase is not Phase.RUNNING or not is_training(rec):
                continue
            last = self._mirrored_at.get(rec.key)
            if last is not None and now - last < every:
                continue
            try:
                held = pull_checkpoints(self.ctx, rec)
            except Exception as exc:  # a box that does not answer now is tried next time
                log.info("mirroring checkpoints of %s failed: %s", rec.key, exc)
                continue
            finally:
                # The interval runs from the end of a pull: a slow one never runs back to back.
                self._mirrored_at[rec.key] = max(now, time.monotonic())
            if held:
                log.info("%s: checkpoints here: %s", rec.key, ", ".join(held))
            done.append(rec.key)
        return done

    # -- instances ---------------------------------------------------------------------------
    def check_idle(self, target: str) -> None:
        """Apply a vast target's idle policy when nothing is left running on it."""
        cfg = self.ctx.config.targets.get(target)
        if cfg is None or cfg.kind != "vast":
            return
        try:
            apply_idle_policy(self.ctx, target)
        except Exception as exc:
            log.warning("idle check of %s failed: %s", target, exc)

    def provider_verdict(self, target: str) -> str | None:
        """For a vast target that does not answer: the provider's reason if the instance is
        gone or preempted, else None. `check_instance` itself calls the API at most once per
        `provider_check_s`; a failing provider API is never taken as a lost instance."""
        cfg = self.ctx.config.targets.get(target)
        if cfg is None or cfg.kind != "vast":
            return None
        verdict = check_instance(self.ctx, target)
        return verdict.reason if verdict.lost else None
