"""Find what a create made when its answer was lost, and instances the store does not know.

- `settle_create`: right after a create that timed out, failed after sending or was
  interrupted: look its label up (`client.find_by_label`, paging `/api/v1/instances/` by
  `next_token`), record what it made, and keep it (adopt) or destroy it.
- `reconcile_pending`: creates still open in the ledger (orch died mid-create, or Vast listed
  nothing yet): adopt the instance when the target has none, destroy a second one, close the
  ledger row when Vast never made anything.
- `orphans` / `destroy_orphans`: instances labelled as orch's (`<prefix>-<target>[-<hex>]`) that
  the store does not hold as live: shown by `orch instances`, destroyed by `orch down --orphans`.
  Instances with other labels are the user's own and are never destroyed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from orchestrator.config import VastTarget as VastConfig
from orchestrator.vast import ledger
from orchestrator.vast.client import DEFAULT_API_URL, VastClient, api_url_for
from orchestrator.vast.records import (
    PROVIDER,
    destroy_recorded,
    destroy_unrecorded,
    no_interrupts,
    record_instance,
)

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.vast.models import Instance, Offer

#: How long a create whose answer was lost is looked for before orch stops waiting.
SETTLE_S = 30.0
#: An open create older than this that Vast does not list was never made.
PENDING_WINDOW_S = 900.0


def _look_for(client: VastClient, label: str, *, settle_s: float, poll_s: float) -> list[Instance]:
    deadline = time.monotonic() + settle_s
    while True:
        found = client.find_by_label(label)
        if found or time.monotonic() >= deadline:
            return sorted(found, key=lambda i: i.id)
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def settle_create(
    ctx: Context,
    client: VastClient,
    name: str,
    cfg: VastConfig,
    label: str,
    offer: Offer,
    bid: float | None,
    *,
    adopt: bool,
    wait: bool = True,
) -> int | None:
    """After a create whose outcome is unknown: the id of the instance it made, recorded (and
    destroyed unless `adopt`), or None when Vast lists nothing with `label` (the ledger row
    stays open for `reconcile_pending`). Duplicates with the same label are destroyed. `wait`:
    keep looking for `SETTLE_S` (Vast may still be creating it); else look once."""
    url = api_url_for(cfg)
    with no_interrupts():
        found = _look_for(client, label, settle_s=SETTLE_S if wait else 0.0, poll_s=cfg.poll_s)
        if not found:
            return None
        first, *extra = found
        for inst in extra:
            destroy_unrecorded(
                ctx, client, name, inst.id, label, f"a second instance labelled {label}"
            )
        record_instance(
            ctx, name, cfg, first.id, offer, bid, label=label, state="created", api_url=url
        )
        if adopt:
            ledger.resolve(ctx.store, label, "adopted", first.id)
            ctx.err.print(
                f"[yellow]the create's answer was lost, but it made instance {first.id} "
                f"(label {label}): orch keeps it[/]"
            )
            return first.id
        gone = destroy_recorded(ctx, client, name, cfg, first.id, "orch up was interrupted")
        ledger.resolve(ctx.store, label, "destroyed" if gone else "adopted", first.id)
        return first.id


@dataclass
class Reconciled:
    adopted: list[int]
    destroyed: list[int]
    still_open: list[str]  # labels Vast does not list (yet)


def reconcile_pending(
    ctx: Context,
    client: VastClient,
    name: str,
    cfg: VastConfig,
    now: datetime | None = None,
    *,
    destroy_extra: bool = True,
) -> Reconciled:
    """Settle the open creates of target `name` (see the module docstring). With
    `destroy_extra` false (a listing), an instance found while the target has another is left
    for `orch down --orphans`."""
    now = now or datetime.now(timezone.utc)
    url = api_url_for(cfg)
    out = Reconciled([], [], [])
    for p in ledger.pending(ctx.store, target=name, api_url=url):
        found = sorted(client.find_by_label(p.label), key=lambda i: i.id)
        if not found:
            age = (now - p.requested_at).total_seconds() if p.requested_at else PENDING_WINDOW_S
            if age >= PENDING_WINDOW_S:
                ledger.resolve(ctx.store, p.label, "never_made")
            else:
                out.still_open.append(p.label)
            continue
        for inst in found:
            live = ctx.store.live_instance_for(name)
            if live is not None and str(live["instance_id"]) == str(inst.id):
                ledger.resolve(ctx.store, p.label, "created", inst.id)  # recorded already
            elif live is None:
                record_instance(
                    ctx, name, cfg, inst.id, None, None, label=p.label, state="created",
                    api_url=url, adopted=True,
                )  # fmt: skip
                ctx.store.upsert_instance(
                    PROVIDER, str(inst.id), name, dph=inst.dph_total,
                    gpu_name=inst.gpu_name or "", num_gpus=inst.num_gpus,
                )  # fmt: skip
                ctx.err.print(
                    f"[yellow]found instance {inst.id} of an earlier create for {name} "
                    f"(label {p.label}); it is recorded now[/]"
                )
                out.adopted.append(inst.id)
                ledger.resolve(ctx.store, p.label, "adopted", inst.id)
            elif destroy_extra and destroy_unrecorded(
                ctx, client, name, inst.id, p.label, f"{name} already has an instance"
            ):
                out.destroyed.append(inst.id)
                ledger.resolve(ctx.store, p.label, "destroyed", inst.id)
    return out


def api_urls(ctx: Context) -> list[str]:
    """The base URL of every vast target (VAST_URL honoured), the default when there is none."""
    urls = {api_url_for(t) for t in ctx.config.targets.values() if isinstance(t, VastConfig)}
    return sorted(urls) or [DEFAULT_API_URL]


def list_all(ctx: Context) -> dict[str, list[Instance]]:
    """Every instance the key rents, per base URL (all pages)."""
    out: dict[str, list[Instance]] = {}
    for url in api_urls(ctx):
        with VastClient.from_config(url) as client:
            out[url] = list(client.iter_instances())
    return out


@dataclass(frozen=True)
class Orphan:
    instance: Instance
    target: str  # the vast target its label names
    api_url: str


def orphans(
    ctx: Context, listed: dict[str, list[Instance]], *, target: str | None = None
) -> list[Orphan]:
    """Of the instances Vast lists (per api_url), those labelled as orch's that the store does
    not hold as live (pure apart from reading the store)."""
    cfgs = [(n, c) for n, c in ctx.config.targets.items() if isinstance(c, VastConfig)]
    live = {
        str(r["instance_id"])
        for r in ctx.store.list_instances(live_only=True)
        if r["provider"] == PROVIDER
    }
    out = []
    for url, insts in listed.items():
        for inst in insts:
            owner = ledger.label_owner(
                inst.label, [(n, c) for n, c in cfgs if api_url_for(c) == url]
            )
            if owner is None or str(inst.id) in live or (target and owner != target):
                continue
            out.append(Orphan(inst, owner, url))
    return out


def destroy_orphans(ctx: Context, found: list[Orphan]) -> list[int]:
    """Destroy orphaned instances (record each destroy); the ids that are gone."""
    done = []
    for url in sorted({o.api_url for o in found}):
        with VastClient.from_config(url) as client:
            for o in (o for o in found if o.api_url == url):
                label = o.instance.label or ""
                why = "an orphan: orch had no record of it"
                if destroy_unrecorded(ctx, client, o.target, o.instance.id, label, why):
                    done.append(o.instance.id)
                    for p in ledger.pending(ctx.store, target=o.target, api_url=url):
                        if p.label == o.instance.label:
                            ledger.resolve(ctx.store, p.label, "destroyed", o.instance.id)
    return done
