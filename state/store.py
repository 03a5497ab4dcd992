"""The controller's store: SQLite at `.orch/state.db` (targets, runs, phase history, alerts).

Versioned by `PRAGMA user_version` with forward-only migrations, so a newer orch upgrades an
older store in place and an older orch refuses a newer store instead of corrupting it. WAL mode
and a busy timeout let `orch watch`, `orch dashboard` and `orch status` share it. Every SQL
statement uses parameters; column names come from fixed allow-lists, never from input.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from state.errors import ConfigError, StageError
from state.models import RunRecord
from state.phases import Phase

MIGRATIONS: list[str] = [
    # 1: the core
    """
    CREATE TABLE targets (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reachable INTEGER,
        unreachable_since TEXT,
        last_seen_at TEXT,
        last_obs_json TEXT NOT NULL DEFAULT '',
        bootstrap_hash TEXT NOT NULL DEFAULT '',
        python TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL
    );
    CREATE TABLE runs (
        stage_dir TEXT NOT NULL,
        run_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        target TEXT NOT NULL,
        phase TEXT NOT NULL,
        session TEXT NOT NULL,
        run_dir TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        exit_code INTEGER,
        last_seq INTEGER,
        last_seq_change_at TEXT,
        step INTEGER,
        total_steps INTEGER,
        loss REAL,
        unreachable_since TEXT,
        pulled_at TEXT,
        spec_json TEXT NOT NULL DEFAULT '',
        status_json TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (stage_dir, run_id)
    );
    CREATE INDEX runs_phase ON runs(phase);
    CREATE INDEX runs_target ON runs(target);
    CREATE TABLE phase_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stage_dir TEXT NOT NULL,
        run_id TEXT NOT NULL,
        phase TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        at TEXT NOT NULL
    );
    CREATE INDEX history_run ON phase_history(stage_dir, run_id);
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dedup_key TEXT NOT NULL UNIQUE,
        stage_dir TEXT NOT NULL DEFAULT '',
        run_id TEXT NOT NULL DEFAULT '',
        target TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at TEXT NOT NULL,
        delivered_at TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE instances (
        provider TEXT NOT NULL,
        instance_id TEXT NOT NULL,
        target TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT '',
        dph REAL,
        gpu_name TEXT NOT NULL DEFAULT '',
        num_gpus INTEGER,
        ssh_host TEXT NOT NULL DEFAULT '',
        ssh_port INTEGER,
        created_at TEXT NOT NULL,
        running_since TEXT,
        destroyed_at TEXT,
        last_checked_at TEXT,
        info_json TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (provider, instance_id)
    );
    """,
    # 2: the monitor's bookkeeping (orchestrator/monitor): per-run state the state machine
    # carries between polls, and alert delivery per sink with a retry schedule.
    """
    CREATE TABLE run_monitor (
        stage_dir TEXT NOT NULL,
        run_id TEXT NOT NULL,
        gone_since TEXT,
        unreachable_alerted INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        actions_done TEXT NOT NULL DEFAULT '',
        action_error TEXT NOT NULL DEFAULT '',
        action_attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (stage_dir, run_id)
    );
    ALTER TABLE alerts ADD COLUMN payload_json TEXT NOT NULL DEFAULT '';
    ALTER TABLE alerts ADD COLUMN sinks_done TEXT NOT NULL DEFAULT '';
    ALTER TABLE alerts ADD COLUMN next_attempt_at TEXT;
    ALTER TABLE alerts ADD COLUMN gave_up INTEGER NOT NULL DEFAULT 0
    """,
    # 3: delivery claims (orchestrator/monitor/alerts.py): who is sending an alert now, and
    # the sinks whose send started but whose outcome was never recorded (the sender died);
    # the retry schedule of a failing completion action (orchestrator/monitor/actions.py).
    """
    ALTER TABLE alerts ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE alerts ADD COLUMN claimed_until TEXT;
    ALTER TABLE alerts ADD COLUMN sinks_sending TEXT NOT NULL DEFAULT '';
    ALTER TABLE run_monitor ADD COLUMN action_failing_since TEXT;
    ALTER TABLE run_monitor ADD COLUMN action_next_try TEXT;
    ALTER TABLE run_monitor ADD COLUMN action_gave_up INTEGER NOT NULL DEFAULT 0
    """,
    # 4: Vast creates (orchestrator/vast/ledger.py): each create's unique label, written before
    # the request is sent, so an instance whose create answer was lost can be found again.
    """
    CREATE TABLE vast_creates (
        label TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        api_url TEXT NOT NULL,
        offer_id INTEGER,
        requested_at TEXT NOT NULL,
        instance_id TEXT,
        outcome TEXT NOT NULL DEFAULT '',
        resolved_at TEXT
    )
    """,
    # 5: the Slurm job id of a run on a `slurm` target (orchestrator/targets/slurm.py).
    """
    ALTER TABLE runs ADD COLUMN job_id TEXT NOT NULL DEFAULT ''
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

