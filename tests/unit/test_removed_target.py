"""A run outlives its target's entry in orch.toml: `orch logs` shows what orch recorded, and
`orch stop`/`orch pull` say in one line which target is missing and what to do."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from state import names
from state.models import RunRecord
from state.phases import Phase

STAGE_DIR = "stage1_baseline_eval"


def add_run(run_id: str, phase: Phase, *, target: str = "box", reason: str = "") -> RunRecord:
    now = datetime.now(timezone.utc)
    rec = RunRecord(
        run_id=run_id, stage="stage1", stage_dir=STAGE_DIR, target=target, phase=phase,
        session=f"orch-stage1-{run_id}", run_dir=f"runs/{STAGE_DIR}/{run_id}",
        created_at=now, updated_at=now, reason=reason, exit_code=1 if reason else None,
    )  # fmt: skip
    ctx = Context()
    try:
        ctx.store.insert_run(rec)
    finally:
        ctx.close()
    return rec


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose orch.toml no longer has `[targets.box]` (only the local target)."""
    (tmp_path / "orch.toml").write_text('[targets.local]\nkind = "local"\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_logs_shows_the_stored_reason_when_the_target_is_gone(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = add_run("20261125-090000", Phase.FAILED, reason="launch failed: no route to host")
    assert main(["logs", rec.run_id]) == 0
    out, err = capsys.readouterr()
    assert f"{rec.key}: failed (exit 1) · launch failed: no route to host" in out
    assert "'box' is no longer in orch.toml" in err and "unknown target" not in out + err


def test_logs_shows_the_pulled_output_when_the_target_is_gone(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = add_run("20261125-100000", Phase.SUCCEEDED)
    local = project / "runs" / STAGE_DIR / rec.run_id
    local.mkdir(parents=True)
    (local / names.STDOUT).write_text("".join(f"line {i}\n" for i in range(100)))
    assert main(["logs", f"{STAGE_DIR}/{rec.run_id}", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{rec.key}: succeeded" in out
    assert out.endswith("line 97\nline 98\nline 99\n") and "line 96" not in out


def test_logs_fails_only_when_nothing_is_known(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_run("20261125-110000", Phase.RUNNING)
    assert main(["logs", "stage1:latest"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'box', which is no longer in orch.toml" in err and "[targets.box]" in err


@pytest.mark.parametrize("command", ["stop", "pull"])
def test_stop_and_pull_name_the_missing_target(
    project: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    rec = add_run("20261125-120000", Phase.RUNNING)
    assert main([command, rec.run_id]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"cannot {command} run {rec.key}: its target 'box' is no longer in orch.toml" in err
    assert "add [targets.box] back to orch.toml" in err and "unknown target" not in err


def test_pull_all_skips_runs_whose_target_is_gone(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = add_run("20261125-130000", Phase.SUCCEEDED)
    assert main(["pull", "--all"]) == 0
    out, err = capsys.readouterr()
    assert "nothing to pull" in out and rec.key in err and "no longer in orch.toml" in err
