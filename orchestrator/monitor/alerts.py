"""Alerts: what they say, where they go, and how secrets stay out of logs.

Sinks: every Apprise URL of `[alerts] urls` (ntfy, Slack, Discord, Telegram, email, a JSON
webhook, desktop, ...; `${NAME}` expanded from the environment at SEND time, so the token never
sits in orch.toml), plus `[alerts] command`, a local program that gets the alert as JSON on stdin.

Delivery never raises into the watcher. An alert is recorded in the store before anything is
sent (see `ledger.save`); `deliver_pending` claims a due alert for this process (`claimed_by`),
and for each sink it has not reached records the sink as *sending* before the send and as
*done* (or failed) right after it. So a sender killed at any instant leaves, per sink, one of:
never started (sent after restart, first time), done (never sent again), failed (retried), or
in doubt (killed during the send itself: sent again after restart, flagged as a redelivery).
Every send of one alert carries the same id (`alert_uid`): the `X-Orch-Alert-Id` header and an
`alert_id` field for JSON webhooks, `alert_id` / `ORCH_ALERT_ID` for the command hook, so a
receiver drops the duplicate that an in-doubt resend can make (flagged), or a retry after a
send that failed once the receiver had it (a timeout waiting for its answer; not flagged).
Attempts, the (redacted) last error and the next retry time (exponential backoff with jitter,
given up after `retry_max` tries) are recorded. Apprise itself is imported only when something is sent or a
URL is checked (`orchestrator.alerturls`: the URL syntax, shared with config).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.alerturls import Redactor, expand_env, redact_url
from orchestrator.monitor.statemachine import Alert
from state.errors import ConfigError
from state.store import Store

if TYPE_CHECKING:
    from orchestrator.config import AlertSettings

log = logging.getLogger("orch.alerts")

COMMAND_TIMEOUT_S = 30.0
CLAIM_S = 120.0  # a live sender's claim lapses after this long without a send (renewed per sink)
ID_HEADER = "X-Orch-Alert-Id"
REDELIVERY_HEADER = "X-Orch-Alert-Redelivery"
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 600.0


# -- what an alert says ------------------------------------------------------------------------
_WORDS = {
    "succeeded": "succeeded",
    "failed": "FAILED",
    "crashed": "CRASHED",
    "hung": "is HUNG",
    "timed_out": "TIMED OUT",
    "lost": "LOST (instance gone)",
    "unreachable": "unreachable",
    "reachable": "reachable again",
    "host_key": "HOST KEY CHANGED",
    "pull_stuck": "results NOT PULLED",
    "cancelled": "cancelled",
}


def alert_payload(alert: Alert, *, runs: list[str] | None = None) -> dict[str, Any]:
    """The alert as JSON (what the command hook gets on stdin, and what the store keeps)."""
    return {
        "kind": alert.kind,
        "phase": alert.phase,
        "stage": alert.stage,
        "stage_dir": alert.stage_dir,
        "run_id": alert.run_id,
        "target": alert.target,
        "reason": alert.reason,
        "step": alert.step,
        "total_steps": alert.total_steps,
        "loss": alert.loss,
        "logs_command": alert.logs_command,
        "dedup_key": alert.dedup_key,
        "runs": runs or [f"{alert.stage_dir}/{alert.run_id}"],
        **alert.extra,  # e.g. `fix` of a host_key alert
    }


#: Target-wide alerts: how their body names the runs, and what the researcher should know.
_TARGET_LINES = {
    "unreachable": (
        "runs on it",
        "not a crash: the runs are judged again as soon as the box answers",
    ),
    "reachable": (
        "still running on it",
        "the runs are being judged again; any that ended meanwhile get their own alert",
    ),
    "host_key": (
        "runs on it (not judged until this is fixed)",
        "orch refuses to talk to it: check the box; if it was rebuilt, drop the old pin",
    ),
}


def format_alert(payload: dict[str, Any]) -> tuple[str, str]:
    """(title, body) of an alert payload: short enough for a phone notification."""
    kind = payload["kind"]
    word = _WORDS.get(kind, kind)
    if kind in _TARGET_LINES:  # about a whole box, not one run
        label, note = _TARGET_LINES[kind]
        note = str(payload.get("fix") or note)
        title = f"orch: target {payload['target']} {word}"
        lines = [
            f"target: {payload['target']}   {payload.get('reason', '')}",
            f"{label}: {', '.join(payload.get('runs') or [])}",
            note,
            "see: orch status",
        ]
        return title, "\n".join(lines)
    title = f"orch: {payload['stage']} {word} on {payload['target']}"
    lines = [
        f"stage: {payload['stage']}   run: {payload['stage_dir']}/{payload['run_id']}",
        f"target: {payload['target']}   phase: {payload['phase']}",
    ]
    if payload.get("reason"):
        lines.append(f"reason: {payload['reason']}")
    if len(payload.get("runs") or []) > 1:
        lines.append(f"runs affected: {', '.join(payload['runs'])}")
    step, total, loss = payload.get("step"), payload.get("total_steps"), payload.get("loss")
    if step is not None:
        prog = f"last step: {step}" + (f"/{total}" if total else "")
        if loss is not None:
            prog += f"   loss: {loss:.4g}"
        lines.append(prog)
    if payload.get("fix"):
        lines.append(str(payload["fix"]))
    lines.append(f"logs: {payload['logs_command']}")
    return title, "\n".join(lines)


def _notify_type(kind: str) -> str:
    if kind == "succeeded":
        return "success"
    if kind in ("reachable", "relaunched"):
        return "info"  # good news, but nothing finished
    if kind in ("unreachable", "hung", "cancelled"):
        return "warning"  # host_key falls through: a possible attack is a failure
    return "failure"


# -- sinks and delivery ------------------------------------------------------------------------
class DeliveryError(Exception):
    """One sink refused or failed an alert; the message is already redacted."""


@dataclass(frozen=True)
class Sink:
    id: str  # stable across restarts: which sinks an alert reached is stored by id
    label: str  # safe to print
    url: str = ""
    argv: tuple[str, ...] = ()


def sinks_for(settings: AlertSettings) -> list[Sink]:
    sinks = [
        Sink(id="u" + hashlib.sha256(u.encode()).hexdigest()[:10], label=redact_url(u), url=u)
        for u in settings.urls
    ]
    if settings.command:
        argv = tuple(settings.command)
        sinks.append(
            Sink(
                id="c" + hashlib.sha256("\0".join(argv).encode()).hexdigest()[:10],
                label=f"command {argv[0]}",
                argv=argv,
            )
        )
    return sinks


def send(
    sink: Sink,
    title: str,
    body: str,
    payload: dict[str, Any],
    redact: Redactor,
    *,
    uid: str = "",
    redelivery: bool = False,
) -> None:
    """Send one alert to one sink; DeliveryError (redacted) on any failure.

    `uid` (the alert's stable id) and `redelivery` (this sink may already have it: the last
    sender died during the send) go to the command hook as `alert_id`/`redelivery` fields and
    `ORCH_ALERT_ID`/`ORCH_ALERT_REDELIVERY`, to HTTP webhooks (json://, xml://, form://) as
    `X-Orch-Alert-Id`/`X-Orch-Alert-Redelivery` headers and (JSON) payload fields."""
    if uid:
        payload = {**payload, "alert_id": uid, "redelivery": redelivery}
    if sink.argv:
        env = {**os.environ, "ORCH_ALERT_ID": uid, "ORCH_ALERT_REDELIVERY": str(int(redelivery))}
        try:
            out = subprocess.run(
                list(sink.argv),
                input=json.dumps(payload, sort_keys=True, default=str).encode(),
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
                env=env,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeliveryError(redact(f"{sink.label}: {exc}")) from None
        if out.returncode != 0:
            tail = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise DeliveryError(redact(f"{sink.label} exited {out.returncode}: {tail[0][:300]}"))
        return
    # lazy, for start-up time: pulls in apprise
    import apprise

    logging.getLogger("apprise").propagate = False  # its debug lines hold full URLs
    try:
        url = expand_env(sink.url)
    except ConfigError as exc:
        raise DeliveryError(str(exc)) from None
    ap = apprise.Apprise()
    with apprise.LogCapture(level=logging.WARNING) as captured:
        plugin = apprise.Apprise.instantiate(url)
        if plugin is None or not ap.add(plugin):
            raise DeliveryError(f"{sink.label}: Apprise cannot use this URL")
        if uid:
            _tag(plugin, uid, redelivery)
            if redelivery:  # services without headers: a human can tell it is a repeat
                body += f"\n(sent again: orch stopped while first sending this; alert id {uid})"
        ok = ap.notify(title=title, body=body, notify_type=_notify_type(str(payload.get("kind"))))
    if not ok:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        raise DeliveryError(
            redact(f"{sink.label}: {lines[-1] if lines else 'delivery failed'}"[:500])
        )


def _tag(plugin: Any, uid: str, redelivery: bool) -> None:
    """Put the alert id on an Apprise plugin that sends custom HTTP headers / JSON fields."""
    headers = getattr(plugin, "headers", None)
    if isinstance(headers, dict):
        headers[ID_HEADER] = uid
        if redelivery:
            headers[REDELIVERY_HEADER] = "1"
    extras = getattr(plugin, "payload_extras", None)
    if isinstance(extras, dict) and type(plugin).__name__ == "NotifyJSON":
        extras.setdefault("alert_id", uid)
        if redelivery:
            extras.setdefault("redelivery", "true")


def alert_uid(dedup_key: str, created_at: str) -> str:
    """The alert's stable id, the same in every send of it (and derived again identically)."""
    return hashlib.sha256(f"{dedup_key}\0{created_at}".encode()).hexdigest()[:24]


def is_wanted(kind: str, on: list[str]) -> bool:
    """Is an alert of `kind` sent under `[alerts] on`? "Reachable again" answers an
    "unreachable" page, so it is sent only while both are on; "host key changed" replaces
    the "unreachable" page of a box orch refuses, so either name turns it on."""
    if kind == "reachable":
        return "reachable" in on and "unreachable" in on
    if kind == "host_key":  # it stands in for the `unreachable` page a refused box would get
        return "host_key" in on or "unreachable" in on
    return kind in on


def backoff_s(attempts: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempts` (1-based): 2, 4, 8 ... capped, +-25 % jitter."""
    base = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    return base * (rng or random).uniform(0.75, 1.25)


@dataclass
class DeliveryReport:
    delivered: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    gave_up: list[int] = field(default_factory=list)


def _iso(dt: datetime) -> str:
    return dt.isoformat()


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks (Linux), so a reused pid is not taken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def sender_id() -> str:
    """Who claims alerts: `host:pid:start ticks` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _sender_alive(owner: str) -> bool:
    """Is the process that claimed an alert still running? (Another host: assume so; its
    claim lapses after CLAIM_S.)"""
    host, _, rest = owner.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not ticks or _start_ticks(pid) in ("", ticks)


def _split(text: str | None) -> set[str]:
    return {s for s in (text or "").split(",") if s}


def release_dead_claims(store: Store) -> int:
    """Free the alerts claimed by senders that died (killed watcher, `orch status`)."""
    rows = store.query(
        "SELECT id, claimed_by FROM alerts WHERE claimed_by != '' AND delivered_at IS NULL"
    )
    dead = [(int(r["id"]), r["claimed_by"]) for r in rows if not _sender_alive(r["claimed_by"])]
    with store.tx() as db:
        for alert_id, owner in dead:
            db.execute(
                "UPDATE alerts SET claimed_by = '', claimed_until = NULL "
                "WHERE id = ? AND claimed_by = ?",
                (alert_id, owner),
            )
    return len(dead)


def _claim(store: Store, alert_id: int, now: datetime, owner: str) -> bool:
    """Take an alert for sending (no other sender, thread or process, sends it meanwhile)."""
    with store.tx() as db:
        cur = db.execute(
            "UPDATE alerts SET claimed_by = ?, claimed_until = ? WHERE id = ? "
            "AND delivered_at IS NULL AND gave_up = 0 "
            "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
            "AND (claimed_by = '' OR claimed_until IS NULL OR claimed_until <= ?)",
            (owner, _iso(now + timedelta(seconds=CLAIM_S)), alert_id, _iso(now), _iso(now)),
        )
        return cur.rowcount == 1


def _begin_send(store: Store, alert_id: int, sink_id: str, owner: str, now: datetime) -> bool:
    """Record that a send to `sink_id` starts now (BEFORE it starts); renews the claim.
    False when the claim was lost meanwhile (nothing may be sent then)."""
    until = _iso(max(now, datetime.now(timezone.utc)) + timedelta(seconds=CLAIM_S))
    with store.tx() as db:
        row = db.execute(
            "SELECT sinks_sending FROM alerts WHERE id = ? AND claimed_by = ?", (alert_id, owner)
        ).fetchone()
        if row is None:
            return False
        sending = _split(row["sinks_sending"]) | {sink_id}
        db.execute(
            "UPDATE alerts SET sinks_sending = ?, claimed_until = ? WHERE id = ?",
            (",".join(sorted(sending)), until, alert_id),
        )
    return True


def _end_send(store: Store, alert_id: int, sink_id: str, *, ok: bool) -> None:
    """Record a send's outcome right after it: done (never sent again) or failed (retried)."""
    with store.tx() as db:
        row = db.execute(
            "SELECT sinks_sending, sinks_done FROM alerts WHERE id = ?", (alert_id,)
        ).fetchone()
        if row is None:
            return
        sending = _split(row["sinks_sending"]) - {sink_id}
        done = _split(row["sinks_done"]) | ({sink_id} if ok else set())
        db.execute(
            "UPDATE alerts SET sinks_sending = ?, sinks_done = ? WHERE id = ?",
            (",".join(sorted(sending)), ",".join(sorted(done)), alert_id),
        )


def reset_retry_schedule(store: Store) -> int:
    """On watcher start: every undelivered alert (not given up) is due now. Claims are left
    alone: a live sender keeps its alert, a dead one's claim is freed by the next delivery."""
    with store.tx() as db:
        cur = db.execute(
            "UPDATE alerts SET next_attempt_at = NULL WHERE delivered_at IS NULL AND gave_up = 0"
        )
        return int(cur.rowcount)


def _payload_of(row: Any) -> dict[str, Any]:
    try:
        payload = json.loads(row["payload_json"]) if row["payload_json"] else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):  # recorded by another part of orch (e.g. idle)
        payload = {
            "kind": row["kind"],
            "stage_dir": row["stage_dir"],
            "run_id": row["run_id"],
            "target": row["target"],
            "dedup_key": row["dedup_key"],
        }
    return {**payload, "title": row["title"], "body": row["body"]}


def deliver_pending(
    store: Store,
    settings: AlertSettings,
    *,
    now: datetime | None = None,
    redactor: Redactor | None = None,
    limit: int = 50,
) -> DeliveryReport:
    """Send every due undelivered alert to the sinks it has not reached. Never raises for a
    sink's failure: it is recorded (attempts, last_error, next_attempt_at) and retried."""
    now = now or datetime.now(timezone.utc)
    redact = redactor or Redactor(settings.urls)
    sinks = sinks_for(settings)
    owner = sender_id()
    report = DeliveryReport()
    release_dead_claims(store)
    rows = store.query(
        "SELECT id FROM alerts WHERE delivered_at IS NULL AND gave_up = 0 "
        "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
        "AND (claimed_by = '' OR claimed_until IS NULL OR claimed_until <= ?) ORDER BY id LIMIT ?",
        (_iso(now), _iso(now), limit),
    )
    for alert_id in (int(r["id"]) for r in rows):
        if not _claim(store, alert_id, now, owner):
            continue
        row = store.query("SELECT * FROM alerts WHERE id = ?", (alert_id,))[0]
        payload = _payload_of(row)
        uid = alert_uid(row["dedup_key"], row["created_at"])
        done = _split(row["sinks_done"])
        in_doubt = _split(row["sinks_sending"])  # a sender died during these sends
        wanted = sinks if is_wanted(str(row["kind"]), settings.on) else []
        errors: list[str] = []
        lost_claim = False
        for sink in wanted:
            if sink.id in done:
                continue
            if not _begin_send(store, alert_id, sink.id, owner, now):
                lost_claim = True  # a lapsed claim taken by another sender: it carries on
                break
            try:
                send(
                    sink,
                    row["title"],
                    row["body"],
                    payload,
                    redact,
                    uid=uid,
                    redelivery=sink.id in in_doubt,
                )
                ok = True
            except DeliveryError as exc:
                errors.append(str(exc))
                ok = False
            except Exception as exc:  # a sink must never take the watcher down
                errors.append(redact(f"{sink.label}: {type(exc).__name__}: {exc}"))
                ok = False
            _end_send(store, alert_id, sink.id, ok=ok)
            if ok:
                done.add(sink.id)
        if lost_claim:
            continue
        attempts = int(row["attempts"]) + 1
        release = "claimed_by = '', claimed_until = NULL, sinks_sending = ''"
        if not errors:
            with store.tx() as db:
                db.execute(
                    "UPDATE alerts SET delivered_at = ?, attempts = ?, last_error = '', "
                    f"next_attempt_at = NULL, {release} WHERE id = ?",
                    (_iso(datetime.now(timezone.utc)), attempts, alert_id),
                )
            report.delivered.append(alert_id)
            continue
        error = "; ".join(errors)[:1000]
        give_up = attempts > settings.retry_max
        with store.tx() as db:
            db.execute(
                "UPDATE alerts SET attempts = ?, last_error = ?, next_attempt_at = ?, "
                f"gave_up = ?, {release} WHERE id = ?",
                (
                    attempts,
                    error,
                    None if give_up else _iso(now + timedelta(seconds=backoff_s(attempts))),
                    int(give_up),
                    alert_id,
                ),
            )
        report.failed[alert_id] = error
        if give_up:
            report.gave_up.append(alert_id)
        log.warning("alert %s not delivered (attempt %d): %s", row["dedup_key"], attempts, error)
    return report
