"""`orch up` / `orch down` for vast targets: rent a box, make it really usable, give it back.

up:   check the key -> search offers -> print the chosen one -> create (onstart makes
      ~/.no_auto_tmux, then the user's additions) -> wait for `running` with a deadline (fail
      fast on exited/offline/unknown, an error status_msg or an outbid stop; destroy and try the
      next offer once) -> attach the ssh key to the instance -> wait for the ssh banner and a real
      command (this pins the host key on first use) -> bootstrap the env.
      From create on, any failure, Ctrl-C or SIGTERM destroys the instance unless `keep`.
down: refuse while runs are active (unless `force`), pull first if asked, destroy, forget the
      pinned host key and the env bootstrap recorded for the old box.

The API key stays inside the VastClient: the onstart script, the label, the create body and the
box never see it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.config import VastTarget as VastConfig
from orchestrator.vast.client import Instance, Offer, SshEndpoint, VastApiError, VastClient
from orchestrator.vast.offers import (
    bid_for,
    build_query,
    describe_offer,
    no_offer_hint,
    price_of,
    rank_offers,
)
from state.errors import ConfigError, HostKeyError, OrchError, ProviderError, TargetError
from state.phases import Phase
from state.store import dumps, now_iso

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.targets.vast import VastBoxTarget

PROVIDER = "vast"
#: `actual_status` values that never turn into `running` by themselves.
DEAD_STATES = frozenset({"exited", "offline", "unknown"})
MAX_OFFERS = 3  # offers tried when one is gone (no_such_ask)
MAX_BOOT_FAILURES = 2  # "destroy and try the next offer once"
UNSEEN_GRACE_S = 30.0  # a new instance may not show up in `show` at once


class ProvisionFailed(ProviderError):
    """An instance was created but did not become usable (it is destroyed unless --keep)."""


@dataclass
class UpResult:
    instance_id: int
    offer: Offer | None
    endpoint: SshEndpoint
    python: str | None
    reused: bool = False


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
    return VastClient.from_config(cfg.api_url)


def build_onstart(cfg: VastConfig) -> str:
    """The instance's onstart: leave ssh logins out of tmux, then the user's additions."""
    lines = ["#!/bin/bash", "touch ~/.no_auto_tmux"]
    if cfg.onstart.strip():
        lines.append(cfg.onstart.rstrip("\n"))
    return "\n".join(lines) + "\n"


def instance_label(cfg: VastConfig, name: str) -> str:
    return f"{cfg.label_prefix}-{name}"


def _utc_from_epoch(epoch: float | None) -> str:
    if not epoch:
        return now_iso()
    return datetime.fromtimestamp(float(epoch), timezone.utc).isoformat()


def boot_problem(inst: Instance, *, interruptible: bool) -> str | None:
    """Why a booting instance will not become usable, or None while it still may (pure)."""
    status = inst.actual_status or ""
    if inst.outbid or (status == "stopped" and inst.intended_status == "stopped"):
        return "was outbid: Vast stopped it" if interruptible or inst.is_bid else "was stopped"
    if status in DEAD_STATES:
        return f"is {status}" + (f": {inst.status_msg}" if inst.status_msg else "")
    msg = (inst.status_msg or "").strip()
    if msg and ("error" in msg.lower() or "failed" in msg.lower()):
        return f"reports an error: {msg}"
    return None


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


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let a destroy finish even if the user presses Ctrl-C again."""
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
    from orchestrator.targets.vast import drop_host_key

    with _no_interrupts():
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
        ctx.store.upsert_target(name, PROVIDER, python="", bootstrap_hash="")
    ctx.err.print(f"destroyed Vast instance {iid} ({why})")
    return True


