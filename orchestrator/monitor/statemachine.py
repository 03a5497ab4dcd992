"""The run state machine: a pure function from (previous state, observation, now) to the new
state and the alerts that change deserves. No I/O, no clocks of its own: `now` is the laptop's
clock, passed in, and progress is judged by the worker's `seq` counter, never by comparing the
box's timestamps with ours.

Verdicts, in the order they are checked (the first that applies wins):

    lost        the provider says the instance is gone or was preempted
    (unreachable overlay)  no observation: keep the phase, start/continue the unreachable clock,
                escalate with one `unreachable` alert after `unreachable_alert_after_s`.
                Not hearing from a box is never a crash and never a timeout. When the box
                answers again after that alert, one `reachable` alert says how long it was
                silent (not for a run that turned final meanwhile: see `_reachable_alert`).
    cancelled   the user asked to stop and the process is gone
    succeeded   `.run_complete` + manifest + exit code 0 (all three)
    failed      `.run_failed`, or a non-zero exit code that is not a signal death, or exit 0
                without `.run_complete` (an exit 0 alone is not success)
    crashed     killed by a signal (exit code > 128), or process and tmux session both gone
                with no marker and no exit code for `exit_grace_s` (the wrapper writes
                `exit_code` just after the process exits: the grace avoids racing it)
    timed_out   still running past the stage timeout (measured from launch, laptop clock)
    hung        alive, `seq` unchanged for `stale_after_s`; back to running when `seq` moves.
                An unreadable/empty/newer-schema status.json does not stop this clock: it
                proves no progress (the clock runs from the last readable `seq` that moved)
    running     otherwise (an unreadable status.json is "unknown": it neither proves
                progress nor counts as a crash)
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace
from datetime import datetime

from state.models import RunObservation, RunRecord, RunStatus
from state.phases import Phase
from state.slurm import (
    SLURM_ACTIVE,
    SLURM_LOST,
    SLURM_TIMED_OUT,
    SLURM_WAITING,
    failed_upstream,
)

#: Slurm's reason for a job whose `afterok` upstream failed.
DEPENDENCY_NEVER = "DependencyNeverSatisfied"

#: Phases the monitor polls (earlier ones belong to `orch launch`, later ones are final).
MONITORED_PHASES = frozenset({Phase.QUEUED, Phase.RUNNING, Phase.HUNG})


@dataclass(frozen=True)
class Limits:
    """Thresholds for one run (from its stage spec, overridden by `[monitor]` in orch.toml)."""

    stale_after_s: float = 300.0
    timeout_s: float = 9 * 3600.0
    unreachable_alert_after_s: float = 120.0
    exit_grace_s: float = 6.0


@dataclass(frozen=True)
class RunState:
    """The controller's view of one run between two observations (what the store keeps)."""

    stage_dir: str
    run_id: str
    stage: str
    target: str
    phase: Phase
    started_at: datetime  # launch time, laptop clock: the timeout counts from here
    session: str = ""
    run_dir: str = ""
    reason: str = ""
    exit_code: int | None = None
    last_seq: int | None = None
    last_seq_change_at: datetime | None = None  # laptop clock when `seq` last moved
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    unreachable_since: datetime | None = None
    unreachable_alerted: bool = False
    # first poll that saw neither process nor session, or a .run_failed with no exit code yet
    gone_since: datetime | None = None
    cancel_requested: bool = False

    @property
    def key(self) -> str:
        return f"{self.stage_dir}/{self.run_id}"

    @classmethod
    def from_record(
        cls,
        rec: RunRecord,
        *,
        unreachable_alerted: bool = False,
        gone_since: datetime | None = None,
        cancel_requested: bool = False,
    ) -> RunState:
        return cls(
            stage_dir=rec.stage_dir,
            run_id=rec.run_id,
            stage=rec.stage,
            target=rec.target,
            phase=rec.phase,
            started_at=rec.created_at,
            session=rec.session,
            run_dir=rec.run_dir,
            reason=rec.reason,
            exit_code=rec.exit_code,
            last_seq=rec.last_seq,
            last_seq_change_at=rec.last_seq_change_at,
            step=rec.step,
            total_steps=rec.total_steps,
            loss=rec.loss,
            unreachable_since=rec.unreachable_since,
            unreachable_alerted=unreachable_alerted,
            gone_since=gone_since,
            cancel_requested=cancel_requested,
        )


@dataclass(frozen=True)
class Alert:
    """One alert: a state change worth telling the researcher about, once.

    `dedup_key` is unique per change: `stage_dir/run_id/phase` for final phases; hung,
    unreachable and reachable can happen more than once in a run, so their key names the episode
    (the `seq` that stalled, the time the box went quiet), which a restarted watcher derives
    identically.
    """

    kind: str  # a phase value, "unreachable" or "reachable"
    dedup_key: str
    stage: str
    stage_dir: str
    run_id: str
    target: str
    phase: str
    reason: str
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def logs_command(self) -> str:
        return f"orch logs {self.stage_dir}/{self.run_id}"


