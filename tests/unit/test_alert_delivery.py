"""Alert delivery across a sender's death (issue 13, defect 1), against real HTTP receivers
(tests/webhook.py, Apprise `json://`) and a real command hook.

A sender records each sink as *sending* before the send and *done* right after. A sender killed
during a send leaves that sink in doubt: the restart sends it again, once, with the same alert id
and a redelivery flag, so the receiver can drop it; sinks reached before the kill get nothing
more; a claim held by a live sender is never taken.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.config import AlertSettings
from orchestrator.monitor import ledger
from orchestrator.monitor.alerts import (
    ID_HEADER,
    REDELIVERY_HEADER,
    alert_payload,
    alert_uid,
    deliver_pending,
    format_alert,
    reset_retry_schedule,
    sender_id,
    sinks_for,
)
from orchestrator.monitor.statemachine import Alert, RunState
from state.models import RunRecord
from state.phases import Phase
from state.store import Store
from tests.conftest import REPO
from tests.webhook import Webhook

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def hooks() -> Iterator[tuple[Webhook, Webhook]]:
    a, b = Webhook(), Webhook()
    yield a, b
    a.close()
    b.close()


def _record(path: Path) -> int:
    with Store(path) as store:
        rec = RunRecord(
            run_id="20260101-000000",
            stage="stage1",
            stage_dir="s1",
            target="box",
            phase=Phase.RUNNING,
            session="orch-stage1-20260101-000000",
            run_dir="runs/s1/20260101-000000",
            created_at=T0,
            updated_at=T0,
        )
        store.insert_run(rec)
        prev = RunState.from_record(rec)
        new = RunState(**{**prev.__dict__, "phase": Phase.CRASHED})
        alert = Alert(
            kind="crashed",
            dedup_key=f"{prev.key}/crashed",
            stage="stage1",
            stage_dir="s1",
            run_id=prev.run_id,
            target="box",
            phase="crashed",
            reason="killed by SIGKILL",
        )
        payload = alert_payload(alert)
        title, body = format_alert(payload)
        (aid,) = ledger.save(store, prev, new, [(alert, title, body, payload)])
        return aid


def _sender(db: Path, settings: AlertSettings) -> subprocess.Popen[bytes]:
    """Another process delivering the pending alerts (as `orch watch` would)."""
    code = textwrap.dedent(
        f"""
        from orchestrator.config import AlertSettings
        from orchestrator.monitor.alerts import deliver_pending
        from state.store import Store
        settings = AlertSettings.model_validate_json({settings.model_dump_json()!r})
        with Store({str(db)!r}) as store:
            deliver_pending(store, settings)
        """
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO)


def test_sender_killed_mid_post_resends_once_with_the_same_id(
    tmp_path: Path, hooks: tuple[Webhook, Webhook]
) -> None:
    """Injected: the sender is SIGKILLed while its POST to the second sink is in flight.
    Must hold: the first sink (reached before the kill) gets exactly one POST; the second gets
    the alert again after restart, with the same X-Orch-Alert-Id and a redelivery flag; the
    alert ends delivered."""
    reached, held = hooks
    db = tmp_path / "state.db"
    aid = _record(db)
    settings = AlertSettings(urls=[reached.url, held.url])
    held.hold.clear()  # the second POST is received but never answered
    proc = _sender(db, settings)
    try:
        first = held.wait_for_requests(1, timeout=60)[0]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert reached.wait_for_requests(1)[0][ID_HEADER] == first[ID_HEADER]

    with Store(db) as store:  # the restarted watcher
        reset_retry_schedule(store)
        held.hold.set()
        rep = deliver_pending(store, settings)
        assert rep.delivered == [aid]
        row = store.query("SELECT * FROM alerts WHERE id = ?", (aid,))[0]
        uid = alert_uid(row["dedup_key"], row["created_at"])
        assert row["claimed_by"] == "" and row["sinks_sending"] == ""
        assert deliver_pending(store, settings).delivered == []  # nothing left to send

    assert len(reached.headers) == 1  # never sent twice to a sink that had it
    again = held.wait_for_requests(2)
    assert first[ID_HEADER] == again[1][ID_HEADER] == uid
    assert REDELIVERY_HEADER not in first and again[1][REDELIVERY_HEADER] == "1"
    bodies = held.wait_for("CRASHED", count=2)
    assert {b["alert_id"] for b in bodies} == {uid}  # the JSON field too, for receivers


def test_command_hook_gets_the_id_and_the_redelivery_flag(tmp_path: Path) -> None:
    """A sender that died during the command hook's run (its claim and `sending` mark are
    left behind): the restart runs the hook again with ORCH_ALERT_ID and redelivery set."""
    db = tmp_path / "state.db"
    aid = _record(db)
    out = tmp_path / "hook.jsonl"
    hook = (
        "import json, os, sys; d = json.load(sys.stdin); "
        "d['env_id'] = os.environ['ORCH_ALERT_ID']; "
        "d['env_redelivery'] = os.environ['ORCH_ALERT_REDELIVERY']; "
        f"open({str(out)!r}, 'a').write(json.dumps(d) + '\\n')"
    )
    settings = AlertSettings(command=[sys.executable, "-c", hook])
    (sink,) = sinks_for(settings)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store(db) as store:
        with store.tx() as con:
            con.execute(
                "UPDATE alerts SET claimed_by = ?, claimed_until = '2999-01-01T00:00:00+00:00', "
                "sinks_sending = ? WHERE id = ?",
                (f"{sender_id().split(':')[0]}:{dead.pid}:1", sink.id, aid),
            )
        assert deliver_pending(store, settings).delivered == [aid]
        row = store.query("SELECT * FROM alerts WHERE id = ?", (aid,))[0]
    (line,) = out.read_text().splitlines()
    got = json.loads(line)
    uid = alert_uid(row["dedup_key"], row["created_at"])
    assert got["alert_id"] == got["env_id"] == uid
    assert got["redelivery"] is True and got["env_redelivery"] == "1"


def test_a_live_senders_claim_is_not_taken_even_after_a_restart(tmp_path: Path) -> None:
    """`orch status` (or another thread) is sending an alert when a watcher starts: the new
    watcher neither clears that claim nor sends the alert itself."""
    db = tmp_path / "state.db"
    aid = _record(db)
    out = tmp_path / "hook.jsonl"
    settings = AlertSettings(
        command=[sys.executable, "-c", f"open({str(out)!r}, 'a').write('x\\n')"]
    )
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ticks = Path(f"/proc/{live.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        with Store(db) as store:
            with store.tx() as con:
                con.execute(
                    "UPDATE alerts SET claimed_by = ?, claimed_until = '2999-01-01T00:00:00+00:00' "
                    "WHERE id = ?",
                    (f"{sender_id().split(':')[0]}:{live.pid}:{ticks}", aid),
                )
            reset_retry_schedule(store)
            assert deliver_pending(store, settings).delivered == []
            assert not out.exists()
    finally:
        live.kill()
        live.wait()
    with Store(db) as store:  # the claimer is gone: its alert is free
        assert deliver_pending(store, settings).delivered == [aid]
    assert out.read_text() == "x\n"


def test_a_known_failure_is_retried_without_the_redelivery_flag(
    tmp_path: Path, hooks: tuple[Webhook, Webhook]
) -> None:
    hook, _ = hooks
    db = tmp_path / "state.db"
    aid = _record(db)
    settings = AlertSettings(urls=[hook.url])
    hook.fail_with = 503
    with Store(db) as store:
        assert aid in deliver_pending(store, settings, now=T0).failed
        hook.fail_with = None
        reset_retry_schedule(store)
        assert deliver_pending(store, settings).delivered == [aid]
    first, second = hook.wait_for_requests(2)
    assert first[ID_HEADER] == second[ID_HEADER]
    assert REDELIVERY_HEADER not in second  # the 503 was an answer: nothing was in doubt
