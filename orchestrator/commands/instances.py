"""`orch instances [--json]`: everything the Vast key rents, with state, $/h, uptime and spend.

Instances that orch did not create (or no longer tracks) are marked, so a forgotten box from the
web console shows up too. A box the store thinks is alive but Vast no longer lists is recorded
as gone.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from rich.table import Table

from orchestrator.config import VastTarget as VastConfig
from orchestrator.context import Context
from orchestrator.vast.client import DEFAULT_API_URL, VastClient
from orchestrator.vast.cost import uptime_spend
from state.store import now_iso

PROVIDER = "vast"


@dataclass
class InstanceLine:
    id: int
    label: str
    target: str  # "" when orch does not know the instance
    state: str
    gpu: str
    dph: float
    uptime_h: float
    spend: float
    ssh: str
    api_url: str


def register(sub: Any) -> None:
    p = sub.add_parser("instances", help="list every Vast.ai instance the API key rents, with cost")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=handle)


def api_urls(ctx: Context) -> list[str]:
    urls = sorted({t.api_url for t in ctx.config.targets.values() if isinstance(t, VastConfig)})
    return urls or [DEFAULT_API_URL]


def collect(ctx: Context, now: datetime | None = None) -> list[InstanceLine]:
    """Every instance Vast lists for the key, joined with the store (and the store reconciled)."""
    now = now or datetime.now(timezone.utc)
    known = {
        str(r["instance_id"]): r for r in ctx.store.list_instances() if r["provider"] == PROVIDER
    }
    lines: list[InstanceLine] = []
    for url in api_urls(ctx):
        seen: set[str] = set()
        with VastClient.from_config(url) as client:
            for inst in client.iter_instances():
                seen.add(str(inst.id))
                row = known.get(str(inst.id))
                hours, spend = uptime_spend(inst.dph_total, inst.start_date, now)
                state = (
                    "outbid" if inst.outbid and inst.is_bid else (inst.actual_status or "created")
                )
                ep = inst.ssh_endpoint()
                lines.append(
                    InstanceLine(
                        id=inst.id,
                        label=inst.label or "",
                        target=str(row["target"]) if row else "",
                        state=state,
                        gpu=f"{inst.num_gpus or 0}x {inst.gpu_name or '?'}",
                        dph=float(inst.dph_total or 0.0),
                        uptime_h=round(hours, 3),
                        spend=spend,
                        ssh=f"{ep.host}:{ep.port}" if ep else "",
                        api_url=url,
                    )
                )
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
    return lines


def render(lines: list[InstanceLine]) -> Table:
    """Pure: the table `orch instances` prints."""
    table = Table(title="Vast.ai instances", title_justify="left")
    for col in ("ID", "LABEL", "TARGET", "STATE", "GPU", "$/H", "UPTIME", "SPEND", "SSH"):
        table.add_column(col, justify="right" if col in ("$/H", "UPTIME", "SPEND") else "left")
    for ln in lines:
        table.add_row(
            str(ln.id),
            ln.label,
            ln.target or "[yellow]not orch's[/]",
            ln.state,
            ln.gpu,
            f"${ln.dph:.3f}",
            f"{ln.uptime_h:.1f} h",
            f"${ln.spend:.2f}",
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
            f"${sum(ln.dph for ln in lines):.3f}",
            "",
            f"${sum(ln.spend for ln in lines):.2f}",
            "",
        )
    return table


def handle(args: argparse.Namespace, ctx: Context) -> int:
    lines = collect(ctx)
    if args.json:
        ctx.console.print_json(json.dumps([asdict(ln) for ln in lines]))
        return 0
    if not lines:
        ctx.console.print("no Vast instances are rented with this key")
        return 0
    ctx.console.print(render(lines))
    unknown = [ln for ln in lines if not ln.target]
    if unknown:
        ctx.console.print(
            f"[yellow]{len(unknown)} instance(s) are not orch's: they still cost money; "
            "destroy them in the Vast console if they are forgotten[/]"
        )
    return 0
