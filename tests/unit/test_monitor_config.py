"""Per-target and per-stage monitor settings: thresholds a run is judged by, and the actions
the config asks for when it ends."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from orchestrator.context import Context
from orchestrator.monitor import ledger
from orchestrator.monitor.actions import MAX_ATTEMPTS, wanted_actions
from orchestrator.monitor.refresh import limits_for
from orchestrator.monitor.watch import actions_left
from state.models import RunRecord
from state.phases import Phase

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
TOML = """
[monitor]
interval_s = 4
unreachable_alert_after_s = 90

[targets.box]
kind = "ssh"
host = "127.0.0.1"

[targets.box.monitor]
stale_after_s = 42
interval_s = 10
stop_on_timeout = true
pull_on_failure = true
launch_next_stage = true
"""


def _ctx(tmp_path: Path) -> Context:
    (tmp_path / "orch.toml").write_text(TOML)
    return Context(cwd=tmp_path)


def _rec(target: str, phase: Phase = Phase.RUNNING, **spec: float) -> RunRecord:
    return RunRecord(
        run_id="20260101-000000",
        stage="stage1",
        stage_dir="s1",
        target=target,
        phase=phase,
        session="orch-stage1-20260101-000000",
        run_dir="runs/s1/20260101-000000",
        created_at=T0,
        updated_at=T0,
        spec_json=json.dumps(spec),
    )


def test_limits_come_from_the_stage_spec_and_the_target(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    local = limits_for(ctx, _rec("local", timeout_s=1234, stale_after_s=77))
    assert (local.timeout_s, local.stale_after_s, local.unreachable_alert_after_s) == (1234, 77, 90)
    assert local.exit_grace_s == 6.0  # 1.5 polls of 4 s
    box = limits_for(ctx, _rec("box", timeout_s=1234, stale_after_s=77))
    assert box.stale_after_s == 42  # the target's [monitor] overrides the stage's heartbeat limit
    assert box.exit_grace_s == 15.0
    assert limits_for(ctx, _rec("local")).timeout_s == 9 * 3600  # no spec: the seed's 9 h


def test_actions_follow_the_config(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    assert wanted_actions(ctx, _rec("local", Phase.SUCCEEDED)) == ["pull"]  # the default
    assert wanted_actions(ctx, _rec("local", Phase.CRASHED)) == []
    assert wanted_actions(ctx, _rec("local", Phase.TIMED_OUT)) == []
    assert wanted_actions(ctx, _rec("box", Phase.SUCCEEDED)) == ["pull", "next"]
    assert wanted_actions(ctx, _rec("box", Phase.CRASHED)) == ["pull"]
    assert wanted_actions(ctx, _rec("box", Phase.TIMED_OUT)) == ["stop", "pull"]
    assert wanted_actions(ctx, _rec("box", Phase.CANCELLED)) == []


def test_launch_watch_waits_for_completion_actions(tmp_path: Path) -> None:
    """`orch launch --watch` returns only once the ended runs' pulls and next stages are done
    (or have failed for good): returning earlier would cut them off mid-way."""
    ctx = _ctx(tmp_path)
    runs = {
        phase: RunRecord(**{**_rec("box", phase).model_dump(), "run_id": f"20260101-00000{i}"})
        for i, phase in enumerate((Phase.SUCCEEDED, Phase.CRASHED, Phase.RUNNING, Phase.CANCELLED))
    }
    for rec in runs.values():
        ctx.store.insert_run(rec)
    key = {p: (r.stage_dir, r.run_id) for p, r in runs.items()}
    ok = key[Phase.SUCCEEDED]
    assert not actions_left(ctx, [key[Phase.RUNNING], key[Phase.CANCELLED]])
    assert actions_left(ctx, [ok])  # pull and next to do
    ledger.record_action(ctx.store, *ok, "pull")
    assert actions_left(ctx, [ok])  # the next stage is still to launch
    ledger.record_action(ctx.store, *ok, "next")
    assert not actions_left(ctx, [ok])
    # pull_on_failure: a pull that keeps failing is retried while the results are on the box
    # (issue 13); `--watch` waits for it until its `pull_stuck` alert is due, or it is given up.
    crashed = key[Phase.CRASHED]
    t0 = datetime.now(timezone.utc)
    stuck_after = ctx.config.monitor_for("box").pull_stuck_alert_after_s
    for attempt in range(MAX_ATTEMPTS + 2):
        assert actions_left(ctx, [crashed], now=t0), attempt
        ledger.record_action(ctx.store, *crashed, "pull", error="box gone", at=t0)
    assert actions_left(ctx, [ok, crashed], now=t0)
    assert not actions_left(ctx, [ok, crashed], now=t0 + timedelta(seconds=stuck_after))
    ledger.record_action(ctx.store, *crashed, "pull", error="bad file", at=t0, gave_up=True)
    assert not actions_left(ctx, [ok, crashed], now=t0)
    ctx.close()


def test_poll_interval_takes_the_most_demanding_active_stage() -> None:
    from orchestrator.monitor.scheduler import MIN_POLL_S, poll_interval

    assert poll_interval(5.0, None) == 5.0
    assert poll_interval(5.0, 2.0) == 2.0
    assert poll_interval(5.0, 30.0) == 5.0  # a stage can ask for faster polls, never slower
    assert poll_interval(5.0, 0.01) == MIN_POLL_S


def test_a_fast_stage_speeds_up_its_target_while_it_runs(tmp_path: Path) -> None:
    """The watcher's poll job for a target follows its active runs' stages (store only)."""
    from orchestrator.monitor.scheduler import Watcher

    ctx = _ctx(tmp_path)
    slow = RunRecord(**{**_rec("box", stale_after_s=60).model_dump(), "run_id": "20260101-000001"})
    fast = RunRecord(**{**_rec("box", poll_interval_s=2).model_dump(), "run_id": "20260101-000002"})
    other = RunRecord(**{**_rec("local", poll_interval_s=3).model_dump(), "run_id": "20260101-3"})
    for rec in (slow, fast, other):
        ctx.store.insert_run(rec)
    assert ledger.active_poll_intervals(ctx.store) == {"box": 2.0, "local": 3.0}
    watcher = Watcher(ctx)
    try:

        def every(target: str) -> float:
            job = watcher.scheduler.get_job(f"poll:{target}")
            assert job is not None
            return float(job.trigger.interval.total_seconds())

        watcher.reconcile()
        assert every("box") == 2.0 and every("local") == 3.0
        # The fast stage ends: the box goes back to its own [targets.box.monitor] interval.
        ctx.store.update_run(fast.stage_dir, fast.run_id, phase=Phase.SUCCEEDED)
        assert ledger.active_poll_intervals(ctx.store) == {"box": None, "local": 3.0}
        watcher.reconcile()
        assert every("box") == 10.0 and every("local") == 3.0
        ctx.store.update_run(other.stage_dir, other.run_id, phase=Phase.FAILED)
        watcher.reconcile()
        assert watcher.scheduler.get_job("poll:local") is None  # nothing left to poll there
    finally:
        watcher.poller.close()
        ctx.close()
