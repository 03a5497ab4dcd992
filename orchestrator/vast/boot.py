"""Waiting for a Vast instance to become usable: `running` with an ssh endpoint, an SSH banner,
a real command over a fresh connection. What counts as a problem, and which problems can still
clear, follows the API docs (see `boot_problem`). No renting or destroying here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.vast.models import HEARTBEAT_STATES, Instance
from state.errors import HostKeyError, ProviderError, TargetError

if TYPE_CHECKING:
    from orchestrator.targets.vast import VastBoxTarget
    from orchestrator.vast.client import VastClient

UNSEEN_GRACE_S = 30.0  # a new instance may not show up in `show` at once


class ProvisionFailed(ProviderError):
    """An instance was created but did not become usable (it is destroyed unless --keep)."""


@dataclass(frozen=True)
class BootProblem:
    reason: str
    recoverable: bool  # True: wait up to boot_grace_s for it to clear


def boot_problem(
    inst: Instance, *, interruptible: bool, resuming: bool = False
) -> BootProblem | None:
    """Why a booting instance may not become usable, or None (pure).

    Final: `exited` ("Container process exited unexpectedly", docs show-instance.mdx; the
    SKILL.md poll-loop warning) and a stop of a new instance. Recoverable: `unknown`/`offline`
    (no heartbeat from the host yet, a new instance starts `unknown`) and an error-looking
    `status_msg` (it is "human-readable detail on the current status", and an image pull that
    is retried says "error" too); a stop while orch resumes the instance (start, raised bid).
    """
    kind = inst.stop_kind(interruptible=interruptible)
    msg = (inst.status_msg or "").strip()
    tail = f": {msg}" if msg else ""
    if kind is not None:
        why = {
            "outbid": "was outbid: Vast stopped it",
            "host": "was stopped by its host",
            "user": "was stopped (intended_status is stopped)",
        }[kind]
        return BootProblem(why, recoverable=resuming)
    status = inst.actual_status or ""
    if status == "exited":
        return BootProblem(f"exited{tail}", recoverable=False)
    if status in HEARTBEAT_STATES:
        return BootProblem(f"is {status} (no heartbeat from its host){tail}", recoverable=True)
    if msg and ("error" in msg.lower() or "failed" in msg.lower()):
        return BootProblem(f"reports an error: {msg}", recoverable=True)
    return None


def wait_running(
    client: VastClient,
    iid: int,
    *,
    deadline: float,
    poll_s: float,
    interruptible: bool,
    grace_s: float = 180.0,
    resuming: bool = False,
    on_status: Callable[[Instance], None] | None = None,
) -> Instance:
    """Poll `show` until the instance runs with an ssh endpoint; ProvisionFailed otherwise.

    A just-created instance may not be visible for a moment (`{"instances": null}`): that is
    tolerated for `UNSEEN_GRACE_S`, after which it counts as gone. A recoverable problem (see
    `boot_problem`) fails only once it has lasted `grace_s`; every wait ends at `deadline`.
    """
    last = None
    started = time.monotonic()
    seen = False
    trouble_since: float | None = None
    while True:
        inst = client.show_instance(iid)
        now = time.monotonic()
        if inst is None:
            if seen or now - started >= UNSEEN_GRACE_S or now >= deadline:
                raise ProvisionFailed(f"Vast instance {iid} disappeared while starting")
            time.sleep(min(poll_s, max(0.0, deadline - now)))
            continue
        seen = True
        status = (inst.actual_status, inst.status_msg)
        if on_status is not None and status != last:
            on_status(inst)
        last = status
        problem = boot_problem(inst, interruptible=interruptible, resuming=resuming)
        if problem is None:
            trouble_since = None
        elif not problem.recoverable:
            raise ProvisionFailed(f"Vast instance {iid} {problem.reason}")
        else:
            trouble_since = now if trouble_since is None else trouble_since
            if now - trouble_since >= grace_s:
                raise ProvisionFailed(
                    f"Vast instance {iid} {problem.reason} (for {now - trouble_since:.0f} s)",
                    hint="raise boot_grace_s if the host usually recovers, or pick another offer",
                )
        if inst.actual_status == "running" and inst.ssh_endpoint() is not None:
            return inst
        if now >= deadline:
            raise ProvisionFailed(
                f"Vast instance {iid} is still {inst.actual_status or 'not started'} after the deadline",
                hint="raise ready_timeout_s for slow image pulls, or pick another offer",
            )
        time.sleep(min(poll_s, max(0.0, deadline - now)))


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