def _alert(state: RunState, kind: str, key_suffix: str = "") -> Alert:
    key = f"{state.stage_dir}/{state.run_id}/{kind}"
    if key_suffix:
        key += f"/{key_suffix}"
    return Alert(
        kind=kind,
        dedup_key=key,
        stage=state.stage,
        stage_dir=state.stage_dir,
        run_id=state.run_id,
        target=state.target,
        phase=state.phase.value,
        reason=state.reason,
        step=state.step,
        total_steps=state.total_steps,
        loss=state.loss,
    )


def _finish(state: RunState, phase: Phase, reason: str) -> tuple[RunState, list[Alert]]:
    new = replace(state, phase=phase, reason=reason, unreachable_since=None, gone_since=None)
    # The user stopped it: recorded, but nobody needs to be told.
    alerts = [] if phase is Phase.CANCELLED else [_alert(new, phase.value)]
    return new, alerts


def describe_exit(code: int) -> str:
    """`137` -> "killed by SIGKILL (exit 137; the OOM killer does this too)"."""
    signum = code - 128 if code > 128 else -code if code < 0 else 0
    if signum <= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = "; the OOM killer does this too" if signum == signal.SIGKILL else ""
    return f"killed by {name} (exit {code}{hint})"


def is_signal_exit(code: int) -> bool:
    return code > 128 or code < 0


def _with_progress(state: RunState, status: RunStatus | None, now: datetime) -> RunState:
    """Fold a readable status.json into the state; `seq` moving restarts the stale clock."""
    if status is None:
        if state.last_seq_change_at is None:
            return replace(state, last_seq_change_at=now)  # first sight starts the clock
        return state
    moved = state.last_seq is None or status.seq != state.last_seq
    loss = (
        status.loss
        if status.loss is not None
        else (status.losses[-1] if status.losses else state.loss)
    )
    return replace(
        state,
        last_seq=status.seq,
        last_seq_change_at=now
        if moved or state.last_seq_change_at is None
        else state.last_seq_change_at,
        step=status.step,
        total_steps=status.total_steps,
        loss=loss,
    )


def transition(
    prev: RunState,
    obs: RunObservation | None,
    now: datetime,
    limits: Limits,
    *,
    provider_lost: str | None = None,
) -> tuple[RunState, list[Alert]]:
    """The new state of a run and the alerts to send, from one observation.

    `obs` is None when the target did not answer (unreachable). `provider_lost` is the
    provider's reason when it says the instance is gone or preempted.
    """
    if prev.phase.is_terminal:
        return prev, []

    if provider_lost:
        return _finish(prev, Phase.LOST, f"instance lost: {provider_lost}")

    if obs is None:
        since = prev.unreachable_since or now
        state = replace(prev, unreachable_since=since)
        waited = (now - since).total_seconds()
        if not prev.unreachable_alerted and waited >= limits.unreachable_alert_after_s:
            state = replace(state, unreachable_alerted=True)
            alert = _alert(
                replace(state, reason=f"no answer from target {prev.target!r} for {waited:.0f} s"),
                "unreachable",
                since.isoformat(),
            )
            return state, [alert]
        return state, []

    new, alerts = _judge(prev, obs, now, limits)
    back = _reachable_alert(prev, new, now)
    return new, ([back, *alerts] if back is not None else alerts)


def _reachable_alert(prev: RunState, new: RunState, now: datetime) -> Alert | None:
    """The box answered after an outage someone was told about: say it is back, once.

    Only for an episode whose `unreachable` alert was recorded (`unreachable_alerted`): a box
    that comes back before anyone was paged stays silent. A run that turned final in this same
    observation (crashed, succeeded, ... while nobody could see) gets no `reachable` alert: its
    final alert already tells that the box answers, and a page saying "back" next to one saying
    "crashed" is noise. The per-target merge (refresh.py) therefore sends one `reachable` alert
    for a target only while at least one run on it is still going.

    The key names the episode (`.../reachable/<unreachable_since>`), as the unreachable alert's
    does, so a watcher restarted before the change was stored derives the same key again.
    """
    since = prev.unreachable_since
    if not prev.unreachable_alerted or since is None or new.phase.is_terminal:
        return None
    return _alert(
        replace(new, reason=silence_reason(prev.target, since, now)),
        "reachable",
        since.isoformat(),
    )


def silence_reason(target: str, since: datetime, now: datetime) -> str:
    """`target 'gpu1' answers again after 12m05s of silence`, counted from the first poll
    that got no answer."""
    return (
        f"target {target!r} answers again after {_span((now - since).total_seconds())} of silence"
    )


