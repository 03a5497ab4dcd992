"""What rented boxes cost, and whether a paid box sits idle.

Spend is estimated from the instance's $/h (`dph`, all-in as Vast quotes it) and how long it
ran: GPU time is billed from `running` (`vastai/SKILL.md`), so the clock runs from
`running_since` (when orch saw the current running stretch begin) to `info.stopped_at`,
`destroyed_at` or now, plus the earlier stretches in `info.prior_running_s` (records.py). Vast's
`start_date` is the contract's start, not the last start, so it is never the clock. A run's
spend is the $/h of its target's instance times the part of the run that overlapped the
instance's running life. The numbers are estimates for budgeting, not invoices.

Idle: a live instance with no active run for `idle_minutes` (counted from the end of its last
run, else from when it started running) raises one `idle` alert and, if `idle_action` says so,
is stopped or destroyed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.config import VastTarget as VastConfig
from orchestrator.vast.records import info_of, stopped_fields
from state.models import RunRecord
from state.store import Store, parse_time

if TYPE_CHECKING:
    from orchestrator.context import Context

PROVIDER = "vast"


def _hours(start: datetime | None, end: datetime | None) -> float:
    if start is None or end is None or end <= start:
        return 0.0
    return (end - start).total_seconds() / 3600.0


def _stretch_end(row: dict[str, Any], now: datetime) -> datetime:
    """Where the current running stretch of an instance row ends (stopped, destroyed, or now)."""
    ends = [
        t
        for t in (parse_time(info_of(row).get("stopped_at")), parse_time(row.get("destroyed_at")))
        if t is not None
    ]
    return min(ends) if ends else now


def instance_hours(row: dict[str, Any], now: datetime | None = None) -> float:
    """Hours an instance row has been running, over every running stretch."""
    now = now or datetime.now(timezone.utc)
    prior = float(info_of(row).get("prior_running_s") or 0.0) / 3600.0
    return prior + _hours(parse_time(row.get("running_since")), _stretch_end(row, now))


def instance_spend(row: dict[str, Any], now: datetime | None = None) -> float:
    """Estimated $ spent on an instance row of the store."""
    return round(float(row.get("dph") or 0.0) * instance_hours(row, now), 4)


def listed_hours(uptime_mins: float | None) -> float | None:
    """Running hours of an instance orch has no record of: Vast's `uptime_mins` when it reports
    one (nullable in docs `show_instance.yaml`), else unknown: `start_date` is only the
    contract's age."""
    return None if uptime_mins is None else float(uptime_mins) / 60.0


def run_spend(store: Store, rec: RunRecord, now: datetime | None = None) -> float | None:
    """Estimated $ of one run: its instance's $/h over the overlap of run and instance.

    None when the run's target never had a recorded instance (local, ssh).
    """
    now = now or datetime.now(timezone.utc)
    rows = [
        r for r in store.list_instances() if r["target"] == rec.target and r["provider"] == PROVIDER
    ]
    if not rows:
        return None
    start = parse_time(rec.created_at)
    end = parse_time(rec.updated_at) if rec.phase.is_terminal else now
    total = 0.0
    for row in rows:
        r_start = parse_time(row.get("running_since"))
        r_end = _stretch_end(row, now)
        if start is None or end is None or r_start is None:
            continue
        total += float(row.get("dph") or 0.0) * _hours(max(start, r_start), min(end, r_end))
    return round(total, 4)


def target_spend(store: Store, target: str, now: datetime | None = None) -> float:
    """Estimated $ of every instance a target has had."""
    return round(
        sum(instance_spend(r, now) for r in store.list_instances() if r["target"] == target), 4
    )


# -- idle -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IdleVerdict:
    target: str
    instance_id: str | None
    idle: bool
    idle_s: float
    since: datetime | None
    action: str  # what the policy asks: alert, stop or destroy ("" when not idle)


def idle_verdict(
    store: Store, target: str, *, idle_minutes: float, action: str, now: datetime | None = None
) -> IdleVerdict:
    """Is the live instance of `target` paid for but doing nothing? (reads the store only)"""
    now = now or datetime.now(timezone.utc)
    row = store.live_instance_for(target)
    if row is None or row.get("state") not in ("running", "idle"):
        return IdleVerdict(target, str(row["instance_id"]) if row else None, False, 0.0, None, "")
    runs = store.list_runs(target=target)
    if any(r.phase.is_active for r in runs):
        return IdleVerdict(target, str(row["instance_id"]), False, 0.0, None, "")
    since = parse_time(row.get("running_since")) or parse_time(row.get("created_at"))
    ends: list[datetime] = [
        e for r in runs if r.phase.is_terminal and (e := parse_time(r.updated_at))
    ]
    if ends and since is not None:
        since = max([since, *ends])
    idle_s = (now - since).total_seconds() if since else 0.0
    idle = since is not None and idle_s >= idle_minutes * 60
    return IdleVerdict(
        target, str(row["instance_id"]), idle, max(idle_s, 0.0), since, action if idle else ""
    )


def apply_idle_policy(ctx: Context, target: str, *, now: datetime | None = None) -> IdleVerdict:
    """Check one vast target for idleness; alert once per idle stretch; stop/destroy if configured.

    Meant for the monitor's scheduler (a few times an hour is plenty).
    """
    name, cfg = ctx.config.target(target)
    if not isinstance(cfg, VastConfig):
        return IdleVerdict(name, None, False, 0.0, None, "")
    v = idle_verdict(
        ctx.store, name, idle_minutes=cfg.idle_minutes, action=cfg.idle_action, now=now
    )
    if not v.idle or v.instance_id is None:
        return v
    row = ctx.store.live_instance_for(name) or {}
    dph = float(row.get("dph") or 0.0)
    since = v.since.isoformat() if v.since else ""
    ctx.store.add_alert(
        f"idle:{name}:{v.instance_id}:{since}",
        kind="idle",
        target=name,
        title=f"{name}: Vast instance {v.instance_id} idle for {v.idle_s / 60:.0f} min",
        body=(
            f"Nothing has run on {name} since {since} while it costs ${dph:.3f}/h. "
            + {
                "alert": f"Run `orch down {name}` if you are done.",
                "stop": "orch is stopping it (disk kept; storage is still billed).",
                "destroy": "orch is destroying it.",
            }[v.action]
        ),
    )
    if v.action in ("stop", "destroy"):
        # lazy, for start-up time: pulls in httpx
        from orchestrator.vast.provision import destroy_recorded, make_client

        with make_client(cfg) as client:
            if v.action == "destroy":
                destroy_recorded(
                    ctx, client, name, cfg, int(v.instance_id), f"idle for {v.idle_s / 60:.0f} min"
                )
            else:
                client.stop_instance(int(v.instance_id))
                stopped = stopped_fields(row, now)
                info = info_of(stopped)
                info["stopped_idle_at"] = info["stopped_at"]
                ctx.store.upsert_instance(
                    PROVIDER, v.instance_id, name, state="stopped", info_json=json.dumps(info)
                )
    return v
