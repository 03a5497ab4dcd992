"""`orch run-all --detach` and `--resume` guards that need no cluster: each refused with one
line before anything is submitted."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from state import names
from state.models import RunRecord
from state.phases import Phase

SLURM = """default_target = "cluster"

[targets.cluster]
kind = "slurm"
host = "127.0.0.1"
port = 9
user = "nobody"
workdir = "/tmp/orch-nowhere"
partition = "debug"
"""


def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "orch.toml").write_text(toml)
    monkeypatch.chdir(root)
    monkeypatch.setenv("ORCH_STATE_DIR", str(tmp_path / "state"))
    return root


def test_detach_needs_a_slurm_target(tmp_path, monkeypatch, capsys) -> None:
    _project(tmp_path, monkeypatch, 'default_target = "local"\n')
    assert main(["run-all", "--detach"]) != 0
    err = capsys.readouterr().err
    assert "--detach needs one slurm target" in err
    ctx = Context()
    try:
        assert ctx.store.list_runs() == []  # nothing recorded, nothing started
    finally:
        ctx.close()


def test_resume_is_refused_while_the_graph_still_runs(tmp_path, monkeypatch, capsys) -> None:
    root = _project(tmp_path, monkeypatch, SLURM)
    now = datetime.now(timezone.utc)
    ctx = Context(cwd=root)
    try:
        ctx.store.insert_run(
            RunRecord(
                run_id="20260101-000000",
                stage="stage3b",
                stage_dir="stage3_finetune_prefill_bidir",
                target="cluster",
                phase=Phase.QUEUED,
                session=names.session_name("stage3b", "20260101-000000"),
                run_dir=f"{names.RUNS_DIR}/stage3_finetune_prefill_bidir/20260101-000000",
                created_at=now,
                updated_at=now,
                job_id="41",
            )
        )
    finally:
        ctx.close()
    assert main(["run-all", "--target", "cluster", "--resume"]) != 0
    err = capsys.readouterr().err
    assert "1 run(s) of the study are still queued or running on 'cluster'" in err
    assert "stage3_finetune_prefill_bidir/20260101-000000 (queued)" in err
    ctx = Context(cwd=root)
    try:
        assert len(ctx.store.list_runs()) == 1  # nothing submitted: port 9 was never tried
    finally:
        ctx.close()