#: Every form `Store.resolve_run` accepts, for the help of commands that take a RUN.
RUN_FORMS = "a run id, stage_dir/run_id, STAGE:latest (the newest run of STAGE), or latest"

_RUN_COLUMNS = frozenset(RunRecord.model_fields) - {"run_id", "stage_dir"}
_TARGET_COLUMNS = frozenset(
    {
        "kind",
        "reachable",
        "unreachable_since",
        "last_seen_at",
        "last_obs_json",
        "bootstrap_hash",
        "python",
    }
)
_INSTANCE_COLUMNS = frozenset(
    {
        "target",
        "label",
        "state",
        "dph",
        "gpu_name",
        "num_gpus",
        "ssh_host",
        "ssh_port",
        "running_since",
        "destroyed_at",
        "last_checked_at",
        "info_json",
    }
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def parse_time(value: Any) -> datetime | None:
    """A timestamp as the store holds it (ISO text) as an aware datetime (naive means UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def to_db(value: Any) -> Any:
    """A Python value as SQLite stores it (ISO text for datetimes, enum values, 0/1)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Phase):
        return value.value
    if isinstance(value, bool):
        return int(value)
    return value


class Store:
    """Thread-safe access to the controller's SQLite database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, timeout=30, check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: no fsync per commit (the watcher commits on every pushed
        # line), still never corrupt, and durable across a crash or kill -9 of any orch
        # process; only a power loss or OS crash may roll back the last few commits, which the
        # next poll then derives again (an alert may then be sent a second time, never lost).
        # https://www.sqlite.org/pragma.html#pragma_synchronous, https://www.sqlite.org/wal.html
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # -- plumbing ---------------------------------------------------------------------------
    def _migrate(self) -> None:
        # Two orch processes can open a fresh database at the same moment (the watcher and a
        # command, or the graph runner's own threads). The version is therefore read again
        # under the write lock (BEGIN IMMEDIATE) before each step: a step another process has
        # already applied is skipped, not applied twice ("duplicate column name").
        with self._lock:
            while True:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    version = self._db.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise ConfigError(
                            f"{self.path} has schema version {version}, newer than this orch"
                            f" ({SCHEMA_VERSION})",
                            hint="upgrade orch, or point ORCH_STATE_DIR elsewhere",
                        )
                    if version == SCHEMA_VERSION:
                        self._db.execute("COMMIT")
                        return
                    for stmt in MIGRATIONS[version].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    self._db.execute(f"PRAGMA user_version = {version + 1}")  # int, not input
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    # -- runs ---------------------------------------------------------------------------------
    def insert_run(self, rec: RunRecord) -> None:
        data = {k: to_db(v) for k, v in rec.model_dump().items()}
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self.tx() as db:
            db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", tuple(data.values()))
            db.execute(
                "INSERT INTO phase_history (stage_dir, run_id, phase, reason, at) VALUES (?,?,?,?,?)",
                (rec.stage_dir, rec.run_id, rec.phase.value, rec.reason, now_iso()),
            )

    def update_run(self, stage_dir: str, run_id: str, **fields: Any) -> None:
        """Update columns of a run; a `phase` change is also appended to the history."""
        bad = set(fields) - _RUN_COLUMNS
        if bad:
            raise ValueError(f"unknown run columns: {sorted(bad)}")
        fields.setdefault("updated_at", now_iso())
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as db:
            old = db.execute(
                "SELECT phase FROM runs WHERE stage_dir = ? AND run_id = ?", (stage_dir, run_id)
            ).fetchone()
            if old is None:
                raise StageError(f"no run {stage_dir}/{run_id} in the store")
            db.execute(
                f"UPDATE runs SET {sets} WHERE stage_dir = ? AND run_id = ?",
                (*(to_db(v) for v in fields.values()), stage_dir, run_id),
            )
            phase = fields.get("phase")
            if phase is not None and to_db(phase) != old["phase"]:
                db.execute(
                    "INSERT INTO phase_history (stage_dir, run_id, phase, reason, at) VALUES (?,?,?,?,?)",
                    (stage_dir, run_id, to_db(phase), fields.get("reason", ""), now_iso()),
                )

    def request_cancel(self, stage_dir: str, run_id: str) -> None:
        """Mark a run as being stopped by the user, BEFORE killing it, so the monitor records
        `cancelled` (no alert) instead of `crashed` when the process disappears."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO run_monitor (stage_dir, run_id, cancel_requested) VALUES (?,?,1) "
                "ON CONFLICT(stage_dir, run_id) DO UPDATE SET cancel_requested = 1",
                (stage_dir, run_id),
            )

    def delete_run(self, stage_dir: str, run_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM runs WHERE stage_dir = ? AND run_id = ?", (stage_dir, run_id))
            db.execute(
                "DELETE FROM phase_history WHERE stage_dir = ? AND run_id = ?", (stage_dir, run_id)
            )

    @staticmethod
    def _run(row: sqlite3.Row) -> RunRecord:
        return RunRecord.model_validate(dict(row))

    def get_run(self, stage_dir: str, run_id: str) -> RunRecord | None:
        rows = self.query(
            "SELECT * FROM runs WHERE stage_dir = ? AND run_id = ?", (stage_dir, run_id)
        )
        return self._run(rows[0]) if rows else None

    def list_runs(
        self,
        *,
        active_only: bool = False,
        target: str | None = None,
        stage: str | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first."""
        sql = "SELECT * FROM runs WHERE 1=1"
        params: list[Any] = []
        if active_only:
            terminal = [p.value for p in Phase if p.is_terminal]
            sql += f" AND phase NOT IN ({','.join('?' for _ in terminal)})"
            params += terminal
        if target is not None:
            sql += " AND target = ?"
            params.append(target)
        if stage is not None:
            sql += " AND stage = ?"
            params.append(stage)
        sql += " ORDER BY created_at DESC, run_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [self._run(r) for r in self.query(sql, tuple(params))]

    def resolve_run(self, ref: str) -> RunRecord:
        """A run by `run_id`, `stage_dir/run_id`, `latest`, or `STAGE:latest`."""
        if ref == "latest":
            runs = self.list_runs(limit=1)
            if not runs:
                raise StageError("no runs recorded yet", hint="start one with `orch launch STAGE`")
            return runs[0]
        if ref.endswith(":latest"):
            runs = self.list_runs(stage=ref[: -len(":latest")], limit=1)
            if not runs:
                raise StageError(
                    f"no runs of stage {ref[:-7]!r} recorded", hint="see `orch status`"
                )
            return runs[0]
        if "/" in ref:
            stage_dir, _, run_id = ref.partition("/")
            rec = self.get_run(stage_dir, run_id)
            if rec is None:
                raise StageError(f"no run {ref!r} in the store", hint="see `orch status`")
            return rec
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", (ref,))
        if not rows:
            raise StageError(f"no run {ref!r} in the store", hint="see `orch status` for run ids")
        if len(rows) > 1:
            keys = ", ".join(f"{r['stage_dir']}/{r['run_id']}" for r in rows)
            raise StageError(
                f"run id {ref!r} is ambiguous: {keys}", hint="name it as stage_dir/run_id"
            )
        return self._run(rows[0])

    def phase_history(self, stage_dir: str, run_id: str) -> list[tuple[str, str, str]]:
        rows = self.query(
            "SELECT phase, reason, at FROM phase_history WHERE stage_dir = ? AND run_id = ? ORDER BY id",
            (stage_dir, run_id),
        )
        return [(r["phase"], r["reason"], r["at"]) for r in rows]

    # -- targets ------------------------------------------------------------------------------
    def upsert_target(self, name: str, kind: str, **fields: Any) -> None:
        bad = set(fields) - _TARGET_COLUMNS
        if bad:
            raise ValueError(f"unknown target columns: {sorted(bad)}")
        with self.tx() as db:
            db.execute(
                "INSERT INTO targets (name, kind, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, updated_at = excluded.updated_at",
                (name, kind, now_iso()),
            )
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                db.execute(
                    f"UPDATE targets SET {sets} WHERE name = ?",
                    (*(to_db(v) for v in fields.values()), name),
                )

    def get_target(self, name: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM targets WHERE name = ?", (name,))
        return dict(rows[0]) if rows else None

    def list_targets(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT * FROM targets ORDER BY name")]

    # -- alerts -------------------------------------------------------------------------------
    def add_alert(
        self,
        dedup_key: str,
        *,
        kind: str,
        title: str,
        body: str,
        stage_dir: str = "",
        run_id: str = "",
        target: str = "",
    ) -> int | None:
        """Record an alert once: returns its id, or None if `dedup_key` was already recorded."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO alerts (dedup_key, stage_dir, run_id, target, kind, title, body, created_at) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (dedup_key, stage_dir, run_id, target, kind, title, body, now_iso()),
            )
            return int(cur.lastrowid) if cur.rowcount and cur.lastrowid is not None else None

    def undelivered_alerts(self) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.query("SELECT * FROM alerts WHERE delivered_at IS NULL ORDER BY id")
        ]

    def mark_alert(self, alert_id: int, *, delivered: bool, error: str = "") -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE alerts SET attempts = attempts + 1, last_error = ?, delivered_at = ? WHERE id = ?",
                (error, now_iso() if delivered else None, alert_id),
            )

    def recent_alerts(self, limit: int = 20) -> list[dict[str, Any]]:
        return [
            dict(r) for r in self.query("SELECT * FROM alerts ORDER BY id DESC LIMIT ?", (limit,))
        ]

    # -- instances (providers) ---------------------------------------------------------------
    def upsert_instance(self, provider: str, instance_id: str, target: str, **fields: Any) -> None:
        bad = set(fields) - _INSTANCE_COLUMNS
        if bad:
            raise ValueError(f"unknown instance columns: {sorted(bad)}")
        with self.tx() as db:
            db.execute(
                "INSERT INTO instances (provider, instance_id, target, created_at) VALUES (?,?,?,?) "
                "ON CONFLICT(provider, instance_id) DO UPDATE SET target = excluded.target",
                (provider, instance_id, target, now_iso()),
            )
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                db.execute(
                    f"UPDATE instances SET {sets} WHERE provider = ? AND instance_id = ?",
                    (*(to_db(v) for v in fields.values()), provider, instance_id),
                )

    def list_instances(self, *, live_only: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT * FROM instances"
        if live_only:
            sql += " WHERE destroyed_at IS NULL"
        return [dict(r) for r in self.query(sql + " ORDER BY created_at")]

    def live_instance_for(self, target: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT * FROM instances WHERE target = ? AND destroyed_at IS NULL ORDER BY created_at DESC LIMIT 1",
            (target,),
        )
        return dict(rows[0]) if rows else None


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
