"""Build a `Target` from orch.toml: `make_target(ctx, name)`.

Nothing is cached globally and nothing connects here: an ssh target connects on first use, so
listing or building targets never blocks on a dead box. A target's `python` comes from the
config (`python = "..."`), else from the store (what bootstrap recorded), else the default
(`sys.executable` for local, `python3` on an ssh box).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import LocalTarget as LocalConfig
from orchestrator.config import SlurmTarget as SlurmConfig
from orchestrator.config import SshTarget as SshConfig
from orchestrator.targets.base import Target
from state.errors import ConfigError
from state.models import RunRecord

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.targets.sshconfig import SshHop

KNOWN_HOSTS_FILE = "known_hosts"


def default_known_hosts(ctx: Context) -> Path:
    """orch's own host-key file (never the user's ~/.ssh/known_hosts)."""
    return ctx.state_dir / KNOWN_HOSTS_FILE


def recorded_python(ctx: Context, name: str) -> str | None:
    """The interpreter bootstrap recorded for target `name`, if any."""
    with contextlib.suppress(Exception):  # a missing/locked store must not stop a command
        row = ctx.store.get_target(name)
        if row and row.get("python"):
            return str(row["python"])
    return None


def resolve_ssh(cfg: SshConfig) -> SshHop:
    """Where an ssh target really is: its `host` looked up in the ssh_config (an alias's
    HostName, User, Port, IdentityFile, ProxyJump), orch.toml's own keys winning. Connects
    nowhere."""
    # fabric (and invoke with it) loads only when an ssh target is built or shown.
    from orchestrator.targets.sshconfig import resolve

    return resolve(
        cfg.host,
        port=cfg.port,
        user=cfg.user,
        identity_file=cfg.identity_file,
        ssh_config=cfg.ssh_config,
    )


def missing_target_hint(name: str, to_do: str) -> str:
    """What to do about a run whose target `name` left orch.toml."""
    return f"add [targets.{name}] back to orch.toml to {to_do}"


def require_run_target(ctx: Context, rec: RunRecord, action: str) -> None:
    """ConfigError, one line, when the target `rec` ran on is no longer in orch.toml (an old
    run outlives the config entry of its box): which target, and what to do."""
    if rec.target not in ctx.config.targets:
        raise ConfigError(
            f"cannot {action} run {rec.key}: its target {rec.target!r} is no longer in orch.toml",
            hint=missing_target_hint(rec.target, f"{action} it")
            + f"; `orch logs {rec.key}` shows what orch recorded",
        )


def make_target(ctx: Context, name: str | None = None) -> Target:
    """The target called `name` (default: the config's default_target). ConfigError if unknown."""
    name, cfg = ctx.config.target(name)
    python = cfg.python or recorded_python(ctx, name)
    # Each kind's module is imported when a target of that kind is built: paramiko (ssh, vast)
    # costs every `orch` command a noticeable start-up otherwise.
    if isinstance(cfg, LocalConfig):
        # lazy, for start-up time: only a local target needs it
        from orchestrator.targets.local import LocalTarget

        workdir = Path(cfg.workdir).expanduser() if cfg.workdir else ctx.state_dir / "local"
        if not workdir.is_absolute():
            workdir = ctx.project_root / workdir
        return LocalTarget(name, workdir=workdir, python=python, env=cfg.env)
    if isinstance(cfg, SshConfig):
        # lazy, for start-up time: pulls in paramiko
        from orchestrator.targets.ssh import SshTarget

        mon = ctx.config.monitor_for(name)
        known_hosts = cfg.known_hosts or default_known_hosts(ctx)

        def build(hop: SshHop, label: str, **kw: object) -> SshTarget:
            # Every hop pins its key in the same known_hosts, the jump host's included.
            return SshTarget(
                label,
                host=hop.host,
                port=hop.port,
                user=hop.user,
                identity_file=hop.identity_file,
                known_hosts=known_hosts,
                connect_timeout=mon.connect_timeout_s,
                command_timeout=mon.command_timeout_s,
                jump=build(hop.jump, f"{name} (jump {hop.jump.host})") if hop.jump else None,
                **kw,  # type: ignore[arg-type]
            )

        hop = resolve_ssh(cfg)
        if isinstance(cfg, SlurmConfig):  # a Slurm login node: an ssh box that also submits
            # lazy, for start-up time: pulls in paramiko
            from orchestrator.targets.slurm import SlurmTarget

            return SlurmTarget(
                name,
                config=cfg,
                host=hop.host,
                port=hop.port,
                user=hop.user,
                identity_file=hop.identity_file,
                known_hosts=known_hosts,
                connect_timeout=mon.connect_timeout_s,
                command_timeout=mon.command_timeout_s,
                jump=build(hop.jump, f"{name} (jump {hop.jump.host})") if hop.jump else None,
                workdir=cfg.workdir,
                python=python,
                env=cfg.env,
            )
        return build(hop, name, workdir=cfg.workdir, python=python, env=cfg.env)
    if cfg.kind == "vast":
        try:  # by name: an orch built without vast support still serves local and ssh targets
            vast = importlib.import_module("orchestrator.targets.vast")
        except ModuleNotFoundError as exc:
            if exc.name not in {"orchestrator.targets.vast", "orchestrator.vast"}:
                raise
            raise ConfigError(
                f"target {name!r} is kind 'vast', but vast support is not installed in this orch",
                hint='update orch, or use a `kind = "ssh"` target pointing at the box',
            ) from exc
        target: Target = vast.make_vast_target(ctx, name, cfg, python=python)
        return target
    raise ConfigError(
        f"target {name!r} has unknown kind {cfg.kind!r}", hint="use local, ssh, slurm or vast"
    )
