"""Ask Vast whether an unreachable instance is outbid, stopped or gone.

The monitor calls `check_instance(ctx, target)` when a vast target does not answer. Not hearing
from a box is never proof of anything; Vast saying the instance is stopped or exited, or
answering `{"instances": null}` for it, is: the processes (tmux included) are gone, so the
target's runs are `lost`. What is not proof (docs show-instance.mdx): `unknown` ("no recent
heartbeat from the host") and `offline` ("computed, not stored") can recover, so they lose the
runs only after `heartbeat_grace_s`; an API error, a 404 included, is never taken as "gone".
A stop is told apart by `intended_status` ("the user's desired target state"): `stopped` means
you or orch asked for it (the disk is intact; `orch up` starts it again); still `running` on a
stopped contract means outbid (`vastai/SKILL.md`: "When outbid, the instance moves to
`stopped`").

Calls are limited to one per instance per `monitor.provider_check_s` (default 60 s): inside that
window the last verdict, kept in the store, is returned without a request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.config import VastTarget as VastConfig
from orchestrator.vast.models import HEARTBEAT_STATES, Instance
from orchestrator.vast.records import running_fields, stopped_fields
from state.errors import OrchError
from state.store import now_iso, parse_time

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.vast.client import VastClient

PROVIDER = "vast"


@dataclass(frozen=True)
class ProviderVerdict:
    lost: bool  # True: the instance's processes are gone for good; mark its runs lost
    reason: str  # one line for the run's reason and the alert
    state: str  # running, loading, stopped, outbid, exited, offline, unknown, gone, error


def verdict_for(
    inst: Instance | None,
    *,
    interruptible: bool,
    heartbeat_lost_s: float = 0.0,
    heartbeat_grace_s: float = 600.0,
) -> ProviderVerdict:
    """Pure: what Vast's answer about an instance means for the runs on it.

    `heartbeat_lost_s`: for how long Vast has reported it unknown/offline (0: just now)."""
    if inst is None:
        return ProviderVerdict(True, "the Vast instance is gone (destroyed or expired)", "gone")
    status = inst.actual_status or ""
    kind = inst.stop_kind(interruptible=interruptible)
    if kind == "outbid":
        return ProviderVerdict(
            True,
            f"Vast instance {inst.id} was outbid and stopped (preempted); "
            "its disk survives, its processes do not",
            "outbid",
        )
    if kind == "user":
        return ProviderVerdict(
            True,
            f"Vast instance {inst.id} was stopped on request (intended_status stopped: you, the "
            "console or orch's idle_action); its disk survives, its processes do not",
            "stopped",
        )
    if kind == "host":
        return ProviderVerdict(
            True,
            f"Vast instance {inst.id} was stopped by its host; its processes are gone",
            "stopped",
        )
    msg = f": {inst.status_msg}" if inst.status_msg else ""
    if status == "exited":
        return ProviderVerdict(True, f"Vast instance {inst.id} exited{msg}", "exited")
    if status in HEARTBEAT_STATES:
        lost = heartbeat_lost_s >= heartbeat_grace_s
        return ProviderVerdict(
            lost,
            f"Vast instance {inst.id} is {status} (no heartbeat from its host for "
            f"{heartbeat_lost_s:.0f} s{', giving up' if lost else ''}){msg}",
            status,
        )
    return ProviderVerdict(
        False, f"Vast reports instance {inst.id} as {status or 'starting'}", status or "created"
    )


def check_instance(
    ctx: Context, target_name: str, *, client: VastClient | None = None, now: datetime | None = None
) -> ProviderVerdict:
    """Is the live instance of vast target `target_name` lost? At most one API call per instance
    per `provider_check_s`; a failing Vast API is never taken as a lost instance."""
    now = now or datetime.now(timezone.utc)
    name, cfg = ctx.config.target(target_name)
    if not isinstance(cfg, VastConfig):
        return ProviderVerdict(False, f"target {name} is not a vast target", "n/a")
    row = ctx.store.live_instance_for(name)
    if row is None:
        return ProviderVerdict(
            True, f"target {name} has no live Vast instance (destroyed?)", "gone"
        )
    iid = str(row["instance_id"])
    info: dict[str, Any] = _info(row)
    checked = parse_time(row.get("last_checked_at"))
    interval = ctx.config.monitor_for(name).provider_check_s
    cached = info.get("verdict")
    if checked is not None and cached and (now - checked).total_seconds() < interval:
        return ProviderVerdict(**cached)

    own = client is None
    try:
        if client is None:
            # lazy, for start-up time: pulls in httpx
            from orchestrator.vast.provision import make_client

            client = make_client(cfg)
        inst = client.show_instance(int(iid))
        since = parse_time(info.get("heartbeat_lost_since"))
        if inst is not None and inst.actual_status in HEARTBEAT_STATES:
            since = since or now
            info["heartbeat_lost_since"] = since.isoformat()
        else:
            since = None
            info.pop("heartbeat_lost_since", None)
        interruptible = bool(info.get("interruptible", cfg.interruptible))
        info["stop_kind"] = inst.stop_kind(interruptible=interruptible) if inst else None
        verdict = verdict_for(
            inst,
            interruptible=interruptible,
            heartbeat_lost_s=(now - since).total_seconds() if since else 0.0,
            heartbeat_grace_s=cfg.heartbeat_grace_s,
        )
    except OrchError as exc:
        verdict = ProviderVerdict(False, f"could not ask Vast about instance {iid}: {exc}", "error")
    finally:
        if own and client is not None:
            client.close()

    info["verdict"] = asdict(verdict)
    fields: dict[str, Any] = {}
    if verdict.state in ("stopped", "outbid"):  # the running stretch (the GPU bill) ends
        info = json.loads(stopped_fields({"info_json": json.dumps(info)}, now)["info_json"])
    elif verdict.state == "running" and info.get("stopped_at"):  # started again elsewhere
        fields = running_fields({**row, "info_json": json.dumps(info)}, now)
        info = json.loads(fields.pop("info_json"))
    fields.update(last_checked_at=now.isoformat(), info_json=json.dumps(info, sort_keys=True))
    if verdict.state != "error":
        fields["state"] = verdict.state
    if verdict.state == "gone":
        fields["destroyed_at"] = now_iso()
    ctx.store.upsert_instance(PROVIDER, iid, name, **fields)
    return verdict


def _info(row: dict[str, Any]) -> dict[str, Any]:
    try:
        data = json.loads(row.get("info_json") or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
