"""Live progress (orchestrator/progress.py): the pure line/table renderers, the plain-output
throttle, the step reporter, and the pull/location helpers built on them."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.dashboard.snapshot import run_view
from orchestrator.progress import (
    QUIET,
    RunProgress,
    StageRow,
    StagesProgress,
    Steps,
    fmt_size,
    run_line,
    stages_table,
)
from state.models import Manifest, ManifestEntry, RunRecord, RunStatus
from state.phases import Phase, WorkerPhase

NOW = datetime(2026, 11, 25, 20, 0, 0, tzinfo=timezone.utc)


def make_rec(
    phase: Phase = Phase.RUNNING,
    *,
    step: int | None = 10,
    total: int | None = 150,
    loss: float | None = 1.23,
    beat_ago_s: float | None = 3.0,
    **kw: object,
) -> RunRecord:
    status = RunStatus(
        run_id="20261125-193000",
        stage="stage3b",
        phase=WorkerPhase.TRAINING,
        seq=7,
        step=step or 0,
        total_steps=total,
        loss=loss,
        tokens_per_s=1234.0,
        steps_per_s=0.5,
        eta_s=280.0,
    )
    fields: dict[str, object] = {
        "run_id": "20261125-193000",
        "stage": "stage3b",
        "stage_dir": "stage3b_prefix",
        "target": "local",
        "phase": phase,
        "session": "orch-stage3b-20261125-193000",
        "run_dir": "runs/stage3b_prefix/20261125-193000",
        "created_at": NOW - timedelta(minutes=2),
        "updated_at": NOW - timedelta(seconds=1),
        "step": step,
        "total_steps": total,
        "loss": loss,
        "last_seq": 7,
        "last_seq_change_at": None if beat_ago_s is None else NOW - timedelta(seconds=beat_ago_s),
        "status_json": status.model_dump_json(),
    }
    fields.update(kw)
    return RunRecord(**fields)  # type: ignore[arg-type]


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200, highlight=False), buf


# -- the pure line -------------------------------------------------------------------------------
def test_run_line_shows_phase_step_loss_rate_eta_and_heartbeat() -> None:
    text = run_line(run_view(make_rec()), NOW).plain
    assert text.startswith("stage3b 20261125-193000  running (training)")
    assert "step 10/150" in text
    assert "loss 1.2300" in text
    assert "1.2k tok/s" in text
    assert "ETA 4m40s" in text  # the worker's own estimate, 280 s
    assert "heartbeat 3s ago" in text


def test_run_line_says_when_no_heartbeat_came_yet() -> None:
    rec = make_rec(step=None, total=None, loss=None, beat_ago_s=None, status_json="")
    text = run_line(run_view(rec), NOW).plain
    assert "no heartbeat yet" in text
    assert "step -" in text and "loss" not in text and " ago" not in text


def test_run_line_bar_and_unreachable_and_finished() -> None:
    bar = run_line(run_view(make_rec(step=75)), NOW, bar_width=10).plain
    assert "step 75/150 █████░░░░░" in bar
    gone = make_rec(unreachable_since=NOW - timedelta(seconds=40))
    text = run_line(run_view(gone), NOW).plain
    assert "unreachable" in text and "no answer for 40s" in text and "heartbeat" not in text
    done = make_rec(Phase.FAILED, exit_code=3, reason="leakage guard stopped the run")
    text = run_line(run_view(done), NOW).plain
    assert "failed" in text and "exit 3: leakage guard stopped the run" in text
    assert "heartbeat" not in text and "ETA" not in text
    assert "after 1m59s" in text  # from launch to the last update


# -- the table -----------------------------------------------------------------------------------
def test_stages_table_shows_every_planned_stage() -> None:
    rows = [
        StageRow("stage1", "local", "succeeded", run_view(make_rec(Phase.SUCCEEDED)),
                 started_at=NOW - timedelta(seconds=70), ended_at=NOW - timedelta(seconds=10)),
        StageRow("stage3b", "local", "running", run_view(make_rec(step=40)),
                 started_at=NOW - timedelta(seconds=30)),
        StageRow("stage4", "", "queued"),
    ]  # fmt: skip
    console, buf = plain_console()
    console.print(stages_table(rows, NOW))
    out = buf.getvalue()
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "succeeded" in lines["stage1"] and "1m00s" in lines["stage1"]
    assert "running (training)" in lines["stage3b"] and "40/150" in lines["stage3b"]
    assert "1.2300" in lines["stage3b"] and "30s" in lines["stage3b"]
    assert "queued" in lines["stage4"]
    for col in ("stage", "target", "phase", "step", "loss", "ETA", "elapsed"):
        assert col in out


def test_stages_progress_rows_follow_the_stage() -> None:
    console, buf = plain_console()
    live = StagesProgress(console, ["stage1", "report"], now=lambda: NOW)
    live.set("stage1", target="local", state="launching")
    assert live.rows()[0].state == "launching" and live.rows()[0].started_at == NOW
    live.set("stage1", rec=make_rec())
    assert live.rows()[0].state == "running" and live.rows()[0].run is not None
    assert "step 10/150" in buf.getvalue()  # plain output: the run's line
    live.set("stage1", rec=make_rec(Phase.CRASHED), state="failed")
    row = live.rows()[0]
    assert row.ended_at == NOW
    console.print(live.render())
    assert "crashed" in buf.getvalue()  # the run's own word, not just "failed"


# -- plain output: a line per change, never a flood -----------------------------------------------
def test_plain_progress_prints_changes_at_most_every_few_seconds() -> None:
    console, buf = plain_console()
    clock = [0.0]
    live = RunProgress(console, every_s=5.0, clock=lambda: clock[0], now=lambda: NOW)
    assert not live.use_live
    with live:
        live.update(make_rec(step=10))
        live.update(make_rec(step=10))  # nothing changed: nothing printed
        clock[0] = 1.0
        live.update(make_rec(step=11))  # changed, but too soon
        clock[0] = 6.0
        live.update(make_rec(step=12))  # changed and due
        clock[0] = 6.5
        live.update(make_rec(Phase.HUNG, step=12))  # a new phase prints at once
        live.update(make_rec(Phase.SUCCEEDED, step=150))  # the caller says how it ended
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "step 10/150" in lines[0] and "step 12/150" in lines[1] and "hung" in lines[2]


def test_live_progress_on_a_terminal_draws_the_line() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    with RunProgress(console, now=lambda: NOW) as live:
        assert live.use_live
        live.update(make_rec(step=20))
    assert "step 20/150" in buf.getvalue() and "heartbeat 3s ago" in buf.getvalue()


# -- steps -----------------------------------------------------------------------------------------
def test_steps_print_one_line_per_step_and_how_it_went() -> None:
    console, buf = plain_console()
    steps = Steps(console, prefix="  stage1: ")
    with steps.step("syncing code (12 files)") as s:
        s.done("synced code: 12 files")
    steps.note("bootstrap: unchanged, skipped")
    assert buf.getvalue().splitlines() == [
        "  stage1: syncing code (12 files)",
        "  stage1: synced code: 12 files",
        "  stage1: bootstrap: unchanged, skipped",
    ]
    with QUIET.step("nothing") as s:  # says nothing at all
        s.done("still nothing")


def test_steps_spinner_on_a_terminal_leaves_the_final_line() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with Steps(console).step("pulling 3 files, 1.2 KB") as s:
        s.done("verified 3 files")
    assert "verified 3 files" in buf.getvalue()


def test_fmt_size() -> None:
    assert [fmt_size(n) for n in (12, 812_000, 3_400_000, 2_500_000_000)] == [
        "12 B",
        "812 KB",
        "3.4 MB",
        "2.5 GB",
    ]


# -- pull and location helpers ---------------------------------------------------------------------
def test_pull_plan_counts_what_the_pull_brings() -> None:
    from orchestrator.pull import pull_plan

    files = [
        ManifestEntry(path="metrics.json", size=1_000_000, sha256="a" * 64),
        ManifestEntry(path="stdout.log", size=2_400_000, sha256="b" * 64),
        ManifestEntry(path="checkpoints/final/model.bin", size=9_000_000, sha256="c" * 64),
    ]
    m = Manifest(run_id="r", files=files)
    assert pull_plan(m, checkpoints=False) == "pulling 2 files, 3.4 MB"
    assert pull_plan(m, checkpoints=True) == "pulling 3 files, 12.4 MB"
    assert "no manifest" in pull_plan(None, checkpoints=False)


def test_run_location_is_where_the_run_really_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.context import Context
    from orchestrator.pull import run_location

    (tmp_path / "orch.toml").write_text(
        '[targets.local]\nkind = "local"\n'
        '[targets.box]\nkind = "ssh"\nhost = "203.0.113.7"\nport = 2222\nworkdir = "/data/w"\n'
        '[targets.plain]\nkind = "ssh"\nhost = "box.example"\nuser = "me"\n'
    )
    monkeypatch.chdir(tmp_path)
    ctx = Context()
    try:
        rec = make_rec()
        local = run_location(ctx, rec)
        assert local == f"{ctx.state_dir.resolve()}/local/{rec.run_dir}"
        assert run_location(ctx, make_rec(target="box")) == (
            f"root@203.0.113.7:/data/w/{rec.run_dir} (ssh port 2222)"
        )
        assert (
            run_location(ctx, make_rec(target="plain")) == f"me@box.example:orch-work/{rec.run_dir}"
        )
    finally:
        ctx.close()
