"""The monitor's durable bookkeeping in the store: load run states, save a transition and its
alerts in ONE transaction (so a watcher killed at any instant neither loses nor repeats an alert),
and the per-run action ledger (what was pulled/launched after a run ended).

Tables: `runs` and `phase_history` (core), `run_monitor` and the extra `alerts` columns
(migration 2 of `state/store.py`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from orchestrator.monitor.statemachine import MONITORED_PHASES, Alert, RunState
from state.models import RunRecord
from state.store import Store, now_iso, to_db

# RunState fields that are columns of `runs` (the rest live in `run_monitor`).
_RUN_FIELDS = (
    "phase",
    "reason",
    "exit_code",
    "last_seq",
    "last_seq_change_at",
    "step",
    "total_steps",
    "loss",
    "unreachable_since",
)
_MON_FIELDS = ("gone_since", "unreachable_alerted", "cancel_requested")


#: An alert as recorded: (alert, title, body, payload).
Recorded = tuple[Alert, str, str, dict[str, Any]]
#: One run's part of a grouped save: (old, new, the run's own alerts, status_json or None).
Change = tuple[RunState, RunState, list[Recorded], str | None]


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def monitor_row(store: Store, stage_dir: str, run_id: str) -> dict[str, Any]:
    rows = store.query(
        "SELECT * FROM run_monitor WHERE stage_dir = ? AND run_id = ?", (stage_dir, run_id)
    )
    return dict(rows[0]) if rows else {}


def load_states(
    store: Store, *, targets: Iterable[str] | None = None
) -> list[tuple[RunRecord, RunState]]:
    """Every run the monitor polls (running or hung), with the state machine's view of it."""
    marks = ",".join("?" for _ in MONITORED_PHASES)
    sql = (
        "SELECT r.*, m.gone_since AS m_gone_since, m.unreachable_alerted AS m_unreachable_alerted, "
        "m.cancel_requested AS m_cancel_requested FROM runs r LEFT JOIN run_monitor m "
        f"ON m.stage_dir = r.stage_dir AND m.run_id = r.run_id WHERE r.phase IN ({marks})"
    )
    params: list[Any] = [p.value for p in MONITORED_PHASES]
    wanted = list(targets) if targets is not None else None
    if wanted is not None:
        if not wanted:
            return []
        sql += f" AND r.target IN ({','.join('?' for _ in wanted)})"
        params += wanted
    sql += " ORDER BY r.target, r.created_at"
    out: list[tuple[RunRecord, RunState]] = []
    for row in store.query(sql, tuple(params)):
        d = dict(row)
        mon = {k[2:]: d.pop(k) for k in list(d) if k.startswith("m_")}
        rec = RunRecord.model_validate(d)
        out.append(
            (
                rec,
                RunState.from_record(
                    rec,
                    unreachable_alerted=bool(mon.get("unreachable_alerted")),
                    gone_since=_dt(mon.get("gone_since")),
                    cancel_requested=bool(mon.get("cancel_requested")),
                ),
            )
        )
    return out


def active_targets(store: Store) -> list[str]:
    """Targets with at least one run to poll (cheap: one indexed query, no remote call)."""
    marks = ",".join("?" for _ in MONITORED_PHASES)
    rows = store.query(
        f"SELECT DISTINCT target FROM runs WHERE phase IN ({marks}) ORDER BY target",
        tuple(p.value for p in MONITORED_PHASES),
    )
    return [r["target"] for r in rows]


def active_poll_intervals(store: Store) -> dict[str, float | None]:
    """Every target with a run to poll, with the shortest `poll_interval_s` a stage of its
    active runs asks for (None: none asks). One query; reads the store only."""
    marks = ",".join("?" for _ in MONITORED_PHASES)
    rows = store.query(
        f"SELECT target, spec_json FROM runs WHERE phase IN ({marks}) ORDER BY target",
        tuple(p.value for p in MONITORED_PHASES),
    )
    out: dict[str, float | None] = {}
    for r in rows:
        try:
            value = json.loads(r["spec_json"] or "{}").get("poll_interval_s")
        except (ValueError, AttributeError):
            value = None
        have = out.get(r["target"])
        if isinstance(value, (int, float)) and value > 0:
            out[r["target"]] = float(value) if have is None else min(have, float(value))
        else:
            out.setdefault(r["target"], None)
    return out


def save(
    store: Store,
    old: RunState,
    new: RunState,
    alerts: list[Recorded],
    *,
    status_json: str | None = None,
) -> list[int]:
    """Write a transition and its alerts (alert, title, body, payload) in one transaction.

    Returns the ids of alerts recorded now (an alert whose dedup_key exists is not recorded
    again: that is what makes a restarted watcher send nothing twice).
    """
    changed = _changes(old, new, status_json)
    if not changed and not _mon_changed(old, new) and not alerts:
        return []
    now = now_iso()
    with store.tx() as db:
        if not _write_transition(db, old, new, changed, now):
            return []  # changed under us (e.g. `orch stop`): the next poll starts afresh
        return _insert_alerts(db, alerts, now)


