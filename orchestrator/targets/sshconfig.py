"""Where an `ssh` target really is, read from the researcher's ssh_config with fabric.

    hop = resolve("gpu-box", user=None, port=None, identity_file=None, ssh_config=None)
    hop.host, hop.port, hop.user, hop.identity_file, hop.jump   # jump: the ProxyJump hop

orch.toml's `host` may be a `Host` alias: fabric's `Config` reads the ssh_config files
(`ssh_config = "..."` on the target, like `ssh -F`; else `~/.ssh/config` and
`/etc/ssh/ssh_config`, as OpenSSH does) and fabric's `Connection` turns the alias into
`HostName`, `User`, `Port`, `IdentityFile` and a `ProxyJump` chain (each hop a gateway
`Connection`, itself looked up in the same files). Keys set in orch.toml override the file.

Only the lookup is fabric's: `Connection.open()` would trust any host key it has not seen
(fabric installs paramiko's `AutoAddPolicy`), so the transport is orch's own (`ssh.py`): it
pins every hop's key, the jump host's included, and reaches the target through a
`direct-tcpip` channel on the jump's transport, as fabric's `open_gateway` does. Nothing here
connects; fabric is imported only when an ssh target is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric import Config, Connection

from state.errors import ConfigError

DEFAULT_USER = "root"  # orch's default login when neither orch.toml nor ssh_config names one


@dataclass(frozen=True)
class SshHop:
    """One ssh endpoint: the target itself, or the jump host in front of it (`jump`)."""

    host: str
    port: int
    user: str
    identity_file: str | None = None
    jump: SshHop | None = None


def resolve(
    host: str,
    *,
    port: int | None = None,
    user: str | None = None,
    identity_file: str | None = None,
    ssh_config: str | None = None,
) -> SshHop:
    """The target `host` (an address or a `Host` alias) as ssh_config and orch.toml say."""
    if ssh_config is not None and not Path(ssh_config).expanduser().is_file():
        raise ConfigError(
            f"ssh_config {ssh_config} does not exist",
            hint="fix ssh_config in orch.toml, or drop it to read ~/.ssh/config",
        )
    conn = Connection(host, config=_config(ssh_config))
    found = conn.ssh_config
    return SshHop(
        host=conn.host,
        port=port or int(found.get("port", 22)),
        user=user or found.get("user") or DEFAULT_USER,
        identity_file=identity_file or _identity(found),
        jump=_jump_of(conn, host),
    )


def _config(path: str | None) -> Config:
    # lazy: fabric's own YAML/JSON config files (/etc/fabric.yml, ~/.fabric.yml) are not orch's.
    cfg = Config(lazy=True, runtime_ssh_path=str(Path(path).expanduser()) if path else None)
    try:
        cfg.load_ssh_config()
    except OSError as exc:
        raise ConfigError(f"cannot read ssh_config {path or '~/.ssh/config'}: {exc}") from exc
    return cfg


def _identity(found: Any) -> str | None:
    """The first IdentityFile that exists (OpenSSH skips missing ones too)."""
    for candidate in found.get("identityfile", []):
        path = Path(candidate).expanduser()
        if path.is_file():
            return str(path)
    return None


def _jump_of(conn: Connection, alias: str) -> SshHop | None:
    gateway = conn.gateway
    if not gateway:
        return None
    if isinstance(gateway, str):
        raise ConfigError(
            f"ssh_config gives host {alias!r} a ProxyCommand, which orch does not run",
            hint="reach it with `ProxyJump jump-host` instead (orch pins the jump host's key too)",
        )
    return SshHop(
        host=gateway.host,
        port=int(gateway.port),
        user=gateway.user,
        identity_file=_identity(gateway.ssh_config),
        jump=_jump_of(gateway, gateway.original_host),
    )
