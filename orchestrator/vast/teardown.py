"""`orch down` for vast targets: destroy the target's instance (after pulling, if asked), or
the instances labelled as orch's that orch has no record of (`--orphans`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.pull import pull_run
from orchestrator.vast.provision import make_client, vast_config
from orchestrator.vast.reconcile import destroy_orphans, list_all, orphans
from orchestrator.vast.records import destroy_recorded
from state.errors import OrchError, ProviderError, TargetError
from state.phases import Phase

if TYPE_CHECKING:
    from orchestrator.context import Context


@dataclass
class DownResult:
    instance_id: int | None
    destroyed: bool
    pulled: int = 0
    cancelled: int = 0


def down(ctx: Context, name: str | None, *, force: bool = False, pull: bool = False) -> DownResult:
    """Destroy the live instance of vast target `name`: refuse while runs are active (unless
    `force`, which marks them cancelled), pull first if asked, then destroy, forget the pinned
    host key and the env bootstrap recorded for the old box."""
    name, cfg = vast_config(ctx, name)
    row = ctx.store.live_instance_for(name)
    if row is None:
        ctx.console.print(f"target {name} has no live Vast instance; nothing to destroy")
        return DownResult(None, False)
    iid = int(row["instance_id"])
    active = ctx.store.list_runs(active_only=True, target=name)
    if active and not force:
        keys = ", ".join(r.key for r in active[:5]) + (" ..." if len(active) > 5 else "")
        raise TargetError(
            f"target {name} has {len(active)} active run(s): {keys}",
            hint=f"wait for them, stop them with `orch stop RUN`, or `orch down {name} --force`",
        )
    pulled = 0
    if pull:
        pulled = _pull_all(ctx, name, force=force)
    with make_client(cfg) as client:
        destroyed = destroy_recorded(ctx, client, name, cfg, iid, f"orch down {name}")
    if not destroyed:
        raise ProviderError(
            f"Vast instance {iid} was not destroyed", hint=f"run `orch down {name}` again"
        )
    cancelled = 0
    for rec in active:  # only with --force: the box and these runs' processes are gone
        ctx.store.update_run(
            rec.stage_dir,
            rec.run_id,
            phase=Phase.CANCELLED,
            reason=f"instance {iid} destroyed by orch down --force",
        )
        cancelled += 1
    return DownResult(iid, True, pulled, cancelled)


def down_orphans(
    ctx: Context, name: str | None, *, yes: bool, confirm: Callable[[str], bool]
) -> list[int]:
    """Destroy the instances labelled as orch's (of target `name`, or of every vast target)
    that the store does not hold as live, after `confirm` (skipped with `yes`)."""
    if name is not None:
        name, _ = vast_config(ctx, name)
    found = orphans(ctx, list_all(ctx), target=name)
    if not found:
        ctx.console.print(
            "no orphaned Vast instances: every instance labelled as orch's is recorded"
        )
        return []
    for o in found:
        i = o.instance
        ctx.console.print(
            f"orphan {i.id} (label {i.label}, target {o.target}): {i.actual_status or 'created'}, "
            f"{'?' if i.dph_total is None else f'${i.dph_total:.3f}'}/h"
        )
    if not yes and not confirm(f"destroy these {len(found)} instance(s)?"):
        ctx.console.print("nothing destroyed")
        return []
    done = destroy_orphans(ctx, found)
    if len(done) < len(found):
        raise ProviderError(
            f"{len(found) - len(done)} orphaned instance(s) could not be destroyed",
            hint="run `orch down --orphans` again, or destroy them in the Vast console",
        )
    return done


def _pull_all(ctx: Context, name: str, *, force: bool) -> int:
    """Pull every finished run of the target that was not pulled yet, before the box goes."""
    n = 0
    for rec in ctx.store.list_runs(target=name):
        if rec.pulled_at is not None or rec.phase is not Phase.SUCCEEDED:
            continue
        try:
            pull_run(ctx, rec)
            n += 1
        except OrchError as exc:
            if not force:
                raise TargetError(
                    f"pulling {rec.key} failed, so the box is kept: {exc}",
                    hint=f"fix it and retry, or `orch down {name} --force` to destroy anyway",
                ) from exc
            ctx.err.print(
                f"[yellow]pulling {rec.key} failed: {exc} (destroying anyway: --force)[/]"
            )
    if n:
        ctx.console.print(f"pulled {n} run(s) from {name}")
    return n
