"""One poll: one agent round trip per target carrying every active run of that target, the state
machine applied to each run, phases and alerts written to the store FIRST, then delivered.

    refresh_once(ctx, targets=None) -> list[RunRecord]     one pass (used by `orch status`)
    wait_for_run(ctx, stage_dir, run_id, ...) -> RunRecord   poll until the run is final
    watcher_running(ctx) -> bool                             is an `orch watch` holding the lock

`Poller` keeps each target's connection open between polls (the watcher holds one for its whole
life). A poll has a deadline covering connect + command; past it, or on any transport error, the
connection is dropped and rebuilt later with exponential backoff and jitter. While a target is
backing off it is not contacted, but its runs still go through the state machine as
unreachable, so the unreachable alert escalates on time.

`unreachable` and `reachable` alerts are about a box, not a run: the runs' alerts of one poll
are merged into ONE per target (`@<target>/<kind>/<episode start>`), stored with the runs'
changes in one transaction. So a target that answers again after an outage it paged about
sends one "reachable again" alert, and only if a run on it is still going (runs that ended
meanwhile send their own final alert instead; see `statemachine._reachable_alert`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.alerturls import Redactor
from orchestrator.monitor import alerts as alerts_mod
from orchestrator.monitor import ledger
from orchestrator.monitor.lock import watcher_running
from orchestrator.monitor.push import attach
from orchestrator.monitor.statemachine import Alert, Limits, RunState, transition
from orchestrator.targets.factory import make_target
from state.errors import HostKeyError, OrchError, StageError, UnreachableError
from state.models import RunRecord, TargetObservation
from state.protocol import MAX_STATUS_BYTES

#: A target's row (disk, GPUs, last seen) is rewritten at most this often from pushed lines.
TARGET_ROW_EVERY_S = 2.0

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.monitor.push import PushHub
    from orchestrator.targets.base import Target

__all__ = [
    "Poller",
    "limits_for",
    "merge_target_alerts",
    "refresh_once",
    "wait_for_run",
    "watcher_running",
]

log = logging.getLogger("orch.monitor")

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def limits_for(ctx: Context, rec: RunRecord) -> Limits:
    """A run's thresholds: its stage spec (timeout, stale limit), then `[monitor]` of orch.toml
    (per target) which may override the stale limit."""
    mon = ctx.config.monitor_for(rec.target)
    spec: dict[str, Any] = {}
    if rec.spec_json:
        try:
            spec = json.loads(rec.spec_json)
        except ValueError:
            spec = {}
    stale = mon.stale_after_s or float(spec.get("stale_after_s") or 300.0)
    return Limits(
        stale_after_s=stale,
        timeout_s=float(spec.get("timeout_s") or 9 * 3600.0),
        unreachable_alert_after_s=mon.unreachable_alert_after_s,
        # The wrapper writes exit_code right after the process ends; give it about two polls.
        exit_grace_s=max(3.0, 1.5 * mon.interval_s),
    )


#: Alerts about a whole target: merged into one per target and episode.
TARGET_ALERTS = ("unreachable", "reachable")


def merge_target_alerts(
    target: str, kind: str, parts: list[tuple[RunState, RunState, Alert]]
) -> tuple[Alert, list[str]]:
    """One `unreachable`/`reachable` alert for a target from its runs' (prev, new, alert) of
    one poll, and the runs it covers (pure). A box going silent or answering again is one
    page, not one per run on it. Keyed by the episode, `@<target>/<kind>/<earliest
    unreachable_since>`, so a watcher restarted before the change was stored derives the same
    key (and the store records it once); the reason is that of the longest-silent run."""
    if not parts:
        raise ValueError("merge_target_alerts needs at least one run")

    def since(part: tuple[RunState, RunState, Alert]) -> datetime:
        prev, new, _ = part
        at = new.unreachable_since or prev.unreachable_since
        assert at is not None  # both kinds are made only inside an outage episode
        return at

    earliest = min(parts, key=since)
    first = parts[0][2]
    merged = Alert(
        kind=kind,
        dedup_key=f"@{target}/{kind}/{since(earliest).isoformat()}",
        stage=first.stage if len(parts) == 1 else f"{len(parts)} runs",
        stage_dir=first.stage_dir,
        run_id=first.run_id,
        target=target,
        phase=first.phase,
        reason=earliest[2].reason,
        step=first.step,
        total_steps=first.total_steps,
        loss=first.loss,
    )
    return merged, [f"{new.stage_dir}/{new.run_id}" for _, new, _ in parts]


@dataclass(frozen=True)
class _Grouped:
    """A run whose transition carries a target-level alert, waiting for the per-target merge."""

    prev: RunState
    new: RunState
    alert: Alert  # the run's unreachable/reachable alert
    own: list[Alert]  # the run's other alerts (e.g. `hung` seen as the box answers again)
    status_json: str | None


@dataclass
class _Link:
    """A target's connection state between polls."""

    target: Target | None = None
    failures: int = 0
    next_try: float = 0.0  # monotonic
    last_error: str = ""
    refused: HostKeyError | None = None  # the last try met a changed host key
    lock: threading.Lock = field(default_factory=threading.Lock)


