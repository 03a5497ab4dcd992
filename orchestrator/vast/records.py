"""The store's record of Vast instances: write one, mark it running or stopped, destroy it.

Running time is kept in segments, because Vast's `start_date` is the contract's start, not the
last (re)start (docs `show_instance.yaml`: "Instance start time"; it does not move on a restart)
and GPU time is billed only while running (`vastai/SKILL.md`: "GPU charges begin when status
reaches `running`"; stopped: "disk charges only"). `running_since` is when orch saw the current
running stretch begin; `info.stopped_at` ends it; `info.prior_running_s` holds earlier stretches.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.vast.models import Offer
from orchestrator.vast.offers import price_of
from state.errors import OrchError
from state.store import dumps, now_iso, parse_time

if TYPE_CHECKING:
    from orchestrator.config import VastTarget as VastConfig
    from orchestrator.context import Context
    from orchestrator.vast.client import VastClient

PROVIDER = "vast"


def info_of(row: dict[str, Any] | None) -> dict[str, Any]:
    try:
        data = json.loads((row or {}).get("info_json") or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def record_instance(
    ctx: Context,
    name: str,
    cfg: VastConfig,
    iid: int,
    offer: Offer | None,
    bid: float | None,
    *,
    label: str,
    state: str,
    api_url: str,
    **extra_info: Any,
) -> None:
    """Record instance `iid` of target `name` (what orch rented, from which offer, at what bid)."""
    info = {
        "offer_id": offer.id if offer else None,
        "interruptible": cfg.interruptible,
        "bid_dph": bid,
        "geolocation": offer.geolocation if offer else None,
        "reliability": offer.reliability if offer else None,
        "api_url": api_url,
        **extra_info,
    }
    ctx.store.upsert_instance(
        PROVIDER,
        str(iid),
        name,
        label=label,
        state=state,
        dph=price_of(offer, cfg) if offer else None,
        gpu_name=(offer.gpu_name or "") if offer else "",
        num_gpus=offer.num_gpus if offer else None,
        info_json=dumps(info),
    )


def running_fields(row: dict[str, Any] | None, now: datetime | None = None) -> dict[str, Any]:
    """Store fields for an instance orch sees running: a new running stretch starts now unless
    one is already open."""
    now = now or datetime.now(timezone.utc)
    info = info_of(row)
    since = parse_time((row or {}).get("running_since"))
    stopped = parse_time(info.pop("stopped_at", None))
    if since is not None and stopped is None:
        return {"info_json": dumps(info)}  # still the same stretch
    if since is not None and stopped is not None and stopped > since:
        info["prior_running_s"] = (
            float(info.get("prior_running_s") or 0.0) + (stopped - since).total_seconds()
        )
    return {"running_since": now.isoformat(), "info_json": dumps(info)}


def stopped_fields(row: dict[str, Any] | None, now: datetime | None = None) -> dict[str, Any]:
    """Store fields for an instance that stopped: its running stretch ends (once)."""
    info = info_of(row)
    info.setdefault("stopped_at", (now or datetime.now(timezone.utc)).isoformat())
    return {"info_json": dumps(info)}


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Let a destroy (or a look-up after an interrupted create) finish even if the user presses
    Ctrl-C again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def destroy_recorded(
    ctx: Context, client: VastClient, name: str, cfg: VastConfig, iid: int, why: str
) -> bool:
    """Destroy instance `iid`, mark it destroyed in the store and drop its pinned key.

    True when it is gone; False (with a loud message) when Vast could not be told, so the user
    knows a paid box may still be running.
    """
    # lazy, for start-up time: pulls in paramiko
    from orchestrator.targets.vast import drop_host_key

    with no_interrupts():
        try:
            client.destroy_instance(iid)
        except OrchError as exc:
            ctx.err.print(
                f"[bold red]could not destroy Vast instance {iid} ({why}): {exc}. It may still cost "
                f"money: run `orch down {name}` or destroy it in the Vast console.[/]"
            )
            return False
        row = ctx.store.live_instance_for(name)
        ctx.store.upsert_instance(
            PROVIDER, str(iid), name, state="destroyed", destroyed_at=now_iso()
        )
        host = str(row["ssh_host"]) if row and str(row["instance_id"]) == str(iid) else ""
        port = int(row["ssh_port"]) if row and row.get("ssh_port") else None
        drop_host_key(ctx, cfg, str(iid), host, port)
        if row is None or str(row["instance_id"]) == str(iid):
            ctx.store.upsert_target(name, PROVIDER, python="", bootstrap_hash="")
    ctx.err.print(f"destroyed Vast instance {iid} ({why})")
    return True


def destroy_unrecorded(
    ctx: Context, client: VastClient, name: str, iid: int, label: str, why: str
) -> bool:
    """Destroy an instance that is not the target's box (a duplicate, an orphan), then record
    that it was destroyed; on failure nothing is recorded as live, so the target's own box
    stays the one orch uses, and `orch instances` keeps showing the orphan."""
    with no_interrupts():
        try:
            client.destroy_instance(iid)
        except OrchError as exc:
            ctx.err.print(
                f"[bold red]could not destroy Vast instance {iid} ({why}): {exc}. It may still cost "
                "money: run `orch down --orphans` or destroy it in the Vast console.[/]"
            )
            return False
        ctx.store.upsert_instance(
            PROVIDER, str(iid), name, label=label, state="destroyed", destroyed_at=now_iso()
        )
    ctx.err.print(f"destroyed Vast instance {iid} ({why})")
    return True
