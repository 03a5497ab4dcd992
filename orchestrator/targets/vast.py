"""The `vast` target: once `orch up` has rented an instance, it is an `ssh` target.

The endpoint comes from the store's `instances` row of the target's live instance (written by
provisioning from Vast's answer: direct `public_ipaddr` + `ports["22/tcp"]` when the instance
has it, else `ssh_host:ssh_port`; the pair is stored together, so the two are never mixed). The
host key is pinned on first use into a known_hosts file of that instance alone, which
`orch down` deletes with the instance.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import VastTarget as VastConfig
from orchestrator.hostkeys import forget_host_key
from orchestrator.targets.ssh import SshTarget
from state.errors import ConfigError, TargetError

if TYPE_CHECKING:
    from orchestrator.context import Context

PROVIDER = "vast"
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


class VastBoxTarget(SshTarget):
    """An `SshTarget` pointed at a rented Vast instance (`instance_id` says which)."""

    def __init__(self, name: str, *, instance_id: str, **kw: Any) -> None:
        super().__init__(name, kind="vast", **kw)
        self.instance_id = instance_id


def identity_file(cfg: VastConfig) -> Path:
    """The private key orch logs in with (its `.pub` is attached to the instance)."""
    candidates = [cfg.identity_file] if cfg.identity_file else list(DEFAULT_IDENTITIES)
    for c in candidates:
        path = Path(c).expanduser()
        if path.is_file():
            return path
    if cfg.identity_file:
        raise ConfigError(
            f"identity_file {cfg.identity_file} does not exist",
            hint="create one with `ssh-keygen -t ed25519` or fix the path in orch.toml",
        )
    raise ConfigError(
        "a vast target needs an ssh key: none of " + ", ".join(DEFAULT_IDENTITIES) + " exists",
        hint="set identity_file in [targets.<name>] or create one with `ssh-keygen -t ed25519`",
    )


def public_key(identity: Path) -> str:
    """The OpenSSH public key of `identity` (its .pub file, else derived by ssh-keygen -y)."""
    pub = identity.with_name(identity.name + ".pub")
    if pub.is_file():
        text = pub.read_text(encoding="utf-8").strip()
    else:
        try:
            out = subprocess.run(
                ["ssh-keygen", "-y", "-f", str(identity)],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=15,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"cannot read the public key of {identity}: {exc}") from exc
        if out.returncode != 0:
            raise ConfigError(
                f"cannot derive the public key of {identity}: {out.stderr.strip()}",
                hint=f"write it to {pub} (ssh-keygen -y -f {identity} > {pub})",
            )
        text = out.stdout.strip()
    if not text.startswith(("ssh-", "ecdsa-", "sk-")):
        raise ConfigError(f"{pub} is not an OpenSSH public key")
    return text


def known_hosts_path(ctx: Context, cfg: VastConfig, instance_id: str) -> Path:
    """The pinned host key of one instance (unless the config names its own file)."""
    if cfg.known_hosts:
        return Path(cfg.known_hosts)
    return ctx.state_dir / "vast" / f"known_hosts-{instance_id}"


def drop_host_key(
    ctx: Context, cfg: VastConfig, instance_id: str, host: str, port: int | None
) -> None:
    """Forget the pinned key of a destroyed instance (its address will be someone else's)."""
    path = known_hosts_path(ctx, cfg, instance_id)
    if not cfg.known_hosts:
        path.unlink(missing_ok=True)
    elif host:
        forget_host_key(path, host, port or 22)


def make_vast_target(
    ctx: Context, name: str, cfg: VastConfig, *, python: str | None = None
) -> VastBoxTarget:
    """The ssh side of vast target `name`; TargetError when it has no usable instance. `python`
    is the interpreter to run there (the factory's choice: config, else what bootstrap recorded)."""
    row = ctx.store.live_instance_for(name)
    if row is None:
        raise TargetError(
            f"vast target {name!r} has no instance", hint=f"rent one with `orch up {name}`"
        )
    if not row.get("ssh_host") or not row.get("ssh_port"):
        raise TargetError(
            f"vast instance {row['instance_id']} of target {name!r} is not ready (state {row.get('state') or 'unknown'})",
            hint=f"finish provisioning with `orch up {name}`, or `orch down {name}`",
        )
    mon = ctx.config.monitor_for(name)
    known = known_hosts_path(ctx, cfg, str(row["instance_id"]))
    known.parent.mkdir(parents=True, exist_ok=True)
    return VastBoxTarget(
        name,
        instance_id=str(row["instance_id"]),
        host=str(row["ssh_host"]),
        port=int(row["ssh_port"]),
        user=cfg.user,
        identity_file=str(identity_file(cfg)),
        known_hosts=known,
        workdir=cfg.workdir,
        python=python,
        env=cfg.env,
        connect_timeout=mon.connect_timeout_s,
        command_timeout=mon.command_timeout_s,
    )