class Poller:
    """Polls targets through their agents. Thread-safe: one lock per target, so the scheduler's
    per-target jobs run in parallel but never two polls of one target at once."""

    def __init__(
        self,
        ctx: Context,
        *,
        deliver: bool = True,
        on_final: Callable[[RunRecord], None] | None = None,
        provider_verdict: Callable[[str], str | None] | None = None,
        on_change: Callable[[RunState, RunState], None] | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.ctx = ctx
        self.deliver = deliver
        self.on_final = on_final
        self.provider_verdict = provider_verdict
        self.on_change = on_change
        self.clock = clock
        self.round_trips = 0  # remote requests made (the benchmark checks: one per target per poll)
        self._links: dict[str, _Link] = {}
        self._links_lock = threading.Lock()
        self._redactor: Redactor | None = None
        #: pushed lines from the targets' agents (monitor/push.py `attach`); None: polls only
        self.push: PushHub | None = None
        self._target_written: dict[str, float] = {}  # target -> when its row was last written

    # -- connections ----------------------------------------------------------------------------
    def _link(self, name: str) -> _Link:
        with self._links_lock:
            return self._links.setdefault(name, _Link())

    def _drop(self, link: _Link, error: str, target: Target | None = None) -> None:
        """Close the connection and schedule the next try (exponential backoff, jitter)."""
        for t in {id(x): x for x in (link.target, target) if x is not None}.values():
            # Closing may itself hang on a frozen peer: do it off the polling thread.
            threading.Thread(target=_close_quietly, args=(t,), daemon=True).start()
        link.target = None
        link.failures += 1
        interval = self.ctx.config.monitor.interval_s
        cap = min(BACKOFF_CAP_S, max(2.0, 6 * interval))
        delay = min(cap, BACKOFF_BASE_S * 2 ** (link.failures - 1)) * random.uniform(0.5, 1.0)
        link.next_try = time.monotonic() + delay
        link.last_error = error

    def _request(self, name: str, link: _Link, payload: dict[str, Any]) -> TargetObservation | None:
        """One observe round trip under a hard deadline (connect + command); None = no answer."""
        if time.monotonic() < link.next_try:
            return None
        mon = self.ctx.config.monitor_for(name)
        # A backstop over the transport's own deadlines: connect, start the agent (a new remote
        # Python, itself a command) and answer. The transport normally gives up first.
        deadline = mon.connect_timeout_s + 2 * mon.command_timeout_s
        result: dict[str, Any] = {}
        guard = threading.Lock()
        abandoned = [False]
        current = link.target

        def work() -> None:
            t = current
            try:
                if t is None:
                    t = make_target(self.ctx, name)
                with guard:
                    result["target"] = t
                if self.push is not None:  # a `watch` where the agent can push
                    result["answer"] = self.push.request(name, t, payload, mon.command_timeout_s)
                else:
                    result["answer"] = t.agent().request(payload, timeout=mon.command_timeout_s)
            except BaseException as exc:  # reported to the polling thread below
                result["error"] = exc
            finally:
                with guard:
                    late = abandoned[0]
                if late and t is not None:
                    _close_quietly(t)  # the poller gave up on this connection meanwhile

        self.round_trips += 1
        th = threading.Thread(target=work, name=f"orch-poll-{name}", daemon=True)
        th.start()
        th.join(deadline)
        with guard:
            if th.is_alive():
                abandoned[0] = True
                stuck = result.get("target")
            else:
                stuck = None
        if th.is_alive():
            link.refused = None
            self._drop(link, f"no answer within {deadline:.0f} s", stuck)
            return None
        target = result.get("target")
        exc = result.get("error")
        link.refused = exc if isinstance(exc, HostKeyError) else None
        if exc is not None:
            if isinstance(exc, OrchError) and not isinstance(exc, UnreachableError):
                log.warning("target %s: %s", name, exc)
            self._drop(link, str(exc) or type(exc).__name__, target)
            return None
        answer = result.get("answer")
        if not isinstance(answer, dict) or answer.get("ok") is False:
            err = answer.get("error") if isinstance(answer, dict) else "no answer"
            self._drop(link, f"agent error: {err}", target)
            return None
        try:
            obs = TargetObservation.model_validate(answer)
        except ValueError as exc:
            self._drop(link, f"agent answer unusable: {exc}", target)
            return None
        link.target = target
        link.failures = 0
        link.next_try = 0.0
        link.last_error = ""
        return obs

    # -- polling ----------------------------------------------------------------------------------
    def poll_target(
        self, name: str, *, collect: bool = True, pushed: TargetObservation | None = None
    ) -> list[RunRecord]:
        """Poll one target: observe all its active runs in one request, apply the state machine,
        store, then deliver alerts and run completion hooks. Returns the polled runs as stored
        after the poll (nothing when `collect` is off: the watcher does not need them).
        `pushed`: an observation the target's agent pushed (monitor/push.py): judged exactly
        as a poll's answer, without a request; runs it leaves out are skipped."""
        link = self._link(name)
        with link.lock:
            pairs = ledger.load_states(self.ctx.store, targets=[name])
            if not pairs:
                return []
            payload = {
                "op": "observe",
                "runs": [
                    {
                        "run_dir": rec.run_dir,
                        "session": rec.session or None,
                        **({"job_id": rec.job_id} if rec.job_id else {}),
                    }
                    for rec, _ in pairs
                ],
                "gpus": True,
            }
            obs = pushed if pushed is not None else self._request(name, link, payload)
            now = self.clock()
            self._record_target(name, obs, now, link.last_error, pushed=pushed is not None)
            # A changed host key is not silence: it gets its own page at once (with the fix),
            # instead of an `unreachable` one later; the runs stay unjudged meanwhile.
            refused = link.refused if obs is None else None
            if refused is not None:
                self._host_key_alert(name, refused, [prev for _, prev in pairs])
            lost = None
            if obs is None and self.provider_verdict is not None:
                try:
                    lost = self.provider_verdict(name)
                except Exception as exc:  # a provider outage must not stop the watcher
                    log.warning("provider check of %s failed: %s", name, exc)
            by_dir = {r.run_dir: r for r in obs.runs} if obs is not None else {}
            finals: list[RunRecord] = []
            # Every run's own change in one transaction (one commit, one fsync per poll or
            # pushed line, not one per run).
            singles: list[ledger.Change] = []
            grouped: dict[str, list[_Grouped]] = {kind: [] for kind in TARGET_ALERTS}
            for rec, prev in pairs:
                run_obs = by_dir.get(rec.run_dir) if obs is not None else None
                if obs is not None and run_obs is None:
                    continue  # the agent skipped it: judge it next time rather than guess
                limits = limits_for(self.ctx, rec)
                if refused is not None:
                    limits = replace(limits, unreachable_alert_after_s=math.inf)
                new, alerts = transition(prev, run_obs, now, limits, provider_lost=lost)
                status_json = None
                if (
                    run_obs is not None
                    and run_obs.status is not None
                    # the final status too: it may carry what only the end says (the leak step)
                    and (run_obs.status.seq != prev.last_seq or new.phase.is_terminal)
                ):
                    status_json = run_obs.status.model_dump_json()
                    if len(status_json) > MAX_STATUS_BYTES:  # an old agent sent it uncapped
                        status_json = None
                shared = [a for a in alerts if a.kind in TARGET_ALERTS]
                if shared:
                    # Merged per target below (and never final: see statemachine).
                    own = [a for a in alerts if a.kind not in TARGET_ALERTS]
                    grouped[shared[0].kind].append(_Grouped(prev, new, shared[0], own, status_json))
                    continue
                singles.append((prev, new, [_with_text(a) for a in alerts], status_json))
            ledger.save_many(self.ctx.store, singles, [])
            for prev, new, _, _ in singles:
                self._changed(prev, new)
                if new.phase.is_terminal:
                    after = self.ctx.store.get_run(new.stage_dir, new.run_id)
                    if after is not None:
                        finals.append(after)
            for kind, items in grouped.items():
                self._save_merged(name, kind, items)
        if self.deliver:
            self.deliver_alerts()
        for rec in finals:
            if self.on_final is not None:
                try:
                    self.on_final(rec)
                except Exception as exc:  # actions report their own errors; never stop polling
                    log.warning("completion action for %s failed: %s", rec.key, exc)
        if not collect:
            return []
        out = [self.ctx.store.get_run(rec.stage_dir, rec.run_id) for rec, _ in pairs]
        return [r for r in out if r is not None]

    def _host_key_alert(self, name: str, exc: HostKeyError, runs: list[RunState]) -> None:
        """Record one `host_key` alert per target and offered key (a restarted watcher, or the
        same wrong key seen for hours, records nothing new; another new key is a new alert)."""
        first = runs[0]
        offered = exc.offered or hashlib.sha256(exc.message.encode()).hexdigest()[:16]
        alert = Alert(
            kind="host_key",
            dedup_key=f"@{name}/host_key/{offered}",
            stage=first.stage if len(runs) == 1 else f"{len(runs)} runs",
            stage_dir=first.stage_dir,
            run_id=first.run_id,
            target=name,
            phase=first.phase.value,
            reason=exc.message,
            extra={"fix": exc.hint or "drop the old pin only once you know why the key changed"},
        )
        ledger.record_alerts(self.ctx.store, [_with_text(alert, runs=[r.key for r in runs])])

    def _save_merged(self, name: str, kind: str, items: list[_Grouped]) -> None:
        """Store the runs' changes and their one merged target alert in one transaction."""
        if not items:
            return
        merged, runs = merge_target_alerts(name, kind, [(g.prev, g.new, g.alert) for g in items])
        ledger.save_many(
            self.ctx.store,
            [(g.prev, g.new, [_with_text(a) for a in g.own], g.status_json) for g in items],
            [_with_text(merged, runs=runs)],
        )
        for g in items:
            self._changed(g.prev, g.new)

    def _changed(self, prev: RunState, new: RunState) -> None:
        if self.on_change is None:
            return
        if (
            new.phase != prev.phase
            or (new.unreachable_since is None) != (prev.unreachable_since is None)
            or new.unreachable_alerted != prev.unreachable_alerted
        ):
            try:
                self.on_change(prev, new)
            except Exception as exc:
                log.debug("on_change hook failed: %s", exc)

    def _record_target(
        self,
        name: str,
        obs: TargetObservation | None,
        now: datetime,
        error: str,
        *,
        pushed: bool = False,
    ) -> None:
        try:
            kind = (
                self.ctx.config.targets[name].kind if name in self.ctx.config.targets else "unknown"
            )
            if obs is not None:
                # A pushed line every second need not rewrite the target's row each time: its
                # disk, GPUs and last-seen are shown to the second, not to the line.
                mono = time.monotonic()
                last = self._target_written.get(name, -math.inf)
                if pushed and mono - last < TARGET_ROW_EVERY_S:
                    return
                self._target_written[name] = mono
                box = obs.model_dump(mode="json", exclude={"runs"})
                self.ctx.store.upsert_target(
                    name,
                    kind,
                    reachable=True,
                    unreachable_since=None,
                    last_seen_at=now,
                    last_obs_json=json.dumps(box),
                )
            else:
                self._target_written.pop(name, None)
                row = self.ctx.store.get_target(name) or {}
                since = row.get("unreachable_since") or now
                self.ctx.store.upsert_target(name, kind, reachable=False, unreachable_since=since)
        except Exception as exc:  # bookkeeping only
            log.debug("could not record target %s: %s (%s)", name, exc, error)

    def deliver_alerts(self) -> alerts_mod.DeliveryReport:
        settings = self.ctx.config.alerts
        if self._redactor is None:
            self._redactor = Redactor(settings.urls)
        return alerts_mod.deliver_pending(self.ctx.store, settings, redactor=self._redactor)

    def poll(self, targets: Iterable[str] | None = None) -> list[RunRecord]:
        """Poll every target that has active runs (or just `targets`), one after another."""
        names = ledger.active_targets(self.ctx.store)
        if targets is not None:
            wanted = set(targets)
            names = [n for n in names if n in wanted]
        out: list[RunRecord] = []
        for name in names:
            out += self.poll_target(name)
        return out

    def link_error(self, name: str) -> str:
        return self._link(name).last_error

    def close(self) -> None:
        if self.push is not None:
            self.push.close()
        with self._links_lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            if link.target is not None:
                _close_quietly(link.target)
                link.target = None


def _close_quietly(target: Target) -> None:
    try:
        target.close()
    except Exception as exc:
        log.debug("closing %s: %s", getattr(target, "name", "?"), exc)


def _with_text(
    alert: Alert, *, runs: list[str] | None = None
) -> tuple[Alert, str, str, dict[str, Any]]:
    payload = alerts_mod.alert_payload(alert, runs=runs)
    title, body = alerts_mod.format_alert(payload)
    return alert, title, body, payload


def refresh_once(ctx: Context, targets: list[str] | None = None) -> list[RunRecord]:
    """One poll of every target with active runs (or only `targets`): store phase changes and
    alerts, deliver alerts. Returns the runs that were polled (those active before the poll) as
    the store now holds them."""
    # lazy, for start-up time: only this path needs orchestrator.monitor.actions
    from orchestrator.monitor.actions import Actions

    # The provider verdict lets a one-shot refresh (`orch status`) mark a preempted box's runs
    # lost, as `orch watch` does; it costs nothing for targets that are not vast.
    poller = Poller(ctx, provider_verdict=Actions(ctx).provider_verdict)
    try:
        return poller.poll(targets)
    finally:
        poller.close()


def wait_for_run(
    ctx: Context,
    stage_dir: str,
    run_id: str,
    *,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    on_poll: Callable[[RunRecord], None] | None = None,
) -> RunRecord:
    """Block until the run reaches a final phase and return it. When an `orch watch` is running
    this only reads the store (the watcher polls); otherwise it polls the run's target itself.
    `on_poll(rec)` sees the record after every poll (live progress).
    StageError if the run is unknown or `timeout_s` passes first."""
    rec = ctx.store.get_run(stage_dir, run_id)
    if rec is None:
        raise StageError(f"no run {stage_dir}/{run_id} in the store", hint="see `orch status`")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    poller: Poller | None = None
    full_at = 0.0  # while the target pushes, a full poll only now and then
    live = False
    try:
        while True:
            if not rec.phase.is_terminal:
                live = watcher_running(ctx)
                if live:
                    if poller is not None:
                        poller.close()
                        poller = None
                else:
                    if poller is None:
                        poller = Poller(ctx)
                        attach(poller)  # pushed lines update the store as they arrive
                    pushing = poller.push is not None and poller.push.active(rec.target)
                    if not pushing or time.monotonic() >= full_at:
                        poller.poll_target(rec.target)
                        full_at = time.monotonic() + ctx.config.monitor_for(rec.target).push_poll_s
                    live = pushing
            got = ctx.store.get_run(stage_dir, run_id)
            if got is None:
                raise StageError(f"run {stage_dir}/{run_id} disappeared from the store")
            rec = got
            if on_poll is not None:
                on_poll(rec)
            if rec.phase.is_terminal:
                return rec
            if deadline is not None and time.monotonic() >= deadline:
                raise StageError(
                    f"run {stage_dir}/{run_id} is still {rec.phase.value} after {timeout_s:.0f} s",
                    hint=f"keep watching with `orch watch`, or see `orch logs {stage_dir}/{run_id}`",
                )
            # The store moves as pushes arrive (here or in a watcher): read it more often.
            time.sleep(min(poll_s, 0.5) if live else poll_s)
    finally:
        if poller is not None:
            poller.close()
