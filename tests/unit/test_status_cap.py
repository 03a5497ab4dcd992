"""Bounded run-file reads (issue 13, defect 6): a status file over the cap is refused as
unreadable by the agent, never read whole, never sent in the answer, never stored; odd files
(a FIFO, a huge pid file) neither block the agent nor pass for a live process."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.monitor.refresh import refresh_once
from orchestrator.targets.factory import make_target
from state import names
from state.agent import handle
from state.models import RunRecord, RunStatus, TargetObservation
from state.phases import Phase
from state.protocol import MAX_STATUS_BYTES, read_model

RID = "20260101-000000"
RUN_DIR = f"runs/s1/{RID}"
BIG = 32 * 1024 * 1024


def _huge_status(path: Path) -> None:
    """A 32 MiB status.json that is valid JSON and a valid RunStatus (the worst case: an
    uncapped reader would accept and forward all of it)."""
    head = json.dumps({"run_id": RID, "stage": "stage1", "seq": 7, "message": ""})[:-2]
    with open(path, "w") as f:
        f.write(head)
        f.write("x" * BIG)
        f.write('"}')


def _observe(workdir: Path) -> TargetObservation:
    request = json.dumps({"op": "observe", "runs": [{"run_dir": RUN_DIR}]})
    answer, keep = handle(str(workdir), request)
    assert keep
    assert len(answer) < 64 * 1024  # the answer line does not carry the file
    return TargetObservation.model_validate_json(answer)


def test_agent_refuses_a_status_file_over_the_cap(tmp_path: Path) -> None:
    rd = tmp_path / RUN_DIR
    rd.mkdir(parents=True)
    _huge_status(rd / names.STATUS)
    (rd / names.RUN_FAILED).write_bytes(b"{" + b" " * (MAX_STATUS_BYTES + 1) + b"}")
    [run] = _observe(tmp_path).runs
    assert run.status_state == "unreadable" and run.status is None
    assert run.failed_marker and run.failed is None
    got = read_model(rd / names.STATUS, RunStatus, max_bytes=MAX_STATUS_BYTES)
    assert got.state == "unreadable" and "cap" in got.detail


def test_agent_does_not_block_on_a_fifo_or_trust_a_huge_pid_file(tmp_path: Path) -> None:
    rd = tmp_path / RUN_DIR
    rd.mkdir(parents=True)
    os.mkfifo(rd / names.STATUS)  # reading it would block the agent forever
    os.mkfifo(rd / names.EVENTS)
    (rd / names.PID).write_text(str(os.getpid()) + "0" * (1 << 20))  # 1 MiB of digits
    request = json.dumps({"op": "observe", "runs": [{"run_dir": RUN_DIR, "events_tail": 5}]})
    [run] = TargetObservation.model_validate_json(handle(str(tmp_path), request)[0]).runs
    assert run.status_state == "unreadable" and run.last_events == []
    assert run.pid_alive is None  # no usable pid: not taken as alive
    (rd / names.PID).write_text("-1")  # kill(-1, 0) would "find" every process
    [run] = TargetObservation.model_validate_json(handle(str(tmp_path), request)[0]).runs
    assert run.pid_alive is None


def test_a_huge_status_file_never_reaches_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ctx = Context()
    try:
        rd = Path(make_target(ctx, "local").workdir) / RUN_DIR
        rd.mkdir(parents=True)
        _huge_status(rd / names.STATUS)
        (rd / names.PID).write_text(str(os.getpid()))  # "alive"
        now = datetime.now(timezone.utc)
        ctx.store.insert_run(
            RunRecord(
                run_id=RID, stage="stage1", stage_dir="s1", target="local",
                phase=Phase.RUNNING, session="", run_dir=RUN_DIR, created_at=now,
                updated_at=now,
            )
        )  # fmt: skip
        [rec] = refresh_once(ctx)
        assert rec.phase is Phase.RUNNING
        assert rec.reason == "progress unknown: status.json unreadable"
        assert rec.status_json == ""
        db = ctx.store.path
    finally:
        ctx.close()
    total = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
    assert total < 4 * 1024 * 1024  # 34 MB before the fix
