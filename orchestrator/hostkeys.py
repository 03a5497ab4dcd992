"""Host-key pinning: trust on first use into orch's own known_hosts file, refuse a change.

The file (default `<state_dir>/known_hosts`, or a target's `known_hosts`) is in OpenSSH format,
so the `ssh`/`rsync` subprocesses check the same pins with `StrictHostKeyChecking=yes`. The first
connection to a host:port records its key; a later different key raises HostKeyError saying what
to do. Nothing here ever accepts a changed key silently (no AutoAddPolicy). `forget_host_key`
drops a pin (a destroyed rented box, or a key rotation the user has checked).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import paramiko

from state.errors import ConfigError, HostKeyError


def host_entry(host: str, port: int) -> str:
    """The known_hosts name of host:port (`[host]:port` unless the port is 22)."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:...` as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the file: two orch processes pinning at once stay consistent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _load(path: Path) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    if path.exists():
        try:
            keys.load(str(path))
        except (OSError, paramiko.SSHException) as exc:
            raise ConfigError(
                f"cannot read known_hosts file {path}: {exc}", hint="fix or delete that file"
            ) from exc
    return keys


def pinned_keys(path: Path, host: str, port: int) -> dict[str, paramiko.PKey]:
    """The pinned keys of host:port by key type (empty if none)."""
    found = _load(Path(path)).lookup(host_entry(host, port))
    return dict(found.items()) if found is not None else {}


def check_or_pin(
    path: Path, host: str, port: int, key: paramiko.PKey, *, target: str | None = None
) -> bool:
    """Accept `key` for host:port if it matches the pin, or pin it if host:port has none.

    Returns True when the key was pinned just now. Raises HostKeyError if a different key of
    the same type is pinned, or if only keys of other types are pinned (a server that stopped
    offering the pinned type is treated as changed, never as new).
    """
    path = Path(path)
    entry = host_entry(host, port)
    with _locked(path):
        pinned = pinned_keys(path, host, port)
        if not pinned:
            line = f"{entry} {key.get_name()} {key.get_base64()}\n"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            return True
        old = pinned.get(key.get_name())
        if old is not None and old.asbytes() == key.asbytes():
            return False
    was = ", ".join(f"{k.get_name()} {fingerprint(k)}" for k in pinned.values())
    who = f"target {target} ({entry})" if target else entry
    raise HostKeyError(
        f"host key of {who} changed: pinned {was}, now offered {key.get_name()} {fingerprint(key)}",
        hint=(
            "this is what a man-in-the-middle looks like; if the box was rebuilt or its key rotated "
            f"on purpose, drop the old pin with `ssh-keygen -R '{entry}' -f {path}` and connect again"
        ),
        offered=f"{key.get_name()} {fingerprint(key)}",
    )


def forget_host_key(path: Path, host: str, port: int) -> int:
    """Drop every pin of host:port from `path`; returns how many lines went."""
    path = Path(path)
    if not path.exists():
        return 0
    entry = host_entry(host, port)
    with _locked(path):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep: list[str] = []
        dropped = 0
        for line in lines:
            fields = line.split()
            names = fields[0].split(",") if fields and not line.lstrip().startswith("#") else []
            if entry in names:
                dropped += 1
                continue
            keep.append(line)
        if dropped:
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return dropped