def _span(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _judge(
    prev: RunState, obs: RunObservation, now: datetime, limits: Limits
) -> tuple[RunState, list[Alert]]:
    """The verdict from an observation of a box that answered (see the module docstring)."""
    # The box answered: the unreachable overlay ends here.
    state = replace(prev, unreachable_since=None, unreachable_alerted=False)
    status = obs.status if obs.status_state == "ok" else None
    state = _with_progress(state, status, now)
    code = obs.exit_code
    if code is not None:
        state = replace(state, exit_code=code)

    # A process that is gone, as far as the box can tell (None = cannot tell).
    if obs.session_alive is None and obs.pid_alive is None:
        gone: bool | None = None
    else:
        gone = obs.session_alive is not True and obs.pid_alive is not True
    slurm_active = False
    if obs.slurm is not None:
        verdict = _judge_slurm(prev, state, obs, now, limits.exit_grace_s)
        if verdict is not None:
            return verdict
        # Slurm's word leaves it to the run dir: running, COMPLETED, or a job Slurm forgot.
        slurm_active = obs.slurm.state in SLURM_ACTIVE
        gone = None if obs.slurm.error else not slurm_active

    if prev.cancel_requested and (gone or code is not None):
        return _finish(state, Phase.CANCELLED, "stopped by the user")

    if obs.complete:
        if code == 0 and obs.manifest_present:
            return _finish(state, Phase.SUCCEEDED, "")
        if code is not None and code != 0:
            return _finish(
                state,
                Phase.FAILED,
                f".run_complete written but the process ended with {describe_exit(code)}",
            )
        if code == 0:
            return _finish(state, Phase.FAILED, ".run_complete written without manifest.json")
        # Marker but no exit code yet: the wrapper is about to write it; wait for the grace.

    if obs.failed_marker:
        if code is None and gone is False:
            # The worker wrote its reason and is exiting: give the wrapper a moment to record
            # the exit code (it tells a leak, 3, from bad input, 2), as for .run_complete.
            since = prev.gone_since or now
            if (now - since).total_seconds() < limits.exit_grace_s:
                return replace(state, gone_since=since), []
        why = (
            obs.failed.reason
            if obs.failed is not None and obs.failed.reason
            else ".run_failed written (unreadable reason)"
        )
        if code is not None and code != 0 and code not in (1,):
            why = f"{why} ({describe_exit(code)})"
        return _finish(state, Phase.FAILED, why)

    if code is not None and not obs.complete:
        if code == 0:
            return _finish(
                state, Phase.FAILED, "exited 0 without writing .run_complete (not a success)"
            )
        if is_signal_exit(code):
            return _finish(state, Phase.CRASHED, f"{describe_exit(code)}; no completion marker")
        return _finish(
            state, Phase.FAILED, f"{describe_exit(code)} without writing .run_failed; see the logs"
        )

    if gone:
        gone_since = prev.gone_since or now
        state = replace(state, gone_since=gone_since)
        if (now - gone_since).total_seconds() >= limits.exit_grace_s:
            what = (
                ".run_complete written but no exit code recorded"
                if obs.complete
                else "no marker, no exit code"
            )
            return _finish(state, Phase.CRASHED, f"process and tmux session gone; {what}")
        return state, []
    state = replace(state, gone_since=None)

    # Slurm enforces a job's own time limit (`--time`) and says TIMEOUT; time spent queued
    # must not count against it here.
    if not slurm_active and (now - state.started_at).total_seconds() >= limits.timeout_s:
        return _finish(
            state,
            Phase.TIMED_OUT,
            f"still running after the stage timeout of {limits.timeout_s:.0f} s",
        )

    # Unknown is not evidence of anything: an unreadable status neither proves progress nor
    # counts as a crash. But it proves no progress either, so the stale clock (last moved by a
    # readable `seq`) runs on whatever the file holds: garbage must not hide a hang.
    note = {
        "newer_schema": "status.json from a newer orch",
        "unreadable": "status.json unreadable",
    }.get(obs.status_state)
    assert state.last_seq_change_at is not None  # set by _with_progress
    quiet = (now - state.last_seq_change_at).total_seconds()
    if quiet >= limits.stale_after_s:
        if state.phase is Phase.HUNG:
            return state, []
        what = f"seq {state.last_seq}" if state.last_seq is not None else ""
        what = "; ".join(w for w in (what, note) if w) or "no status.json"
        state = replace(
            state, phase=Phase.HUNG, reason=f"no progress for {quiet:.0f} s ({what}); process alive"
        )
        return state, [
            _alert(
                state,
                Phase.HUNG.value,
                str(state.last_seq if state.last_seq is not None else "none"),
            )
        ]

    if obs.slurm is not None and obs.slurm.error and not slurm_active:
        return replace(state, reason=f"Slurm cannot tell: {obs.slurm.error}"), []
    if note:  # not stale yet: keep the phase, say why progress is not judged
        return replace(state, reason=f"progress unknown: {note}"), []
    if state.phase is not Phase.RUNNING or state.reason:
        state = replace(state, phase=Phase.RUNNING, reason="")
    return state, []


def _judge_slurm(
    prev: RunState, state: RunState, obs: RunObservation, now: datetime, grace_s: float
) -> tuple[RunState, list[Alert]] | None:
    """Slurm's verdict on a run's batch job, or None to let the run dir decide.

    A finished run dir (`.run_complete`, manifest, exit 0) is a success whatever the job's end
    looked like. Otherwise: PENDING (also after a requeue, which is not a crash) -> queued with
    Slurm's reason and the stale clock held; CANCELLED -> cancelled; TIMEOUT -> timed_out;
    NODE_FAIL/PREEMPTED -> lost; OUT_OF_MEMORY -> failed; FAILED -> failed with Slurm's reason
    when the run dir says nothing. While the job runs, a signal death in `exit_code` (the
    wrapper saw Slurm's SIGTERM) waits for Slurm's final word rather than read as a crash.
    A queued job that Slurm no longer lists while its run dir holds nothing at all never ran:
    `cancelled` after the grace (Slurm drops a pending array task cancelled with
    `scancel 12_1` from squeue at once, with no CANCELLED row), not a crash.
    """
    job = obs.slurm
    assert job is not None
    code = obs.exit_code
    if obs.complete and obs.manifest_present and code == 0:
        return None
    st = job.state
    if not job.error and not job.known and prev.phase is Phase.QUEUED and _untouched(obs):
        since = prev.gone_since or now
        if (now - since).total_seconds() < grace_s:
            return replace(state, gone_since=since), []
        if prev.cancel_requested:
            return _finish(state, Phase.CANCELLED, "stopped by the user (while queued)")
        return _finish(
            state,
            Phase.CANCELLED,
            f"never ran: Slurm job {job.job_id} left the queue with nothing in its run dir "
            "(cancelled in Slurm while pending?)",
        )
    if job.error or not job.known:
        return None
    if st in SLURM_WAITING:
        if prev.cancel_requested:
            return _finish(state, Phase.CANCELLED, "stopped by the user (while queued)")
        why = f"queued in Slurm ({job.reason or st.lower()})"
        if job.reason == DEPENDENCY_NEVER:  # a cluster without kill-on-invalid-dep
            why += f": upstream {', '.join(failed_upstream(job)) or '?'} did not succeed"
        if job.restarts:
            why += f"; requeued {job.restarts} time(s), not a crash"
        # Nothing runs yet: no progress is expected, so the stale clock starts only later.
        return replace(state, phase=Phase.QUEUED, reason=why, last_seq_change_at=now), []
    if st in SLURM_ACTIVE:
        if code is not None and is_signal_exit(code):
            return state, []  # ending under a Slurm signal: its final state says why
        return None
    if st == "CANCELLED" and job.reason == DEPENDENCY_NEVER and not prev.cancel_requested:
        # `--kill-on-invalid-dep=yes`: an upstream of the study's graph did not succeed
        upstream = ", ".join(failed_upstream(job)) or "an upstream job"
        return _finish(state, Phase.CANCELLED, f"never ran: upstream {upstream} did not succeed")
    if prev.cancel_requested or st == "CANCELLED":
        why = "stopped by the user" if prev.cancel_requested else "cancelled in Slurm (scancel)"
        return _finish(state, Phase.CANCELLED, why)
    if st in SLURM_TIMED_OUT:
        return _finish(state, Phase.TIMED_OUT, f"Slurm ended job {job.job_id} at its time limit")
    if st in SLURM_LOST:
        what = {"NODE_FAIL": "its node failed", "PREEMPTED": "it was preempted"}.get(
            st, "its node did not boot"
        )
        return _finish(state, Phase.LOST, f"Slurm job {job.job_id} {st}: {what}")
    if st == "OUT_OF_MEMORY":
        return _finish(state, Phase.FAILED, f"Slurm job {job.job_id} ran out of memory")
    if st == "FAILED" and not obs.failed_marker and code is None:
        exit_ = f", exit {job.exit_code}" if job.exit_code is not None else ""
        return _finish(
            state,
            Phase.FAILED,
            f"Slurm job {job.job_id} FAILED ({job.reason or 'no reason'}{exit_})",
        )
    return None  # COMPLETED, FAILED with a run dir that says more, or a state we do not know


def _untouched(obs: RunObservation) -> bool:
    """The run dir shows no sign that the worker or its wrapper ever started."""
    return (
        obs.exit_code is None
        and obs.status_state == "missing"
        and not obs.complete
        and not obs.failed_marker
        and not obs.manifest_present
    )