# -- waiting ------------------------------------------------------------------------------------
def wait_running(
    client: VastClient,
    iid: int,
    *,
    deadline: float,
    poll_s: float,
    interruptible: bool,
    on_status: Callable[[Instance], None] | None = None,
) -> Instance:
    """Poll `show` until the instance runs with an ssh endpoint; ProvisionFailed otherwise.

    A just-created instance may not be visible for a moment (`{"instances": null}`): that is
    tolerated for `UNSEEN_GRACE_S`, after which it counts as gone.
    """
    last = None
    started = time.monotonic()
    seen = False
    while True:
        inst = client.show_instance(iid)
        if inst is None:
            if seen or time.monotonic() - started >= UNSEEN_GRACE_S or time.monotonic() >= deadline:
                raise ProvisionFailed(f"Vast instance {iid} disappeared while starting")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            continue
        seen = True
        status = (inst.actual_status, inst.status_msg)
        if on_status is not None and status != last:
            on_status(inst)
        last = status
        problem = boot_problem(inst, interruptible=interruptible)
        if problem:
            raise ProvisionFailed(f"Vast instance {iid} {problem}")
        if inst.actual_status == "running" and inst.ssh_endpoint() is not None:
            return inst
        if time.monotonic() >= deadline:
            raise ProvisionFailed(
                f"Vast instance {iid} is still {inst.actual_status or 'not started'} after the deadline",
                hint="raise ready_timeout_s for slow image pulls, or pick another offer",
            )
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def wait_banner(host: str, port: int, *, deadline: float, poll_s: float) -> None:
    """Wait until something at host:port speaks SSH (sends `SSH-`)."""
    last = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.settimeout(5)
                if s.recv(64).startswith(b"SSH-"):
                    return
                last = "no SSH banner"
        except OSError as exc:
            last = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            raise ProvisionFailed(
                f"ssh on {host}:{port} did not answer before the deadline ({last})"
            )
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def wait_ssh_command(
    make: Callable[[], VastBoxTarget], *, deadline: float, poll_s: float
) -> VastBoxTarget:
    """Wait until a real command runs over a fresh connection (this pins the host key)."""
    last = ""
    while True:
        target = make()
        try:
            res = target.run(["true"], timeout=30)
            if res.ok:
                return target
            last = f"`true` exited {res.returncode}"
        except HostKeyError:
            target.close()
            raise
        except TargetError as exc:
            last = str(exc)
        target.close()
        if time.monotonic() >= deadline:
            raise ProvisionFailed(f"ssh login did not work before the deadline: {last}")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


# -- up -------------------------------------------------------------------------------------------
def up(ctx: Context, name: str | None, *, keep: bool = False, bootstrap: bool = True) -> UpResult:
    """Rent and prepare an instance for vast target `name` (see the module docstring)."""
    from orchestrator.targets.vast import identity_file, public_key

    name, cfg = vast_config(ctx, name)
    pubkey = public_key(identity_file(cfg))  # a config problem fails before anything is rented
    with make_client(cfg) as client, _sigterm_interrupts():
        client.check_key()
        reused = _reuse_live(ctx, client, name, cfg)
        if reused is not None:
            ctx.console.print(
                f"target {name}: instance {reused.id} already exists ({reused.actual_status}); "
                "making sure it is ready"
            )
            return _prepare(
                ctx,
                client,
                name,
                cfg,
                reused.id,
                None,
                pubkey,
                keep=True,
                bootstrap=bootstrap,
                reused=True,
            )
        offers = rank_offers(client.search_offers(build_query(cfg)), cfg)
        if not offers:
            raise ProviderError(no_offer_hint(cfg))
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


def _reuse_live(ctx: Context, client: VastClient, name: str, cfg: VastConfig) -> Instance | None:
    """The target's recorded instance if it can still serve (a stopped one is started again);
    None after clearing it away when it is gone, outbid or broken."""
    row = ctx.store.live_instance_for(name)
    if row is None:
        return None
    iid = int(row["instance_id"])
    inst = client.show_instance(iid)
    outbid = inst is not None and inst.outbid and (cfg.interruptible or bool(inst.is_bid))
    if inst is not None and inst.actual_status == "stopped" and not outbid:
        # Stopped on purpose (idle_action = "stop", or in the console): its disk is intact.
        ctx.console.print(f"starting the stopped instance {iid} of {name}")
        client.start_instance(iid)
        return client.show_instance(iid) or inst
    problem = "is gone" if inst is None else boot_problem(inst, interruptible=cfg.interruptible)
    if problem is None:
        return inst
    ctx.err.print(f"[yellow]the recorded instance {iid} of {name} {problem}; renting a new one[/]")
    destroy_recorded(ctx, client, name, cfg, iid, "it can no longer serve")
    return None


