"""The one seam around remote execution.

Everything orch does on a box goes through a `Target`: run a command (built from a list, with a
deadline), put/get files, sync a tree, and talk to the long-lived poll agent. `local` runs
subprocesses under `.orch/local/`; `ssh` uses one persistent paramiko connection plus rsync
over ssh with the same key, port and pinned host key; `vast` provisions and then is an `ssh`.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.sshcmd import SyncStats
from state.errors import TargetError


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def decode_agent_answer(target: str, line: bytes) -> dict[str, Any]:
    """One answer line of `python -m state.agent` as a dict; TargetError for anything else
    (the channel is then out of step and the caller must drop it)."""
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise TargetError(f"target {target}: the agent sent a bad line: {line[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise TargetError(f"target {target}: the agent sent {answer!r}")
    return answer


class Agent(abc.ABC):
    """A long-lived `python -m state.agent` on the target: one JSON line per request.

    After a `watch` request the agent also pushes lines by itself (`{"push": n, ...}`); every
    such line read, while waiting for an answer or in `drain`, goes to `on_push` (called on the
    reading thread: it must only hand the line on, never call back into this agent)."""

    on_push: Callable[[dict[str, Any]], None] | None = None

    @abc.abstractmethod
    def request(self, payload: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Send one request and return the parsed answer; UnreachableError past the deadline."""

    def drain(self, wait: float) -> bool:
        """Wait up to `wait` s for pushed lines and hand them to `on_push`. False once the
        channel is gone (the next request starts a new agent) or when this agent cannot push."""
        return False

    @staticmethod
    def is_push(answer: dict[str, Any]) -> bool:
        return "push" in answer and "ok" not in answer

    @abc.abstractmethod
    def close(self) -> None: ...


class Target(abc.ABC):
    """A place runs execute. Paths on the target are POSIX strings relative to `workdir`
    unless absolute."""

    name: str
    kind: str

    @property
    @abc.abstractmethod
    def workdir(self) -> str:
        """Absolute workdir on the target (code in `code/`, runs in `runs/`)."""

    @abc.abstractmethod
    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        cwd: str | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run `argv` (quoted with shlex on remote targets) within `timeout` seconds.

        Raises UnreachableError if the deadline passes or the connection fails;
        RemoteCommandError if `check` and the exit code is non-zero.
        """

    @abc.abstractmethod
    def put_bytes(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        """Write `data` to `remote_path` atomically with `mode` (0600 for secrets)."""

    @abc.abstractmethod
    def get_file(self, remote_path: str, local_path: Path) -> None: ...

    @abc.abstractmethod
    def sync_up(
        self,
        local_dir: Path,
        remote_dir: str,
        *,
        excludes: list[str],
        delete: bool = True,
        filter_files: list[Path] | None = None,
    ) -> SyncStats:
        """Mirror a local tree onto the target (rsync; only changed data moves)."""

    @abc.abstractmethod
    def sync_down(
        self,
        remote_dir: str,
        local_dir: Path,
        *,
        excludes: list[str] | None = None,
        timeout: float | None = None,
    ) -> SyncStats:
        """Copy a remote tree down with partial-resume (`--partial-dir`), never deleting locally.
        Only regular files and dirs arrive: symlinks and special files on the target are
        skipped (listed in `SyncStats.extra["skipped"]`), never recreated or followed here."""

    @abc.abstractmethod
    def agent(self) -> Agent:
        """The persistent poll agent (started on first use, restarted after a failure)."""

    def preflight(self) -> None:  # noqa: B027 - optional hook
        """Check what the configuration names without connecting (an ssh key file, a host):
        ConfigError, one line. A launch calls it before anything is recorded or started."""

    def ping(self, timeout: float = 5.0) -> bool:
        """True only if the box answered a real request within `timeout` (keepalives prove nothing)."""
        try:
            return bool(self.agent().request({"op": "ping"}, timeout=timeout).get("ok"))
        except Exception:
            return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (idempotent)."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
