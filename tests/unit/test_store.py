"""The controller's SQLite store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from state.errors import ConfigError, StageError
from state.models import RunRecord
from state.phases import Phase
from state.store import MIGRATIONS, SCHEMA_VERSION, Store


def rec(
    run_id: str, stage: str = "stage1", stage_dir: str = "stage1_baseline_eval", **kw
) -> RunRecord:
    now = datetime.now(timezone.utc)
    base = dict(
        run_id=run_id,
        stage=stage,
        stage_dir=stage_dir,
        target="local",
        phase=Phase.PENDING,
        session=f"orch-{stage}-{run_id}",
        run_dir=f"runs/{stage_dir}/{run_id}",
        created_at=now,
        updated_at=now,
    )
    base.update(kw)
    return RunRecord(**base)


def test_schema_versioned_and_reopened(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with Store(db) as s:
        assert s.schema_version == SCHEMA_VERSION
        s.insert_run(rec("20260101-000000"))
    with Store(db) as s:  # migrations are not re-run
        assert s.get_run("stage1_baseline_eval", "20260101-000000") is not None


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    with pytest.raises(ConfigError, match="newer than this orch"):
        Store(db)


def test_a_migration_another_process_applied_meanwhile_is_not_applied_twice(
    tmp_path: Path,
) -> None:
    """Two processes opening a fresh database at once (CI saw "duplicate column name: job_id").

    Another connection holds the write lock and migrates the database to the newest schema
    while this Store is opening; the Store must see the new version under the lock, not the
    one it would have read before it.
    """

    db = tmp_path / "state.db"
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("BEGIN IMMEDIATE")
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(db).close()
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=open_store)
    t.start()
    time.sleep(0.5)  # the Store is now waiting for the lock
    for step in MIGRATIONS:
        for stmt in step.split(";"):
            if stmt.strip():
                other.execute(stmt)
    other.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    other.execute("COMMIT")
    other.close()
    t.join(timeout=60)
    assert not t.is_alive() and errors == []
    with Store(db) as s:
        assert s.schema_version == SCHEMA_VERSION


def test_many_processes_open_a_fresh_database_at_once(tmp_path: Path) -> None:

    db = tmp_path / "state.db"
    code = f"from state.store import Store; Store({str(db)!r}).close()"
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE)
        for _ in range(8)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()


def test_phase_history_and_update(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        s.insert_run(rec("20260101-000000"))
        s.update_run("stage1_baseline_eval", "20260101-000000", phase=Phase.RUNNING)
        s.update_run("stage1_baseline_eval", "20260101-000000", step=5)  # no phase change
        s.update_run("stage1_baseline_eval", "20260101-000000", phase=Phase.CRASHED, reason="gone")
        hist = s.phase_history("stage1_baseline_eval", "20260101-000000")
        assert [h[0] for h in hist] == ["pending", "running", "crashed"]
        assert hist[-1][1] == "gone"
        r = s.get_run("stage1_baseline_eval", "20260101-000000")
        assert r is not None and r.phase is Phase.CRASHED and r.step == 5
        with pytest.raises(ValueError, match="unknown run columns"):
            s.update_run("stage1_baseline_eval", "20260101-000000", **{"phase; DROP TABLE runs": 1})


def test_resolve_run_refs(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        with pytest.raises(StageError, match="no runs recorded"):
            s.resolve_run("latest")
        s.insert_run(rec("20260101-000000"))
        s.insert_run(rec("20260101-000000", stage="stage2", stage_dir="stage2_ablation_eval"))
        s.insert_run(rec("20260102-000000", stage="stage2", stage_dir="stage2_ablation_eval"))
        assert s.resolve_run("20260102-000000").stage == "stage2"
        assert s.resolve_run("stage1_baseline_eval/20260101-000000").stage == "stage1"
        assert s.resolve_run("stage1:latest").run_id == "20260101-000000"
        with pytest.raises(StageError, match="ambiguous"):
            s.resolve_run("20260101-000000")
        with pytest.raises(StageError, match="no run"):
            s.resolve_run("19990101-000000")


def test_active_filter(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        s.insert_run(rec("20260101-000001", phase=Phase.RUNNING))
        s.insert_run(rec("20260101-000002", phase=Phase.SUCCEEDED))
        s.insert_run(rec("20260101-000003", phase=Phase.HUNG))
        active = {r.run_id for r in s.list_runs(active_only=True)}
        assert active == {"20260101-000001", "20260101-000003"}


def test_alert_dedup_and_delivery(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        a = s.add_alert("stage1/r/crashed", kind="crashed", title="t", body="b")
        assert a is not None
        assert s.add_alert("stage1/r/crashed", kind="crashed", title="t", body="b") is None
        assert len(s.undelivered_alerts()) == 1
        s.mark_alert(a, delivered=False, error="503")
        assert s.undelivered_alerts()[0]["attempts"] == 1
        s.mark_alert(a, delivered=True)
        assert s.undelivered_alerts() == []
