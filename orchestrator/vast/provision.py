"""`orch up` / `orch down` for vast targets: rent a box, make it really usable, give it back.

up:   check the key (and the account's credit) -> settle creates left open by an earlier run ->
      reuse the target's instance if it can serve (a stopped one is started again; an outbid
      one gets a raised bid within the ceiling) -> search offers (refusing those the credit does
      not cover) -> print the chosen one -> create with a unique label recorded first (onstart
      makes ~/.no_auto_tmux, then the user's additions) -> wait for `running` with a deadline
      (fail at once on exited or a stop; give unknown/offline and an error status_msg
      `boot_grace_s` to recover; destroy and try the next offer once) -> attach the ssh key ->
      wait for the ssh banner and a real command (this pins the host key on first use) ->
      bootstrap the env. From create on, any failure, Ctrl-C or SIGTERM destroys the instance
      unless `keep`; a create whose answer was lost is looked up by its label (reconcile.py).
down: refuse while runs are active (unless `force`), pull first if asked, destroy, forget the
      pinned host key and the env bootstrap recorded for the old box; `--orphans` destroys
      instances labelled as orch's that the store does not know, after a confirmation.

The API key stays inside the VastClient: the onstart script, the label, the create body and the
box never see it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.bootstrap import ensure_env
from orchestrator.config import VastTarget as VastConfig
from orchestrator.targets.factory import make_target
from orchestrator.vast import ledger
from orchestrator.vast.boot import (
    BootProblem,
    ProvisionFailed,
    boot_problem,
    wait_banner,
    wait_running,
    wait_ssh_command,
)
from orchestrator.vast.client import (
    Instance,
    Offer,
    SshEndpoint,
    VastApiError,
    VastClient,
    VastUncertain,
    account_credit,
    api_url_for,
)
from orchestrator.vast.offers import (
    DEFAULT_EXPECTED_HOURS,
    bid_for,
    build_query,
    describe_offer,
    expected_spend,
    no_offer_hint,
    rank_offers,
    rebid_price,
)
from orchestrator.vast.reconcile import reconcile_pending, settle_create
from orchestrator.vast.records import (
    PROVIDER,
    destroy_recorded,
    info_of,
    record_instance,
    running_fields,
    stopped_fields,
)
from state.errors import ConfigError, OrchError, ProviderError
from state.runtime_contract import image_problem
from state.store import dumps

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.targets.vast import VastBoxTarget

__all__ = [
    "BootProblem",
    "ProvisionFailed",
    "UpResult",
    "boot_problem",
    "destroy_recorded",
    "up",
    "wait_running",
]

MAX_OFFERS = 3  # offers tried when one is gone (no_such_ask)
MAX_BOOT_FAILURES = 2  # "destroy and try the next offer once"
BILLING_URL = "https://cloud.vast.ai/billing/"


@dataclass
class UpResult:
    instance_id: int
    offer: Offer | None
    endpoint: SshEndpoint
    python: str | None
    reused: bool = False
    how: str = "rented"  # rented | reused | restarted | rebid
    detail: str = ""  # one line on how the box was got, for alerts


# -- helpers ----------------------------------------------------------------------------------
def vast_config(ctx: Context, name: str | None) -> tuple[str, VastConfig]:
    name, cfg = ctx.config.target(name)
    if not isinstance(cfg, VastConfig):
        raise ConfigError(
            f"target {name!r} is kind {cfg.kind!r}, not 'vast'",
            hint='`orch up`/`orch down` rent Vast boxes: add a `kind = "vast"` target',
        )
    return name, cfg


def make_client(cfg: VastConfig) -> VastClient:
    return VastClient.from_config(api_url_for(cfg))


def build_onstart(cfg: VastConfig) -> str:
    """The instance's onstart: leave ssh logins out of tmux, then the user's additions."""
    lines = ["#!/bin/bash", "touch ~/.no_auto_tmux"]
    if cfg.onstart.strip():
        lines.append(cfg.onstart.rstrip("\n"))
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Make SIGTERM behave as Ctrl-C (KeyboardInterrupt) so cleanup runs for both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- up -------------------------------------------------------------------------------------------
def up(
    ctx: Context,
    name: str | None,
    *,
    keep: bool = False,
    bootstrap: bool = True,
    hours: float | None = None,
) -> UpResult:
    """Rent and prepare an instance for vast target `name` (see the module docstring).

    `hours` overrides `expected_hours`: how long the box is wanted, for the contract length and
    the credit check."""
    # lazy, for start-up time: pulls in paramiko
    from orchestrator.targets.vast import identity_file, public_key

    name, cfg = vast_config(ctx, name)
    if hours is not None:
        cfg = cfg.model_copy(update={"expected_hours": hours})
    pubkey = public_key(identity_file(cfg))  # a config problem fails before anything is rented
    bad_image = image_problem(cfg.image)  # an image the worker cannot run on: never rented
    if bad_image:
        raise ConfigError(bad_image, hint=f"set image in [targets.{name}] (docs/vast.md)")
    with make_client(cfg) as client, _sigterm_interrupts():
        credit = account_credit(client.check_key())
        reconcile_pending(ctx, client, name, cfg)
        reused = _reuse_live(ctx, client, name, cfg)
        if reused is not None:
            inst, how, detail = reused
            ctx.console.print(
                f"target {name}: instance {inst.id} already exists ({inst.actual_status}); "
                + (detail or "making sure it is ready")
            )
            try:
                return _prepare(
                    ctx, client, name, cfg, inst.id, None, pubkey, keep=True,
                    bootstrap=bootstrap, reused=True, how=how, detail=detail,
                )  # fmt: skip
            except ProvisionFailed as exc:
                if how != "rebid":
                    raise
                ctx.err.print(f"[yellow]{exc}; renting elsewhere[/]")
                destroy_recorded(ctx, client, name, cfg, inst.id, "the raised bid did not win")
        found = client.search_offers(build_query(cfg))
        if client.dropped_offers:
            ctx.err.print(
                f"[yellow]{client.dropped_offers} offer row(s) from Vast had no usable id; skipped[/]"
            )
        offers = _affordable(ctx, cfg, rank_offers(found, cfg), credit)
        boot_failures = 0
        last_error: OrchError | None = None
        for offer in offers[:MAX_OFFERS]:
            iid = _create(ctx, client, name, cfg, offer, keep=keep)
            if iid is None:
                continue  # that offer was gone: the next one
            try:
                return _prepare(
                    ctx, client, name, cfg, iid, offer, pubkey, keep=keep, bootstrap=bootstrap
                )
            except ProvisionFailed as exc:
                last_error = exc
                boot_failures += 1
                if not keep:
                    destroy_recorded(ctx, client, name, cfg, iid, "it did not become usable")
                if keep or boot_failures >= MAX_BOOT_FAILURES:
                    raise
                ctx.err.print(f"[yellow]{exc}; trying the next offer[/]")
            except BaseException:
                if not keep:
                    destroy_recorded(
                        ctx, client, name, cfg, iid, "orch up was interrupted or failed"
                    )
                raise
        if last_error is not None:
            raise last_error
        raise ProviderError(
            "every matching offer was taken before orch could rent it",
            hint=f"run `orch up {name}` again",
        )


def _affordable(
    ctx: Context, cfg: VastConfig, offers: list[Offer], credit: float | None
) -> list[Offer]:
    """The ranked offers whose expected spend the account's credit covers (ProviderError when
    none is left). `expected_hours` (default one hour) is the planned use."""
    if not offers:
        raise ProviderError(no_offer_hint(cfg))
    hours = cfg.expected_hours or DEFAULT_EXPECTED_HOURS
    if credit is None:
        ctx.err.print(
            "[yellow]Vast did not report the account's credit; the expected spend is not checked[/]"
        )
        return offers
    ok = [o for o in offers if (expected_spend(o, cfg, hours) or float("inf")) <= credit]
    if not ok:
        cheapest = expected_spend(offers[0], cfg, hours) or 0.0
        raise ProviderError(
            f"the account's credit (${credit:.2f}) does not cover {hours:g} h of the cheapest "
            f"matching offer (${cheapest:.2f}); nothing was rented",
            hint=f"add credit at {BILLING_URL}, or lower expected_hours (orch up --hours H)",
        )
    if len(ok) < len(offers):
        ctx.err.print(
            f"[yellow]{len(offers) - len(ok)} matching offer(s) cost more than the credit "
            f"(${credit:.2f}) for {hours:g} h; skipped[/]"
        )
    return ok


def _reuse_live(
    ctx: Context, client: VastClient, name: str, cfg: VastConfig
) -> tuple[Instance, str, str] | None:
    """The target's recorded instance if it can serve, with how (`reused`, `restarted` after a
    stop, `rebid` after an outbid) and one line on it; None after clearing it away when it is
    gone, outbid beyond the bid ceiling, or broken."""
    row = ctx.store.live_instance_for(name)
    if row is None:
        return None
    iid = int(row["instance_id"])
    inst = client.show_instance(iid)
    if inst is None:  # `{"instances": null}`: Vast no longer knows it
        ctx.err.print(
            f"[yellow]the recorded instance {iid} of {name} is gone; renting a new one[/]"
        )
        destroy_recorded(ctx, client, name, cfg, iid, "Vast no longer knows it")
        return None
    kind = inst.stop_kind(interruptible=cfg.interruptible)
    if kind is not None:
        ctx.store.upsert_instance(PROVIDER, str(iid), name, state="stopped", **stopped_fields(row))
        row = ctx.store.live_instance_for(name) or row  # with the stretch's end recorded
    if kind in ("user", "host"):
        # Stopped on purpose (idle_action = "stop", the console) or by its host: the disk is
        # intact, start it again (docs start-instance.mdx; subject to the machine being free).
        ctx.console.print(f"starting the stopped instance {iid} of {name}")
        client.start_instance(iid)
        return (
            client.show_instance(iid) or inst,
            "restarted",
            "started the stopped instance again (same disk)",
        )
    if kind == "outbid":
        info = info_of(row)
        current = info.get("bid_dph") or inst.dph_total
        new = rebid_price(inst.min_bid, current, cfg)
        ceiling = cfg.max_bid_dph or cfg.offer.max_dph
        if new is None:
            ctx.err.print(
                f"[yellow]instance {iid} of {name} was outbid and winning it back costs more than "
                f"the ceiling ${ceiling:g}/h (machine minimum "
                f"{'?' if inst.min_bid is None else f'${inst.min_bid:g}'}/h); renting elsewhere[/]"
            )
            destroy_recorded(ctx, client, name, cfg, iid, "outbid beyond the bid ceiling")
            return None
        # vastai/SKILL.md: "When outbid ... Resume by raising the bid"; change_bid in
        # vastai/api/instances.py.
        client.change_bid(iid, new)
        info["bid_dph"] = new
        ctx.store.upsert_instance(PROVIDER, str(iid), name, dph=new, info_json=dumps(info))
        was = "?" if current is None else f"${float(current):.3f}"
        return (
            inst,
            "rebid",
            (
                f"kept the outbid instance by raising its bid from {was}/h to ${new:.3f}/h "
                f"(ceiling ${ceiling:g}/h), resuming on the same disk"
            ),
        )
    problem = boot_problem(inst, interruptible=cfg.interruptible)
    if problem is None or problem.recoverable:
        return inst, "reused", ""
    ctx.err.print(
        f"[yellow]the recorded instance {iid} of {name} {problem.reason}; renting a new one[/]"
    )
    destroy_recorded(ctx, client, name, cfg, iid, "it can no longer serve")
    return None


def _create(
    ctx: Context, client: VastClient, name: str, cfg: VastConfig, offer: Offer, *, keep: bool
) -> int | None:
    """Create an instance from `offer` under a new label recorded first; None if the offer is
    gone. The instance is recorded as soon as its id is known (see ledger.py)."""
    bid = bid_for(offer, cfg)
    if cfg.interruptible and bid is None:  # never rent on-demand what was meant as a bid
        raise ProviderError(f"offer {offer.id} has no price to bid from")
    label = ledger.new_label(cfg, name)
    url = api_url_for(cfg)
    ctx.console.print(f"renting {describe_offer(offer, cfg)}")
    ledger.record_request(ctx.store, label, name, url, offer.id)
    try:
        iid = client.create_instance(
            offer.id,
            image=cfg.image,
            disk_gb=cfg.disk_gb,
            label=label,
            onstart=build_onstart(cfg),
            bid_dph=bid,
        )
    except VastUncertain as exc:
        found = settle_create(ctx, client, name, cfg, label, offer, bid, adopt=True)
        if found is None:
            raise ProviderError(
                f"Vast did not confirm the create on offer {offer.id} ({exc.message}) and lists "
                f"no instance labelled {label}",
                hint=f"orch looks for it again on `orch up {name}` and `orch instances`; "
                "`orch down --orphans` destroys it if it appears",
            ) from exc
        return found
    except VastApiError as exc:
        if exc.new_contract is not None:
            # A bid that was too low still made a (stopped) instance: it must not linger.
            record_instance(
                ctx,
                name,
                cfg,
                exc.new_contract,
                offer,
                bid,
                label=label,
                state="stopped",
                api_url=url,
            )
            ledger.resolve(ctx.store, label, "created", exc.new_contract)
            destroy_recorded(ctx, client, name, cfg, exc.new_contract, "the bid was refused")
            raise ProviderError(
                f"Vast refused the bid of ${bid}/h on offer {offer.id}: {exc.message}",
                hint="raise bid_dph (or leave it unset to bid above the offer's minimum)",
            ) from exc
        ledger.resolve(ctx.store, label, "refused")
        if exc.code == "no_such_ask" or exc.status in (404, 410):
            ctx.err.print(
                f"[yellow]offer {offer.id} is no longer available; trying the next one[/]"
            )
            return None
        raise
    except KeyboardInterrupt:
        # The request may have reached Vast: whatever it made is recorded, and destroyed
        # unless --keep (a quick look only; an instance that shows up later is an orphan).
        if settle_create(ctx, client, name, cfg, label, offer, bid, adopt=keep, wait=False) is None:
            ctx.err.print(
                f"[yellow]the create on offer {offer.id} may still make an instance (label "
                f"{label}): `orch instances` shows it and `orch down --orphans` destroys it[/]"
            )
        raise
    except OrchError:
        # Retries exhausted on connection errors or 429s: the create never reached Vast.
        ledger.resolve(ctx.store, label, "never_made")
        raise
    record_instance(ctx, name, cfg, iid, offer, bid, label=label, state="created", api_url=url)
    ledger.resolve(ctx.store, label, "created", iid)
    ctx.console.print(
        f"created Vast instance {iid} (label {label})"
        + ("; it will be kept if anything fails (--keep)" if keep else "")
    )
    return iid


def _prepare(
    ctx: Context,
    client: VastClient,
    name: str,
    cfg: VastConfig,
    iid: int,
    offer: Offer | None,
    pubkey: str,
    *,
    keep: bool,
    bootstrap: bool,
    reused: bool = False,
    how: str = "rented",
    detail: str = "",
) -> UpResult:
    """From a created instance to a usable, bootstrapped ssh target."""
    deadline = time.monotonic() + cfg.ready_timeout_s
    ctx.console.print(
        f"waiting for instance {iid} to run (deadline {cfg.ready_timeout_s:.0f} s; Ctrl-C "
        + ("leaves it running)" if keep else "destroys it)")
    )
    inst = wait_running(
        client,
        iid,
        deadline=deadline,
        poll_s=cfg.poll_s,
        interruptible=cfg.interruptible,
        grace_s=cfg.boot_grace_s,
        resuming=how in ("restarted", "rebid"),
        on_status=lambda i: ctx.console.print(
            f"  instance {iid}: {i.actual_status or 'created'}"
            + (f" ({i.status_msg})" if i.status_msg else "")
        ),
    )
    ep = inst.ssh_endpoint()
    assert ep is not None  # wait_running returns only instances with an endpoint
    row = ctx.store.live_instance_for(name)
    fields = running_fields(row, datetime.now(timezone.utc))
    info = info_of({"info_json": fields.pop("info_json")})
    info["endpoint"] = ep.kind
    ctx.store.upsert_instance(
        PROVIDER,
        str(iid),
        name,
        state="running",
        ssh_host=ep.host,
        ssh_port=ep.port,
        dph=inst.dph_total if inst.dph_total is not None else (row or {}).get("dph"),
        gpu_name=inst.gpu_name or "",
        num_gpus=inst.num_gpus,
        info_json=dumps(info),
        **fields,
    )
    if not reused:
        ctx.store.upsert_target(name, PROVIDER, python="", bootstrap_hash="")
    # Keys added by onstart can vanish when Vast rewrites authorized_keys: use the instance call.
    client.attach_ssh_key(iid, pubkey)
    ctx.console.print(
        f"instance {iid} is running; ssh {cfg.user}@{ep.host} -p {ep.port} ({ep.kind})"
    )
    wait_banner(ep.host, ep.port, deadline=deadline, poll_s=cfg.poll_s)

    def _make() -> VastBoxTarget:
        t = make_target(ctx, name)
        return t  # type: ignore[return-value]

    target = wait_ssh_command(_make, deadline=deadline, poll_s=cfg.poll_s)
    python: str | None = None
    try:
        if bootstrap:
            ctx.console.print(f"bootstrapping the Python env on {name}")
            python = ensure_env(ctx, target)
    finally:
        target.close()
    ctx.console.print(
        f"[green]target {name} is up[/]: Vast instance {iid}"
        + (f", ${inst.dph_total:.3f}/h" if inst.dph_total else "")
        + f"; `orch down {name}` destroys it"
    )
    return UpResult(iid, offer, ep, python, reused, how, detail)