def _create(
    ctx: Context, client: VastClient, name: str, cfg: VastConfig, offer: Offer, *, keep: bool
) -> int | None:
    """Create an instance from `offer`; None if the offer is gone. Records it at once."""
    ctx.console.print(f"renting {describe_offer(offer, cfg)}")
    bid = bid_for(offer, cfg)
    try:
        iid = client.create_instance(
            offer.id,
            image=cfg.image,
            disk_gb=cfg.disk_gb,
            label=instance_label(cfg, name),
            onstart=build_onstart(cfg),
            bid_dph=bid,
        )
    except VastApiError as exc:
        if exc.new_contract is not None:
            # A bid that was too low still made a (stopped) instance: it must not linger.
            _record(ctx, name, cfg, exc.new_contract, offer, bid, state="stopped")
            destroy_recorded(ctx, client, name, cfg, exc.new_contract, "the bid was refused")
            raise ProviderError(
                f"Vast refused the bid of ${bid}/h on offer {offer.id}: {exc.message}",
                hint="raise bid_dph (or leave it unset to bid above the offer's minimum)",
            ) from exc
        if exc.code == "no_such_ask" or exc.status == 404:
            ctx.err.print(
                f"[yellow]offer {offer.id} is no longer available; trying the next one[/]"
            )
            return None
        raise
    _record(ctx, name, cfg, iid, offer, bid, state="created")
    ctx.console.print(
        f"created Vast instance {iid} (label {instance_label(cfg, name)})"
        + ("; it will be kept if anything fails (--keep)" if keep else "")
    )
    return iid


def _record(
    ctx: Context,
    name: str,
    cfg: VastConfig,
    iid: int,
    offer: Offer,
    bid: float | None,
    *,
    state: str,
) -> None:
    ctx.store.upsert_instance(
        PROVIDER,
        str(iid),
        name,
        label=instance_label(cfg, name),
        state=state,
        dph=price_of(offer, cfg),
        gpu_name=offer.gpu_name,
        num_gpus=offer.num_gpus,
        info_json=dumps(
            {
                "offer_id": offer.id,
                "interruptible": cfg.interruptible,
                "bid_dph": bid,
                "geolocation": offer.geolocation,
                "reliability": offer.reliability2,
                "api_url": cfg.api_url,
            }
        ),
    )


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
) -> UpResult:
    """From a created instance to a usable, bootstrapped ssh target."""
    from orchestrator.targets.factory import make_target

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
        on_status=lambda i: ctx.console.print(
            f"  instance {iid}: {i.actual_status or 'created'}"
            + (f" ({i.status_msg})" if i.status_msg else "")
        ),
    )
    ep = inst.ssh_endpoint()
    assert ep is not None  # wait_running returns only instances with an endpoint
    row = ctx.store.live_instance_for(name)
    info = {}
    if row and row.get("info_json"):
        import json

        with contextlib.suppress(ValueError):
            info = json.loads(row["info_json"])
    info["endpoint"] = ep.kind
    ctx.store.upsert_instance(
        PROVIDER,
        str(iid),
        name,
        state="running",
        ssh_host=ep.host,
        ssh_port=ep.port,
        running_since=_utc_from_epoch(inst.start_date),
        dph=inst.dph_total if inst.dph_total else None,
        gpu_name=inst.gpu_name or "",
        num_gpus=inst.num_gpus,
        info_json=dumps(info),
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
            from orchestrator.bootstrap import ensure_env

            ctx.console.print(f"bootstrapping the Python env on {name}")
            python = ensure_env(ctx, target)
    finally:
        target.close()
    ctx.console.print(
        f"[green]target {name} is up[/]: Vast instance {iid}"
        + (f", ${inst.dph_total:.3f}/h" if inst.dph_total else "")
        + f"; `orch down {name}` destroys it"
    )
    return UpResult(iid, offer, ep, python, reused)


# -- down -----------------------------------------------------------------------------------------
@dataclass
class DownResult:
    instance_id: int | None
    destroyed: bool
    pulled: int = 0
    cancelled: int = 0


def down(ctx: Context, name: str | None, *, force: bool = False, pull: bool = False) -> DownResult:
    """Destroy the live instance of vast target `name` (see the module docstring)."""
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


def _pull_all(ctx: Context, name: str, *, force: bool) -> int:
    """Pull every finished run of the target that was not pulled yet, before the box goes."""
    from orchestrator.pull import pull_run

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
