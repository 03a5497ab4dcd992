"""`orch instances [--json]`: everything the Vast key rents, with state, $/h, running time and
spend, and the account's credit.

Instances orch made but has no record of (labelled `<prefix>-<target>-<hex>`: a create whose
answer was lost, a record marked gone too early) are shown as orphans, which `orch down
--orphans` destroys; other instances (the web console's) are marked "not orch's". Creates left
open are settled first (an instance found for a target with none is recorded). A box the store
thinks is alive but Vast no longer lists is recorded as gone.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from rich.table import Table

from orchestrator.config import VastTarget as VastConfig
from orchestrator.context import Context
from orchestrator.vast.client import VastClient, account_credit, api_url_for
from orchestrator.vast.cost import instance_hours, listed_hours
from orchestrator.vast.reconcile import api_urls, orphans, reconcile_pending
from state.store import now_iso

PROVIDER = "vast"


@dataclass
class InstanceLine:
    id: int
    label: str
    target: str  # the target orch holds it for, or the one its label names (orphan); "" else
    state: str
    gpu: str
    dph: float | None
    uptime_h: float | None  # running hours (None: unknown)
    spend: float | None
    ssh: str
    api_url: str
    orphan: bool = False  # labelled as orch's, but orch has no live record of it
    age_h: float | None = None  # since the contract started (`start_date`)


@dataclass
class Listing:
    lines: list[InstanceLine] = field(default_factory=list)
    credit: dict[str, float | None] = field(default_factory=dict)  # per api_url


def register(sub: Any) -> None:
    p = sub.add_parser("instances", help="list every Vast.ai instance the API key rents, with cost")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=handle)


def collect(ctx: Context, now: datetime | None = None) -> Listing:
    """Every instance Vast lists for the key, joined with the store (and the store reconciled)."""
    now = now or datetime.now(timezone.utc)
    out = Listing()
    listed = {}
    vast = [(n, c) for n, c in ctx.config.targets.items() if isinstance(c, VastConfig)]
    for url in api_urls(ctx):
        with VastClient.from_config(url) as client:
            out.credit[url] = account_credit(client.check_key())
            for name, cfg in vast:
                if api_url_for(cfg) == url:
                    reconcile_pending(ctx, client, name, cfg, destroy_extra=False)
            listed[url] = list(client.iter_instances())
    known = {
        str(r["instance_id"]): r for r in ctx.store.list_instances() if r["provider"] == PROVIDER
    }
    lost = {(o.api_url, o.instance.id): o.target for o in orphans(ctx, listed)}
    for url, insts in listed.items():
        for inst in insts:
            row = known.get(str(inst.id))
            live = row is not None and row.get("destroyed_at") is None
            orphan_of = lost.get((url, inst.id))
            hours = instance_hours(row, now) if live and row else listed_hours(inst.uptime_mins)
            dph = inst.dph_total if inst.dph_total is not None else (row or {}).get("dph")
            kind = inst.stop_kind(interruptible=bool(inst.is_bid))
            ep = inst.ssh_endpoint()
            out.lines.append(
                InstanceLine(
                    id=inst.id,
                    label=inst.label or "",
                    target=str(row["target"]) if live and row else (orphan_of or ""),
                    state={"outbid": "outbid", "user": "stopped", "host": "stopped"}.get(
                        kind or "", inst.actual_status or "created"
                    ),
                    gpu=f"{'?' if inst.num_gpus is None else inst.num_gpus}x {inst.gpu_name or '?'}",
                    dph=None if dph is None else float(dph),
                    uptime_h=None if hours is None else round(hours, 3),
                    spend=None if hours is None or dph is None else round(float(dph) * hours, 4),
                    ssh=f"{ep.host}:{ep.port}" if ep else "",
                    api_url=url,
                    orphan=orphan_of is not None,
                    age_h=None
                    if not inst.start_date
                    else round(max(0.0, now.timestamp() - inst.start_date) / 3600, 3),
                )
            )
        seen = {str(i.id) for i in insts}
        for iid, row in known.items():
            info = json.loads(row.get("info_json") or "{}")
            if (
                row.get("destroyed_at") is None
                and iid not in seen
                and info.get("api_url", url) == url
            ):
                ctx.store.upsert_instance(
                    PROVIDER, iid, str(row["target"]), state="gone", destroyed_at=now_iso()
                )
    return out


def _money(v: float | None, fmt: str) -> str:
    return "?" if v is None else f"${v:{fmt}}"


def render(lines: list[InstanceLine]) -> Table:
    """Pure: the table `orch instances` prints (`?` where Vast reported nothing)."""
    table = Table(title="Vast.ai instances", title_justify="left")
    for col in ("ID", "LABEL", "TARGET", "STATE", "GPU", "$/H", "RUNNING", "SPEND", "SSH"):
        table.add_column(col, justify="right" if col in ("$/H", "RUNNING", "SPEND") else "left")
    for ln in lines:
        who = f"[red]orphan ({ln.target})[/]" if ln.orphan else ln.target or "[yellow]not orch's[/]"
        table.add_row(
            str(ln.id),
            ln.label,
            who,
            ln.state,
            ln.gpu,
            _money(ln.dph, ".3f"),
            "?" if ln.uptime_h is None else f"{ln.uptime_h:.1f} h",
            _money(ln.spend, ".2f"),
            ln.ssh,
        )
    if lines:
        table.add_section()
        table.add_row(
            "total",
            "",
            "",
            "",
            "",
            f"${sum(ln.dph or 0.0 for ln in lines):.3f}",
            "",
            f"${sum(ln.spend or 0.0 for ln in lines):.2f}"
            + ("+?" if any(ln.spend is None for ln in lines) else ""),
            "",
        )
    return table


def handle(args: argparse.Namespace, ctx: Context) -> int:
    listing = collect(ctx)
    lines = listing.lines
    if args.json:
        ctx.console.print_json(json.dumps([asdict(ln) for ln in lines]))
        return 0
    for url, credit in listing.credit.items():
        where = "" if len(listing.credit) == 1 else f" ({url})"
        ctx.console.print(
            f"account credit{where}: "
            + ("unknown (Vast did not report it)" if credit is None else f"${credit:.2f}")
        )
    if not lines:
        ctx.console.print("no Vast instances are rented with this key")
        return 0
    ctx.console.print(render(lines))
    lost = [ln for ln in lines if ln.orphan]
    if lost:
        ctx.console.print(
            f"[red]{len(lost)} instance(s) labelled as orch's have no record: they cost money; "
            "`orch down --orphans` destroys them[/]"
        )
    unknown = [ln for ln in lines if not ln.target]
    if unknown:
        ctx.console.print(
            f"[yellow]{len(unknown)} instance(s) are not orch's: they still cost money; "
            "destroy them in the Vast console if they are forgotten[/]"
        )
    return 0