def save_many(store: Store, changes: list[Change], shared: list[Recorded]) -> list[int]:
    """Several runs' transitions, each with its own alerts, and the alerts they share (one per
    target: `unreachable`, `reachable`) in ONE transaction, so a watcher killed halfway cannot
    leave some runs marked as told and others not (which would derive the shared alert again,
    under another episode key, on restart).

    A run changed under us meanwhile (e.g. `orch stop`) is skipped with its own alerts, and is
    judged afresh on the next poll; the shared alerts are recorded if any run was written."""
    changes = [c for c in changes if c[2] or _changes(c[0], c[1], c[3]) or _mon_changed(c[0], c[1])]
    if not changes and not shared:
        return []  # nothing to write: no transaction (a quiet poll costs no commit)
    now = now_iso()
    ids: list[int] = []
    with store.tx() as db:
        written = False
        for old, new, alerts, status_json in changes:
            if _write_transition(db, old, new, _changes(old, new, status_json), now):
                written = True
                ids += _insert_alerts(db, alerts, now)
        if written:
            ids += _insert_alerts(db, shared, now)
    return ids


def record_alerts(store: Store, alerts: list[Recorded]) -> list[int]:
    """Record alerts that come with no run transition (e.g. a target's changed host key);
    an alert whose dedup_key exists is not recorded again."""
    with store.tx() as db:
        return _insert_alerts(db, alerts, now_iso())


def _changes(old: RunState, new: RunState, status_json: str | None) -> dict[str, Any]:
    changed = {f: getattr(new, f) for f in _RUN_FIELDS if getattr(new, f) != getattr(old, f)}
    if status_json is not None:
        changed["status_json"] = status_json
    return changed


def _mon_changed(old: RunState, new: RunState) -> bool:
    return any(getattr(new, f) != getattr(old, f) for f in _MON_FIELDS)


def _write_transition(
    db: sqlite3.Connection, old: RunState, new: RunState, changed: dict[str, Any], now: str
) -> bool:
    """Update `runs` (only if the run is still in `old.phase`), phase_history and run_monitor;
    False when the run changed under us and nothing was written."""
    if changed:
        changed = {**changed, "updated_at": now}
        sets = ", ".join(f"{k} = ?" for k in changed)  # keys from the fixed tuple above
        cur = db.execute(
            f"UPDATE runs SET {sets} WHERE stage_dir = ? AND run_id = ? AND phase = ?",
            (*(to_db(v) for v in changed.values()), new.stage_dir, new.run_id, old.phase.value),
        )
        if cur.rowcount == 0:
            return False
        if new.phase != old.phase:
            db.execute(
                "INSERT INTO phase_history (stage_dir, run_id, phase, reason, at) VALUES (?,?,?,?,?)",
                (new.stage_dir, new.run_id, new.phase.value, new.reason, now),
            )
    if _mon_changed(old, new):
        db.execute(
            "INSERT INTO run_monitor (stage_dir, run_id, gone_since, unreachable_alerted, cancel_requested) "
            "VALUES (?,?,?,?,?) ON CONFLICT(stage_dir, run_id) DO UPDATE SET "
            "gone_since = excluded.gone_since, unreachable_alerted = excluded.unreachable_alerted, "
            "cancel_requested = excluded.cancel_requested",
            (
                new.stage_dir,
                new.run_id,
                to_db(new.gone_since),
                int(new.unreachable_alerted),
                int(new.cancel_requested),
            ),
        )
    return True


def _insert_alerts(db: sqlite3.Connection, alerts: list[Recorded], now: str) -> list[int]:
    ids: list[int] = []
    for alert, title, body, payload in alerts:
        cur = db.execute(
            "INSERT OR IGNORE INTO alerts (dedup_key, stage_dir, run_id, target, kind, title, body, "
            "created_at, payload_json) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                alert.dedup_key,
                alert.stage_dir,
                alert.run_id,
                alert.target,
                alert.kind,
                title,
                body,
                now,
                json.dumps(payload, sort_keys=True, default=str),
            ),
        )
        if cur.rowcount:
            ids.append(int(cur.lastrowid or 0))
    return ids


# -- actions ledger -------------------------------------------------------------------------
def actions_done(store: Store, stage_dir: str, run_id: str) -> set[str]:
    text = monitor_row(store, stage_dir, run_id).get("actions_done") or ""
    return {a for a in text.split(",") if a}


def record_action(
    store: Store,
    stage_dir: str,
    run_id: str,
    action: str,
    *,
    error: str = "",
    at: datetime | None = None,
    next_try: datetime | None = None,
    gave_up: bool = False,
) -> None:
    """Record that `action` finished (error == "": the failure streak ends) or failed once:
    attempts counted, the streak's start kept (`action_failing_since`, from `at`), the next
    try (`next_try`, None: whenever asked) and whether it is given up for good."""
    when = to_db(at) if at is not None else now_iso()
    with store.tx() as db:
        db.execute(
            "INSERT INTO run_monitor (stage_dir, run_id) VALUES (?,?) ON CONFLICT(stage_dir, run_id) DO NOTHING",
            (stage_dir, run_id),
        )
        row = db.execute(
            "SELECT actions_done FROM run_monitor WHERE stage_dir = ? AND run_id = ?",
            (stage_dir, run_id),
        ).fetchone()
        done = {a for a in (row["actions_done"] or "").split(",") if a}
        if not error:
            done.add(action)
            db.execute(
                "UPDATE run_monitor SET actions_done = ?, action_error = '', action_attempts = 0, "
                "action_failing_since = NULL, action_next_try = NULL, action_gave_up = 0 "
                "WHERE stage_dir = ? AND run_id = ?",
                (",".join(sorted(done)), stage_dir, run_id),
            )
            return
        db.execute(
            "UPDATE run_monitor SET action_error = ?, action_attempts = action_attempts + 1, "
            "action_failing_since = COALESCE(action_failing_since, ?), action_next_try = ?, "
            "action_gave_up = ? WHERE stage_dir = ? AND run_id = ?",
            (error, when, to_db(next_try), int(gave_up), stage_dir, run_id),
        )
