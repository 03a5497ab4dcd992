"""Alerts: URL validation at config load, redaction, dedup in the store, delivery bookkeeping
(retry with backoff, per-sink progress, give-up), the command hook, against a real local HTTP
server (Apprise `json://`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.alerturls import Redactor, check_urls, expand_env, redact_url, url_problem
from orchestrator.config import AlertSettings, parse_config
from orchestrator.monitor import ledger
from orchestrator.monitor.alerts import alert_payload, backoff_s, deliver_pending, format_alert
from orchestrator.monitor.refresh import merge_target_alerts
from orchestrator.monitor.statemachine import Alert, Limits, RunState, transition
from state.errors import ConfigError
from state.models import RunObservation, RunRecord, RunStatus
from state.phases import Phase
from state.store import Store
from tests.webhook import Webhook

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def _run(store: Store, run_id: str = "20260101-000000") -> RunState:
    rec = RunRecord(
        run_id=run_id,
        stage="stage1",
        stage_dir="s1",
        target="box",
        phase=Phase.RUNNING,
        session=f"orch-stage1-{run_id}",
        run_dir=f"runs/s1/{run_id}",
        created_at=T0,
        updated_at=T0,
    )
    store.insert_run(rec)
    return RunState.from_record(rec)


def _alert(state: RunState, kind: str = "crashed") -> tuple[Alert, str, str, dict[str, object]]:
    a = Alert(
        kind=kind,
        dedup_key=f"{state.key}/{kind}",
        stage=state.stage,
        stage_dir=state.stage_dir,
        run_id=state.run_id,
        target=state.target,
        phase=kind,
        reason="killed by SIGKILL",
        step=7,
        total_steps=10,
        loss=0.5,
    )
    payload = alert_payload(a)
    title, body = format_alert(payload)
    return a, title, body, payload


def _record(store: Store, kind: str = "crashed", run_id: str = "20260101-000000") -> int:
    prev = _run(store, run_id)
    new = RunState(**{**prev.__dict__, "phase": Phase(kind)})
    ids = ledger.save(store, prev, new, [_alert(prev, kind)])
    assert len(ids) == 1
    return ids[0]


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("json://127.0.0.1:8080/hook", None),
        ("ntfy://ntfy.sh/my-topic", None),
        ("tgram://${TG_TOKEN}/${TG_CHAT}", None),
        ("slack:/T1/B2/C3", "scheme://"),
        ("", "empty"),
        ("json://host/${BROKEN", "malformed ${NAME}"),
        ("not a url", "scheme://"),
    ],
)
def test_url_syntax(url: str, problem: str | None) -> None:
    got = url_problem(url)
    assert (got is None) if problem is None else (problem in (got or ""))


def test_deep_check_asks_apprise() -> None:
    assert url_problem("json://127.0.0.1:8080/hook", deep=True) is None
    assert "unknown alert service" in (url_problem("nosuchservice://x/y", deep=True) or "")
    with pytest.raises(ConfigError, match=r"alerts\.urls\[1\]"):
        check_urls(["json://localhost/x", "nosuchservice://secret-token-123"], deep=True)


def test_malformed_url_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"alerts": {"urls": ["json://ok.example.com/x", "discord:/12345/SECRETTOKEN"]}},
            "orch.toml",
        )
    msg = str(err.value)
    assert "orch.toml" in msg and "alerts.urls[1]" in msg
    assert "SECRETTOKEN" not in msg  # the error line itself is redacted
    with pytest.raises(ConfigError, match="alerts.command"):
        parse_config({"alerts": {"command": []}})


def test_env_is_expanded_at_send_time_only() -> None:
    assert (
        expand_env("ntfy://${HOST}/${TOPIC}", {"HOST": "ntfy.sh", "TOPIC": "t1"})
        == "ntfy://ntfy.sh/t1"
    )
    with pytest.raises(ConfigError, match="TOPIC"):
        expand_env("ntfy://ntfy.sh/${TOPIC}", {})


# -- redaction -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "shown", "hidden"),
    [
        ("tgram://123456789:AAHsecretBotToken/987654", "tgram://***", "AAHsecretBotToken"),
        ("slack://TOKENA/TOKENB/TOKENC/#general", "slack://***", "TOKENB"),
        (
            "discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV",
            "discord://***",
            "JHMHI8qBe7bk2ZwO5U711o3dV",
        ),
        (
            "json://127.0.0.1:8080/hook?token=s3cr3tvalue",
            "json://127.0.0.1:8080/***",
            "s3cr3tvalue",
        ),
        ("mailtos://alice:hunter2pw@gmail.com", "mailtos://***@gmail.com", "hunter2pw"),
        ("ntfy://ntfy.sh/private-topic-42", "ntfy://ntfy.sh/***", "private-topic-42"),
    ],
)
def test_redact_url(url: str, shown: str, hidden: str) -> None:
    out = redact_url(url)
    assert out == shown and hidden not in out


def test_redactor_scrubs_urls_tokens_and_env_values_from_text() -> None:
    env = {"TG_TOKEN": "123:SuperSecretToken", "TG_CHAT": "5550001"}
    r = Redactor(
        ["tgram://${TG_TOKEN}/${TG_CHAT}", "json://hooks.example.com/p?key=abcdef123"], env
    )
    text = (
        "POST https://api.telegram.org/bot123:SuperSecretToken/sendMessage failed; chat 5550001; "
        "retrying json://hooks.example.com/p?key=abcdef123 and key abcdef123"
    )
    out = r(text)
    for secret in ("SuperSecretToken", "5550001", "abcdef123"):
        assert secret not in out
    assert "hooks.example.com" in out  # a plain host name stays, so the error is still useful


# -- content ---------------------------------------------------------------------------------
def test_alert_text_carries_what_a_researcher_needs() -> None:
    s = RunState(
        stage_dir="s1",
        run_id="20260101-000000",
        stage="stage1",
        target="box",
        phase=Phase.CRASHED,
        started_at=T0,
    )
    _, title, body, payload = _alert(s)
    assert title == "orch: stage1 CRASHED on box"
    for part in (
        "stage1",
        "s1/20260101-000000",
        "box",
        "crashed",
        "SIGKILL",
        "7/10",
        "0.5",
        "orch logs s1/20260101-000000",
    ):
        assert part in body
    assert payload["logs_command"] == "orch logs s1/20260101-000000"


# -- store: dedup and delivery ---------------------------------------------------------------
def test_dedup_one_alert_per_state_change(store: Store) -> None:
    prev = _run(store)
    new = RunState(**{**prev.__dict__, "phase": Phase.CRASHED})
    assert len(ledger.save(store, prev, new, [_alert(prev)])) == 1
    # A restarted watcher seeing the same change again records nothing new.
    again = ledger.save(store, prev, new, [_alert(prev)])
    assert again == []
    assert len(store.query("SELECT * FROM alerts")) == 1
    assert [p for p, _, _ in store.phase_history("s1", prev.run_id)] == ["running", "crashed"]


def test_delivery_to_a_real_webhook(store: Store, hook: Webhook) -> None:
    aid = _record(store)
    rep = deliver_pending(store, AlertSettings(urls=[hook.url]))
    assert rep.delivered == [aid]
    post = hook.wait_for("CRASHED", timeout=5)[0]
    assert "orch logs s1/20260101-000000" in post["message"] and post["type"] == "failure"
    row = store.query("SELECT * FROM alerts WHERE id = ?", (aid,))[0]
    assert row["delivered_at"] and row["attempts"] == 1 and row["last_error"] == ""
    assert deliver_pending(store, AlertSettings(urls=[hook.url])).delivered == []  # sent once
    assert len(hook.posts) == 1


def test_retry_bookkeeping_with_backoff_and_per_sink_progress(
    store: Store, hook: Webhook, tmp_path: Path
) -> None:
    out = tmp_path / "hook.jsonl"
    cmd = [
        sys.executable,
        "-c",
        f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')",
    ]
    url = hook.url + "?token=verysecret42"
    settings = AlertSettings(urls=[url], command=cmd, retry_max=2)
    aid = _record(store)
    hook.fail_with = 500
    rep = deliver_pending(store, settings, now=T0)
    assert list(rep.failed) == [aid]
    row = store.query("SELECT * FROM alerts WHERE id = ?", (aid,))[0]
    assert row["delivered_at"] is None and row["attempts"] == 1
    assert "verysecret42" not in row["last_error"] and row["last_error"]
    due = datetime.fromisoformat(row["next_attempt_at"])
    assert T0 + timedelta(seconds=1) < due <= T0 + timedelta(seconds=3)  # 2 s +-25 %
    # The command hook got it once, with the alert as JSON on stdin.
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["kind"] == "crashed"
    # Not due yet: nothing is attempted.
    assert deliver_pending(store, settings, now=T0 + timedelta(seconds=0.5)).failed == {}
    # Due, webhook back: delivered; the command hook is NOT sent a second copy.
    hook.fail_with = None
    rep = deliver_pending(store, settings, now=T0 + timedelta(seconds=10))
    assert rep.delivered == [aid]
    assert len(out.read_text().splitlines()) == 1 and len(hook.posts) == 1
    assert store.query("SELECT attempts FROM alerts WHERE id = ?", (aid,))[0]["attempts"] == 2


def test_gives_up_after_retry_max_and_never_raises(store: Store) -> None:
    aid = _record(store)
    settings = AlertSettings(urls=["json://127.0.0.1:9/nothing-listens"], retry_max=1)
    now = T0
    for _ in range(2):
        deliver_pending(store, settings, now=now)
        now += timedelta(hours=1)
    row = store.query("SELECT * FROM alerts WHERE id = ?", (aid,))[0]
    assert row["gave_up"] == 1 and row["attempts"] == 2 and row["delivered_at"] is None
    assert deliver_pending(store, settings, now=now + timedelta(hours=1)).failed == {}


def test_unset_env_var_is_recorded_not_raised(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ORCH_TEST_TOPIC", raising=False)
    aid = _record(store)
    rep = deliver_pending(store, AlertSettings(urls=["ntfy://ntfy.sh/${ORCH_TEST_TOPIC}"]))
    assert "ORCH_TEST_TOPIC" in rep.failed[aid]


def test_kinds_not_in_on_are_recorded_but_not_sent(store: Store, hook: Webhook) -> None:
    aid = _record(store, kind="succeeded")
    rep = deliver_pending(store, AlertSettings(urls=[hook.url], on=["crashed"]))
    assert rep.delivered == [aid] and hook.posts == []


def test_backoff_grows_and_is_capped() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_s(n, rng) for n in range(1, 15)]
    assert delays[0] < delays[3] < delays[6]
    assert max(delays) <= 600 * 1.25


# -- "reachable again": one per target and episode ------------------------------------------
def _alerted_outage(store: Store, run_ids: list[str]) -> list[RunState]:
    """Runs on `box` whose outage (since T0) was already paged, as the store holds them."""
    for rid in run_ids:
        prev = _run(store, rid)
        down = replace(prev, unreachable_since=T0, unreachable_alerted=True)
        ledger.save(store, prev, down, [])
    states = [s for _, s in ledger.load_states(store, targets=["box"])]
    assert [s.run_id for s in states] == run_ids and all(s.unreachable_alerted for s in states)
    return states


def _answer(seq: int, **kw: object) -> RunObservation:
    fields: dict[str, object] = {
        "run_dir": "x",
        "status": RunStatus(run_id="r", stage="stage1", seq=seq),
        "status_state": "ok",
        "session_alive": True,
        "pid_alive": True,
        **kw,
    }
    return RunObservation(**fields)  # type: ignore[arg-type]


def _poll_back(
    store: Store, states: list[RunState], at: datetime, answers: list[RunObservation]
) -> list[int]:
    """What the poller does when the box answers: the state machine per run, the target-level
    alerts merged into one, all stored in one transaction."""
    lim = Limits(stale_after_s=3600, timeout_s=86400, unreachable_alert_after_s=60)
    parts, changes = [], []
    for prev, answer in zip(states, answers, strict=True):
        new, alerts = transition(prev, answer, at, lim)
        back = [a for a in alerts if a.kind == "reachable"]
        own = [_alert(new, a.kind) for a in alerts if a.kind != "reachable"]
        changes.append((prev, new, own, None))
        if back:
            parts.append((prev, new, back[0]))
    shared = []
    if parts:
        merged, runs = merge_target_alerts("box", "reachable", parts)
        payload = alert_payload(merged, runs=runs)
        shared = [(merged, *format_alert(payload), payload)]
    return ledger.save_many(store, changes, shared)


def test_reachable_is_one_alert_per_target_and_never_repeated(store: Store, hook: Webhook) -> None:
    states = _alerted_outage(store, ["20260101-000001", "20260101-000002"])
    back_at = T0 + timedelta(minutes=12, seconds=5)
    ids = _poll_back(store, states, back_at, [_answer(1), _answer(1)])
    assert len(ids) == 1  # two runs, one box: one alert
    row = store.query("SELECT * FROM alerts WHERE id = ?", (ids[0],))[0]
    assert row["kind"] == "reachable" and row["dedup_key"] == f"@box/reachable/{T0.isoformat()}"
    # A watcher killed before that transaction committed polls again from the same stored
    # states, later: same key, nothing new recorded.
    assert (
        _poll_back(store, states, back_at + timedelta(seconds=30), [_answer(2), _answer(2)]) == []
    )
    # What the store now says: the episode is over, so the next poll is silent.
    after = [s for _, s in ledger.load_states(store, targets=["box"])]
    assert all(s.unreachable_since is None and not s.unreachable_alerted for s in after)
    assert _poll_back(store, after, back_at + timedelta(seconds=60), [_answer(3), _answer(3)]) == []

    rep = deliver_pending(store, AlertSettings(urls=[hook.url]))
    assert rep.delivered == ids
    post = hook.wait_for("reachable again", timeout=5)[0]
    assert post["title"] == "orch: target box reachable again" and post["type"] == "info"
    assert "answers again after 12m05s of silence" in post["message"]
    assert "s1/20260101-000001, s1/20260101-000002" in post["message"]
    assert len(hook.posts) == 1


def test_reachable_skips_runs_that_ended_meanwhile(store: Store) -> None:
    states = _alerted_outage(store, ["20260101-000001", "20260101-000002"])
    crashed = _answer(1, exit_code=137, session_alive=False, pid_alive=False)
    ids = _poll_back(store, states, T0 + timedelta(minutes=5), [crashed, _answer(1)])
    kinds = {r["kind"]: r for r in store.query("SELECT * FROM alerts")}
    assert sorted(kinds) == ["crashed", "reachable"] and len(ids) == 2
    payload = json.loads(kinds["reachable"]["payload_json"])
    assert payload["runs"] == ["s1/20260101-000002"]  # only the run still going


def test_every_run_ended_during_the_outage_means_no_reachable_alert(store: Store) -> None:
    # Their final alerts already tell that the box answers.
    states = _alerted_outage(store, ["20260101-000001"])
    crashed = _answer(1, exit_code=137, session_alive=False, pid_alive=False)
    _poll_back(store, states, T0 + timedelta(minutes=5), [crashed])
    assert [r["kind"] for r in store.query("SELECT kind FROM alerts")] == ["crashed"]


@pytest.mark.parametrize(
    ("on", "sent"),
    [
        (None, True),  # the default list has both
        (["crashed", "unreachable", "reachable"], True),
        (["crashed", "unreachable"], False),  # the user dropped it
        (["crashed", "reachable"], False),  # never paged "unreachable": no "back" either
    ],
)
def test_reachable_follows_the_on_filter(
    store: Store, hook: Webhook, on: list[str] | None, sent: bool
) -> None:
    states = _alerted_outage(store, ["20260101-000001"])
    _poll_back(store, states, T0 + timedelta(minutes=3), [_answer(1)])
    settings = (
        AlertSettings(urls=[hook.url]) if on is None else AlertSettings(urls=[hook.url], on=on)
    )
    assert len(deliver_pending(store, settings).delivered) == 1  # recorded either way
    assert len(hook.posts) == int(sent)
