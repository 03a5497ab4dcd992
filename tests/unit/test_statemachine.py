"""Table-driven tests of the monitor's pure state machine: every transition of DESIGN.md."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.monitor.statemachine import Limits, RunState, describe_exit, transition
from state.models import RunFailed, RunObservation, RunStatus
from state.phases import Phase

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
LIM = Limits(stale_after_s=60, timeout_s=3600, unreachable_alert_after_s=120, exit_grace_s=6)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def state(**kw: object) -> RunState:
    base = RunState(
        stage_dir="s1",
        run_id="20260101-120000",
        stage="stage1",
        target="box",
        phase=Phase.RUNNING,
        started_at=T0,
        session="orch-stage1-20260101-120000",
        run_dir="runs/s1/20260101-120000",
        last_seq=5,
        last_seq_change_at=T0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def status(seq: int, **kw: object) -> RunStatus:
    return RunStatus(run_id="20260101-120000", stage="stage1", seq=seq, **kw)  # type: ignore[arg-type]


def obs(**kw: object) -> RunObservation:
    base: dict[str, object] = {
        "run_dir": "runs/s1/20260101-120000",
        "status": status(5),
        "status_state": "ok",
        "session_alive": True,
        "pid_alive": True,
    }
    base.update(kw)
    return RunObservation(**base)  # type: ignore[arg-type]


GONE = {"session_alive": False, "pid_alive": False}

# (name, previous state, observation, seconds after T0, expected phase, alert kinds, reason contains)
CASES = [
    (
        "alive, seq moves: running",
        state(),
        obs(status=status(6, step=10, loss=1.5)),
        30,
        Phase.RUNNING,
        [],
        "",
    ),
    ("seq unchanged, under stale limit", state(), obs(), 59, Phase.RUNNING, [], ""),
    (
        "seq unchanged past stale limit: hung",
        state(),
        obs(),
        61,
        Phase.HUNG,
        ["hung"],
        "no progress",
    ),
    ("hung stays hung, no second alert", state(phase=Phase.HUNG), obs(), 200, Phase.HUNG, [], ""),
    (
        "hung recovers when seq moves",
        state(phase=Phase.HUNG, reason="x"),
        obs(status=status(9)),
        200,
        Phase.RUNNING,
        [],
        "",
    ),
    (
        "success: marker + manifest + exit 0",
        state(),
        obs(complete=True, manifest_present=True, exit_code=0, **GONE),
        10,
        Phase.SUCCEEDED,
        ["succeeded"],
        "",
    ),
    (
        "exit 0 without marker is not success",
        state(),
        obs(exit_code=0, **GONE),
        10,
        Phase.FAILED,
        ["failed"],
        "without writing .run_complete",
    ),
    (
        "marker without manifest",
        state(),
        obs(complete=True, exit_code=0, **GONE),
        10,
        Phase.FAILED,
        ["failed"],
        "without manifest",
    ),
    (
        "marker but non-zero exit",
        state(),
        obs(complete=True, manifest_present=True, exit_code=1, **GONE),
        10,
        Phase.FAILED,
        ["failed"],
        "exit code 1",
    ),
    (
        "marker, exit code not written yet: wait",
        state(),
        obs(complete=True, manifest_present=True, **GONE),
        10,
        Phase.RUNNING,
        [],
        "",
    ),
    (
        "run_failed carries the reason",
        state(),
        obs(
            failed_marker=True,
            failed=RunFailed(run_id="r", reason="CUDA OOM at step 3"),
            exit_code=1,
            **GONE,
        ),
        10,
        Phase.FAILED,
        ["failed"],
        "CUDA OOM at step 3",
    ),
    (
        "run_failed while process still exiting: wait for its exit code",
        state(),
        obs(failed_marker=True, failed=RunFailed(run_id="r", reason="bad data")),
        10,
        Phase.RUNNING,
        [],
        "",
    ),
    (
        "run_failed, process still there past the exit grace: failed anyway",
        state(gone_since=T0 + timedelta(seconds=2)),
        obs(failed_marker=True, failed=RunFailed(run_id="r", reason="bad data")),
        10,
        Phase.FAILED,
        ["failed"],
        "bad data",
    ),
    (
        "non-zero exit without marker: failed",
        state(),
        obs(exit_code=2, **GONE),
        10,
        Phase.FAILED,
        ["failed"],
        "exit code 2",
    ),
    (
        "kill -9: crashed at once (exit 137)",
        state(),
        obs(exit_code=137, **GONE),
        10,
        Phase.CRASHED,
        ["crashed"],
        "SIGKILL",
    ),
    ("gone, no exit code, within grace: wait", state(), obs(**GONE), 10, Phase.RUNNING, [], ""),
    (
        "gone past grace: crashed",
        state(gone_since=at(4)),
        obs(**GONE),
        11,
        Phase.CRASHED,
        ["crashed"],
        "tmux session gone",
    ),
    (
        "pid gone but tmux session alive: not crashed",
        state(),
        obs(session_alive=True, pid_alive=False),
        10,
        Phase.RUNNING,
        [],
        "",
    ),
    (
        "past the stage timeout: timed_out",
        state(),
        obs(status=status(6)),
        3601,
        Phase.TIMED_OUT,
        ["timed_out"],
        "timeout",
    ),
    (
        "success beats timeout",
        state(),
        obs(complete=True, manifest_present=True, exit_code=0, **GONE),
        4000,
        Phase.SUCCEEDED,
        ["succeeded"],
        "",
    ),
    ("unreachable: overlay only", state(), None, 10, Phase.RUNNING, [], ""),
    (
        "unreachable past its limit: one alert",
        state(unreachable_since=at(0)),
        None,
        121,
        Phase.RUNNING,
        ["unreachable"],
        "",
    ),
    (
        "unreachable already alerted: silent",
        state(unreachable_since=at(0), unreachable_alerted=True),
        None,
        500,
        Phase.RUNNING,
        [],
        "",
    ),
    (
        "unreachable past the timeout is not timed_out",
        state(unreachable_since=at(3000)),
        None,
        3700,
        Phase.RUNNING,
        ["unreachable"],
        "",
    ),
    (
        "unreachable hung run is not crashed",
        state(phase=Phase.HUNG, unreachable_since=at(0), unreachable_alerted=True),
        None,
        900,
        Phase.HUNG,
        [],
        "",
    ),
    (
        "garbage status.json: unknown, not crash",
        state(),
        obs(status=None, status_state="unreadable"),
        30,
        Phase.RUNNING,
        [],
        "unreadable",
    ),
    (
        "newer-schema status.json: unknown",
        state(),
        obs(status=None, status_state="newer_schema"),
        30,
        Phase.RUNNING,
        [],
        "newer orch",
    ),
    # Issue 13, defect 5: an unreadable status proves no progress; the stale clock runs on.
    (
        "garbage status.json past the stale limit: hung",
        state(),
        obs(status=None, status_state="unreadable"),
        500,
        Phase.HUNG,
        ["hung"],
        "status.json unreadable",
    ),
    (
        "newer-schema status.json past the stale limit: hung",
        state(),
        obs(status=None, status_state="newer_schema"),
        500,
        Phase.HUNG,
        ["hung"],
        "newer orch",
    ),
    (
        "unreadable from the first sight, alive past the stale limit: hung",
        state(last_seq=None, last_seq_change_at=at(0)),
        obs(status=None, status_state="unreadable"),
        61,
        Phase.HUNG,
        ["hung"],
        "no progress for 61 s (status.json unreadable)",
    ),
    (
        "missing status while alive past stale: hung",
        state(last_seq=None, last_seq_change_at=None),
        obs(status=None, status_state="missing"),
        0,
        Phase.RUNNING,
        [],
        "",
    ),
    (
        "cancel requested and process gone: cancelled, silent",
        state(cancel_requested=True),
        obs(exit_code=143, **GONE),
        10,
        Phase.CANCELLED,
        [],
        "stopped",
    ),
    (
        "terminal stays terminal",
        state(phase=Phase.CRASHED),
        obs(status=status(99)),
        10,
        Phase.CRASHED,
        [],
        "",
    ),
]


@pytest.mark.parametrize(
    ("name", "prev", "observation", "secs", "phase", "kinds", "reason"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_transition(
    name: str,
    prev: RunState,
    observation: RunObservation | None,
    secs: float,
    phase: Phase,
    kinds: list[str],
    reason: str,
) -> None:
    new, alerts = transition(prev, observation, at(secs), LIM)
    assert new.phase is phase, name
    assert [a.kind for a in alerts] == kinds, name
    assert reason in new.reason or any(reason in a.reason for a in alerts), (name, new.reason)


def test_lost_from_provider_verdict_wins() -> None:
    new, alerts = transition(state(), None, at(10), LIM, provider_lost="instance 42 preempted")
    assert new.phase is Phase.LOST
    assert [a.kind for a in alerts] == ["lost"]
    assert "preempted" in alerts[0].reason


def test_progress_is_folded_in_and_restarts_the_stale_clock() -> None:
    new, _ = transition(
        state(), obs(status=status(6, step=40, total_steps=100, loss=0.75)), at(50), LIM
    )
    assert (new.last_seq, new.step, new.total_steps, new.loss) == (6, 40, 100, 0.75)
    assert new.last_seq_change_at == at(50)
    # 50 s later without movement: still under the 60 s stale limit counted from the move.
    again, alerts = transition(new, obs(status=status(6)), at(100), LIM)
    assert again.phase is Phase.RUNNING and alerts == []


def test_box_clock_is_never_compared_with_ours() -> None:
    # The box's updated_at is a year off; only seq counts.
    skewed = status(6, updated_at=T0 - timedelta(days=365))
    new, alerts = transition(state(), obs(status=skewed), at(30), LIM)
    assert new.phase is Phase.RUNNING and alerts == []
    frozen = status(5, updated_at=T0 + timedelta(days=365))
    new, alerts = transition(state(), obs(status=frozen), at(61), LIM)
    assert new.phase is Phase.HUNG


def test_missing_status_counts_from_first_sight() -> None:
    prev = state(last_seq=None, last_seq_change_at=None)
    first, _ = transition(prev, obs(status=None, status_state="missing"), at(0), LIM)
    assert first.last_seq_change_at == at(0)
    later, alerts = transition(first, obs(status=None, status_state="missing"), at(61), LIM)
    assert later.phase is Phase.HUNG and [a.kind for a in alerts] == ["hung"]


def test_unreachable_then_back_clears_the_overlay() -> None:
    down, _ = transition(state(), None, at(10), LIM)
    assert down.unreachable_since == at(10)
    alerted, alerts = transition(down, None, at(200), LIM)
    assert alerted.unreachable_alerted and [a.kind for a in alerts] == ["unreachable"]
    back, alerts = transition(alerted, obs(status=status(7)), at(210), LIM)
    assert (
        back.phase is Phase.RUNNING
        and back.unreachable_since is None
        and not back.unreachable_alerted
    )
    assert [a.kind for a in alerts] == ["reachable"]  # the page said "unreachable": say "back"
    again, alerts = transition(back, obs(status=status(8)), at(215), LIM)
    assert again.phase is Phase.RUNNING and alerts == []  # once per episode


ALERTED = {"unreachable_since": at(0), "unreachable_alerted": True}

# "Reachable again": (name, previous state, observation, seconds after T0, expected phase,
# alert kinds, text in the reachable alert's reason or "" when none is expected)
REACHABLE_CASES = [
    (
        "back before the unreachable alert was sent: silent",
        state(unreachable_since=at(0)),
        obs(status=status(6)),
        60,
        Phase.RUNNING,
        [],
        "",
    ),
    (
        "back after an alerted outage: one reachable alert saying how long",
        state(**ALERTED),
        obs(status=status(6)),
        305,
        Phase.RUNNING,
        ["reachable"],
        "answers again after 5m05s of silence",
    ),
    (
        "back after a short alerted outage: seconds",
        state(**ALERTED),
        obs(status=status(6)),
        42,
        Phase.RUNNING,
        ["reachable"],
        "after 42 s of silence",
    ),
    (
        "back after hours: the span in hours",
        state(started_at=at(7000), last_seq_change_at=at(7600), **ALERTED),
        obs(status=status(6)),
        2 * 3600 + 7 * 60,
        Phase.RUNNING,
        ["reachable"],
        "after 2h07m of silence",
    ),
    (
        "back past the stage timeout: timed_out alone",
        state(**ALERTED),
        obs(status=status(6)),
        2 * 3600 + 7 * 60,
        Phase.TIMED_OUT,  # past the 3600 s stage timeout: final, so its own alert says it
        ["timed_out"],
        "",
    ),
    (
        "crashed while unreachable: the crash alert alone",
        state(**ALERTED),
        obs(exit_code=137, **GONE),
        300,
        Phase.CRASHED,
        ["crashed"],
        "",
    ),
    (
        "succeeded while unreachable: the success alert alone",
        state(**ALERTED),
        obs(complete=True, manifest_present=True, exit_code=0, **GONE),
        300,
        Phase.SUCCEEDED,
        ["succeeded"],
        "",
    ),
    (
        "stopped by the user while unreachable: cancelled, silent",
        state(cancel_requested=True, **ALERTED),
        obs(exit_code=143, **GONE),
        300,
        Phase.CANCELLED,
        [],
        "",
    ),
    (
        "back but no progress since before the outage: reachable, then hung",
        state(**ALERTED),
        obs(status=status(5)),
        300,
        Phase.HUNG,
        ["reachable", "hung"],
        "after 5m00s",
    ),
    (
        "back, process gone, within the exit grace: reachable (the verdict comes next poll)",
        state(**ALERTED),
        obs(**GONE),
        300,
        Phase.RUNNING,
        ["reachable"],
        "after 5m00s",
    ),
    (
        "still silent after the alert: nothing",
        state(**ALERTED),
        None,
        300,
        Phase.RUNNING,
        [],
        "",
    ),
]


@pytest.mark.parametrize(
    ("name", "prev", "observation", "secs", "phase", "kinds", "reason"),
    REACHABLE_CASES,
    ids=[c[0] for c in REACHABLE_CASES],
)
def test_reachable_again(
    name: str,
    prev: RunState,
    observation: RunObservation | None,
    secs: float,
    phase: Phase,
    kinds: list[str],
    reason: str,
) -> None:
    new, alerts = transition(prev, observation, at(secs), LIM)
    assert new.phase is phase, name
    assert [a.kind for a in alerts] == kinds, name
    back = [a for a in alerts if a.kind == "reachable"]
    if back:
        assert reason and reason in back[0].reason and "'box'" in back[0].reason, back[0].reason
        assert back[0].dedup_key == "s1/20260101-120000/reachable/" + at(0).isoformat()
    if observation is not None:
        assert new.unreachable_since is None and not new.unreachable_alerted, name


def test_reachable_key_is_the_same_when_recomputed_after_a_restart() -> None:
    """A watcher killed before it stored the change polls again from the same stored state,
    later: the alert it derives has the same key (so the store records it once)."""
    prev = state(**ALERTED)
    _, first = transition(prev, obs(status=status(6)), at(300), LIM)
    _, again = transition(prev, obs(status=status(9)), at(340), LIM)
    assert [a.kind for a in first] == [a.kind for a in again] == ["reachable"]
    assert first[0].dedup_key == again[0].dedup_key
    # A later outage of the same run is a new episode: a new key.
    down, _ = transition(
        replace(prev, unreachable_since=None, unreachable_alerted=False), None, at(400), LIM
    )
    down, up = transition(down, None, at(600), LIM)
    _, later = transition(down, obs(status=status(10)), at(610), LIM)
    assert [a.kind for a in up] == ["unreachable"] and [a.kind for a in later] == ["reachable"]
    assert later[0].dedup_key != first[0].dedup_key
    assert later[0].dedup_key.endswith(at(400).isoformat())


def test_dedup_keys_name_the_change_and_the_episode() -> None:
    _, a = transition(state(), obs(exit_code=137, **GONE), at(5), LIM)
    assert a[0].dedup_key == "s1/20260101-120000/crashed"
    _, h1 = transition(state(last_seq=5), obs(status=status(5)), at(61), LIM)
    _, h2 = transition(state(last_seq=9), obs(status=status(9)), at(61), LIM)
    assert h1[0].dedup_key != h2[0].dedup_key  # a second hang is a new alert
    _, u = transition(state(unreachable_since=at(0)), None, at(130), LIM)
    assert u[0].dedup_key.startswith("s1/20260101-120000/unreachable/")
    assert a[0].logs_command == "orch logs s1/20260101-120000"


def test_alert_carries_progress() -> None:
    prev = state(step=12, total_steps=50, loss=0.9)
    _, alerts = transition(
        prev,
        obs(status=status(6, step=13, total_steps=50, loss=0.8), exit_code=137, **GONE),
        at(5),
        LIM,
    )
    assert (alerts[0].step, alerts[0].total_steps, alerts[0].loss) == (13, 50, 0.8)
    assert (alerts[0].stage, alerts[0].target, alerts[0].phase) == ("stage1", "box", "crashed")


@pytest.mark.parametrize(
    ("code", "text"), [(137, "SIGKILL"), (143, "SIGTERM"), (-9, "SIGKILL"), (3, "exit code 3")]
)
def test_describe_exit(code: int, text: str) -> None:
    assert text in describe_exit(code)
