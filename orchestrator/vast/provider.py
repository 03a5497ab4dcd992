"""Ask Vast whether an unreachable instance is outbid, stopped or gone.

The monitor calls `check_instance(ctx, target)` when a vast target does not answer. Not hearing
from a box is never proof of anything; Vast saying the instance is stopped, exited, offline or
unknown to it is: the processes (tmux included) are gone, so the target's runs are `lost`.
Calls are limited to one per instance per `monitor.provider_check_s` (default 60 s): inside that
window the last verdict, kept in the store, is returned without a request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.vast.client import Instance
from orchestrator.vast.cost import parse_time
from state.errors import OrchError
from state.store import now_iso

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.vast.client import VastClient

PROVIDER = "vast"
LOST_STATES = frozenset({"exited", "offline", "unknown"})


@dataclass(frozen=True)
class ProviderVerdict:
    lost: bool  # True: the instance's processes are gone for good; mark its runs lost
    reason: str  # one line for the run's reason and the alert
    state: str  # running, loading, stopped, outbid, exited, offline, unknown, gone, error


def verdict_for(inst: Instance | None, *, interruptible: bool) -> ProviderVerdict:
    """Pure: what Vast's answer about an instance means for the runs on it."""
    if inst is None:
        return ProviderVerdict(True, "the Vast instance is gone (destroyed or expired)", "gone")
    status = inst.actual_status or ""
    if inst.outbid and (interruptible or inst.is_bid):
        return ProviderVerdict(
            True,
            f"Vast instance {inst.id} was outbid and stopped (preempted); "
            "its disk survives, its processes do not",
            "outbid",
        )
    if inst.outbid or status == "stopped":
        return ProviderVerdict(
            True, f"Vast instance {inst.id} is stopped; its processes are gone", "stopped"
        )
    if status in LOST_STATES:
        msg = f": {inst.status_msg}" if inst.status_msg else ""
        return ProviderVerdict(True, f"Vast instance {inst.id} is {status}{msg}", status)
    return ProviderVerdict(
        False, f"Vast reports instance {inst.id} as {status or 'starting'}", status or "created"
    )


def check_instance(
    ctx: Context, target_name: str, *, client: VastClient | None = None, now: datetime | None = None
) -> ProviderVerdict:
    """Is the live instance of vast target `target_name` lost? At most one API call per instance
    per `provider_check_s`; a failing Vast API is never taken as a lost instance."""
    from orchestrator.config import VastTarget as VastConfig

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
            from orchestrator.vast.provision import make_client

            client = make_client(cfg)
        inst = client.show_instance(int(iid))
        verdict = verdict_for(
            inst, interruptible=bool(info.get("interruptible", cfg.interruptible))
        )
    except OrchError as exc:
        verdict = ProviderVerdict(False, f"could not ask Vast about instance {iid}: {exc}", "error")
    finally:
        if own and client is not None:
            client.close()

    info["verdict"] = asdict(verdict)
    fields: dict[str, Any] = {
        "last_checked_at": now.isoformat(),
        "info_json": json.dumps(info, sort_keys=True),
    }
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
