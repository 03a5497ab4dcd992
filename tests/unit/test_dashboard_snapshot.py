"""Dashboard snapshot gathering from a real SQLite store, `orch status`, and the piped view."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import OrchConfig
from orchestrator.context import Context
from orchestrator.dashboard.app import Dashboard
from orchestrator.dashboard.snapshot import gather, redact
from state.models import GpuStat, RunRecord, RunStatus, TargetObservation
from state.phases import Phase
from state.store import Store

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def add_run(
    store: Store,
    run_id: str,
    phase: Phase,
    *,
    target: str = "local",
    age_min: float = 10,
    ended_min: float = 1,
    beat_s: float | None = 30,
    stale_s: float = 300,
    now: datetime | None = None,
    **kw: object,
) -> RunRecord:
    now = now or NOW
    status = RunStatus(
        run_id=run_id,
        stage="stage1",
        seq=5,
        step=10,
        total_steps=100,
        losses=[3.0, 2.5, 2.0],
        steps_per_s=4.0,
        tokens_per_s=1000.0,
    )
    rec = RunRecord(
        run_id=run_id,
        stage="stage1",
        stage_dir="stage1_causal",
        target=target,
        phase=phase,
        session=f"orch-stage1-{run_id}",
        run_dir=f"runs/stage1_causal/{run_id}",
        created_at=now - timedelta(minutes=age_min),
        updated_at=now - timedelta(minutes=ended_min),
        last_seq=5,
        last_seq_change_at=None if beat_s is None else now - timedelta(seconds=beat_s),
        step=10,
        total_steps=100,
        spec_json=json.dumps({"stale_after_s": stale_s}),
        status_json=status.model_dump_json(),
        **kw,  # type: ignore[arg-type]
    )
    store.insert_run(rec)
    with store.tx() as db:  # the history says it ended when `updated_at` says
        db.execute(
            "UPDATE phase_history SET at = ? WHERE stage_dir = ? AND run_id = ?",
            (rec.updated_at.isoformat(), rec.stage_dir, rec.run_id),
        )
    return rec


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.db")
    yield s  # type: ignore[misc]
    s.close()


def test_runs_carry_parsed_status_heartbeat_age_and_the_specs_stale_limit(store: Store) -> None:
    add_run(store, "20261125-100000", Phase.RUNNING, beat_s=90, stale_s=120)
    snap = gather(store, OrchConfig(), now=NOW)
    (run,) = snap.runs
    assert run.heartbeat_age_s(NOW) == pytest.approx(90)
    assert run.stale_after_s == 120
    assert run.losses == (3.0, 2.5, 2.0) and run.steps_per_s == 4.0 and run.tokens_per_s == 1000.0
    assert run.remaining_s() == pytest.approx((100 - 10) / 4.0)


def test_config_stale_override_wins_over_the_spec(store: Store) -> None:
    add_run(store, "20261125-100000", Phase.RUNNING, stale_s=120)
    cfg = OrchConfig.model_validate({"monitor": {"stale_after_s": 900}})
    assert gather(store, cfg, now=NOW).runs[0].stale_after_s == 900


def test_terminal_runs_stay_a_while_then_hide_unless_all(store: Store) -> None:
    add_run(store, "20261125-100000", Phase.RUNNING)
    add_run(store, "20261125-090000", Phase.SUCCEEDED, ended_min=30, exit_code=0)
    add_run(store, "20261124-090000", Phase.FAILED, age_min=2000, ended_min=1500, exit_code=1)
    snap = gather(store, OrchConfig(), keep_terminal_s=3600, now=NOW)
    assert [r.run_id for r in snap.runs] == ["20261125-100000", "20261125-090000"]
    assert snap.hidden_runs == 1
    every = gather(store, OrchConfig(), include_all=True, now=NOW)
    assert len(every.runs) == 3 and every.hidden_runs == 0
    # A pull later touches updated_at; the run still ended when its history says.
    store.update_run("stage1_causal", "20261124-090000", pulled_at=NOW)
    again = gather(store, OrchConfig(), keep_terminal_s=3600, now=NOW)
    assert again.hidden_runs == 1
    old = next(
        r
        for r in gather(store, OrchConfig(), include_all=True, now=NOW).runs
        if r.run_id == "20261124-090000"
    )
    assert old.elapsed_s(NOW) == pytest.approx((2000 - 1500) * 60)


def test_targets_merge_config_store_observation_and_instances(store: Store) -> None:
    obs = TargetObservation(
        disk_free_bytes=7 * 2**30,
        gpus=[GpuStat(index=0, name="RTX 4090", util_pct=91, mem_used_mb=1000, mem_total_mb=24000)],
    )
    store.upsert_target("local", "local", reachable=True, last_obs_json=obs.model_dump_json())
    store.upsert_target(
        "vast1", "vast", reachable=False, unreachable_since=(NOW - timedelta(minutes=4)).isoformat()
    )
    store.upsert_instance(
        "vast",
        "77",
        "vast1",
        dph=0.4,
        state="running",
        running_since=(NOW - timedelta(hours=3)).isoformat(),
    )
    add_run(store, "20261125-080000", Phase.SUCCEEDED, target="vast1", ended_min=50)
    add_run(store, "20261125-100000", Phase.RUNNING, target="local")
    snap = gather(store, OrchConfig(), now=NOW)
    by = {t.name: t for t in snap.targets}
    assert by["local"].disk_free_bytes == 7 * 2**30 and by["local"].gpus[0].util_pct == 91
    assert by["local"].active_runs == 1 and not by["local"].is_paid_idle()
    vast = by["vast1"]
    assert vast.reachable is False and vast.unreachable_since == NOW - timedelta(minutes=4)
    assert not vast.configured and vast.instance is not None
    assert vast.instance.spent_usd(NOW) == pytest.approx(1.2)
    assert vast.is_paid_idle() and vast.idle_since == NOW - timedelta(minutes=50)


def test_secrets_in_alerts_are_redacted(store: Store) -> None:
    store.add_alert(
        "a1",
        kind="failed",
        title="stage1 failed",
        body="delivery to slack://T0KEN/B0T/SECRETX and https://hooks.example.com/hook/SECRETY token=SECRETZ",
    )
    (alert,) = gather(store, OrchConfig(), now=NOW).alerts
    assert "SECRET" not in alert.body
    assert "slack://***" in alert.body and "https://hooks.example.com/***" in alert.body
    assert redact("password: hunter2 api_key=abc") == "password: *** api_key=***"


# -- orch status -----------------------------------------------------------------------------
def _seed_state() -> None:
    ctx = Context()
    # `orch status` measures ages against the real clock: seed relative to it, not to NOW
    # (taken at import, possibly minutes before this test runs in a long suite).
    now = datetime.now(timezone.utc)
    add_run(ctx.store, "20261125-100000", Phase.RUNNING, beat_s=42, now=now)
    add_run(
        ctx.store, "20261125-090000", Phase.FAILED, exit_code=2, reason="bad --set key",
        ended_min=5, now=now,
    )  # fmt: skip
    ctx.close()


def test_status_json_has_phase_step_heartbeat_exit_code_and_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _seed_state()
    assert main(["status", "--json", "--no-refresh"]) == 0
    doc = json.loads(capsys.readouterr().out)
    runs = {r["run_id"]: r for r in doc["runs"]}
    running, failed = runs["20261125-100000"], runs["20261125-090000"]
    assert running["phase"] == "running" and running["step"] == 10
    assert 40 <= running["heartbeat_age_s"] < 120
    assert (
        failed["phase"] == "failed"
        and failed["exit_code"] == 2
        and failed["reason"] == "bad --set key"
    )
    assert failed["heartbeat_age_s"] is not None


def test_status_table_shows_the_runs(capsys: pytest.CaptureFixture[str]) -> None:
    _seed_state()
    assert main(["status", "--no-refresh"]) == 0
    out = capsys.readouterr().out
    assert "20261125-100000" in out and "running" in out
    assert "failed" in out and "exit 2" in out


def test_status_refresh_flags_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["status", "--refresh", "--no-refresh"])


def test_piped_dashboard_prints_one_static_frame_and_exits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _seed_state()
    assert main(["dashboard", "--no-monitor"]) == 0
    out = capsys.readouterr().out
    assert "Runs" in out and "Targets" in out and "Alerts" in out
    assert "20261125-100000" in out and "›" not in out


def test_dashboard_rejects_bad_fps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--fps", "0"]) == 2
    assert "--fps" in capsys.readouterr().err


# -- the app's state (no terminal needed) ----------------------------------------------------
def test_selection_moves_and_follows_the_run_and_store_changes_are_noticed() -> None:
    ctx = Context()
    add_run(ctx.store, "20261125-100000", Phase.RUNNING, age_min=3)
    add_run(ctx.store, "20261125-090000", Phase.RUNNING, age_min=5)
    app = Dashboard(ctx, run_monitor=False)
    app.gather(force=True)
    assert app.selected_run() is not None and app.selected_run().run_id == "20261125-100000"  # type: ignore[union-attr]
    assert app.handle("down") and app.selected_run().run_id == "20261125-090000"  # type: ignore[union-attr]
    assert app.handle("down") and app.selected_run().run_id == "20261125-090000"  # type: ignore[union-attr]
    assert not app._store_changed()
    other = Store(ctx.state_dir / "state.db")  # another process (e.g. orch watch) writes
    add_run(other, "20261125-110000", Phase.PENDING, age_min=1)
    other.close()
    app.gather()  # not forced, well within REGATHER_S: SQLite's data_version says it changed
    # The new run sorts first; the cursor stays on the run it was on.
    assert app.snapshot is not None and app.snapshot.runs[0].run_id == "20261125-110000"
    assert app.selected_run().run_id == "20261125-090000"  # type: ignore[union-attr]
    assert app.handle("home") and app.selected_index() == 0
    assert not app.handle("quit")
    app.close()
    ctx.close()


def test_monitor_log_lines_go_to_the_footer_not_the_screen(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from orchestrator.dashboard.inprocess import quiet_logs

    seen: list[str] = []
    with quiet_logs(seen.append):
        logging.getLogger("orch.monitor.scheduler").warning("poll of box failed")
        # (not apscheduler.scheduler: the watcher raises that logger to ERROR once it runs)
        logging.getLogger("apscheduler.executors.default").warning("job raised")
    assert seen == [
        "orch.monitor.scheduler: poll of box failed",
        "apscheduler.executors.default: job raised",
    ]
    assert "poll of box" not in capsys.readouterr().err
    assert logging.getLogger("orch").propagate  # put back


def test_in_process_monitor_defers_to_a_running_orch_watch() -> None:
    from orchestrator.dashboard.inprocess import InProcessMonitor
    from orchestrator.monitor.lock import WatcherLock, watcher_running

    ctx = Context()
    other = WatcherLock(ctx.state_dir)  # what `orch watch` holds
    other.acquire()
    try:
        mon = InProcessMonitor(ctx)
        mon.ensure()
        assert not mon.running and mon.label == "orch watch" and not mon.poke()
    finally:
        other.release()
    mon = InProcessMonitor(ctx)
    mon.ensure()
    try:
        assert mon.running and mon.label == "in-process" and watcher_running(ctx)
    finally:
        mon.stop()
    assert not watcher_running(ctx)
    ctx.close()


def test_status_at_80_columns_wraps_the_reason_rather_than_cutting_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = (
        "launch failed: target box: cannot connect to 203.0.113.7:22: Connection refused "
        "(check host and port in orch.toml)"
    )
    ctx = Context()
    add_run(
        ctx.store, "20261125-090000", Phase.FAILED, reason=reason, now=datetime.now(timezone.utc)
    )
    ctx.close()
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["status", "--no-refresh"]) == 0
    out = capsys.readouterr().out
    assert all(len(ln) <= 80 for ln in out.splitlines())
    assert " ".join(out.split()).count("Connection refused (check host and port in orch.toml)") == 1
    words = [w for w in reason.split() if len(w) < 14]  # short words are never cut in two
    assert all(w in out for w in words)


def test_a_leak_verdict_travels_from_the_run_dir_to_orch_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker's status says leak_flag, its summary the first step; a poll through the real
    local agent stores both, and `orch status` (table and JSON) shows `LEAK at step 0`."""
    from orchestrator.monitor.refresh import refresh_once
    from orchestrator.targets.factory import make_target
    from state import names
    from state.models import RunComplete
    from state.protocol import atomic_write_json, build_manifest

    monkeypatch.chdir(tmp_path)
    ctx = Context()
    rid, stage_dir = "20261125-110000", "stage3_finetune_full_bidir"
    rd = Path(make_target(ctx, "local").workdir) / "runs" / stage_dir / rid
    rd.mkdir(parents=True)
    status = RunStatus(run_id=rid, stage="stage3b-leaky", seq=9, step=40, leak_flag=True)
    atomic_write_json(rd / names.STATUS, status)
    atomic_write_json(rd / names.SUMMARY, {"leak_flag": True, "first_leak_step": 0})
    atomic_write_json(rd / names.MANIFEST, build_manifest(rd, rid))
    atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=rid))
    (rd / names.EXIT_CODE).write_text("0\n")
    now = datetime.now(timezone.utc)
    ctx.store.insert_run(
        RunRecord(
            run_id=rid, stage="stage3b-leaky", stage_dir=stage_dir, target="local",
            phase=Phase.RUNNING, session=f"orch-stage3b-leaky-{rid}",
            run_dir=f"runs/{stage_dir}/{rid}", created_at=now, updated_at=now,
            last_seq=9, last_seq_change_at=now,  # the last beat was seen already: seq unchanged
            status_json=status.model_dump_json(),
        )
    )  # fmt: skip
    try:
        [rec] = refresh_once(ctx)
    finally:
        ctx.close()
    assert rec.phase is Phase.SUCCEEDED
    assert RunStatus.model_validate_json(rec.status_json).first_leak_step == 0
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["status", "--no-refresh"]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if rid in ln]
    assert "succeeded" in line and "LEAK at step 0" in line
    assert main(["status", "--no-refresh", "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)["runs"]
    assert run["leak"] is True and run["first_leak_step"] == 0
