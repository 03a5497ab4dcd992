"""The watcher lock: one `orch watch` per state dir, and a way for others to know it runs.

An exclusive `flock` on `<state_dir>/watcher.lock` is held for the watcher's life; the kernel
drops it when the process dies however it dies (kill -9 included), so a stale file never blocks
a restart. `<state_dir>/watcher.json` is a heartbeat (pid, host, start, last beat) for humans
and for `orch status`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from state.errors import OrchError
from state.protocol import atomic_write_json

if TYPE_CHECKING:
    from orchestrator.context import Context

LOCK_FILE = "watcher.lock"
HEARTBEAT_FILE = "watcher.json"


class WatcherBusyError(OrchError):
    """Another `orch watch` already watches this state dir."""


def _try_lock(path: Path) -> IO[str] | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


class WatcherLock:
    """Held by the one running watcher of a state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.lock_path = state_dir / LOCK_FILE
        self.heartbeat_path = state_dir / HEARTBEAT_FILE
        self._file: IO[str] | None = None
        self.started_at = datetime.now(timezone.utc)

    def acquire(self) -> None:
        f = _try_lock(self.lock_path)
        if f is None:
            info = read_heartbeat(self.heartbeat_path)
            who = f" (pid {info.get('pid')} on {info.get('host')})" if info else ""
            raise WatcherBusyError(
                f"another `orch watch` is already running for {self.lock_path.parent}{who}",
                hint="stop it first, or just read `orch status` (the watcher keeps it fresh)",
            )
        self._file = f
        self.beat()

    def beat(self, **extra: Any) -> None:
        atomic_write_json(
            self.heartbeat_path,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": self.started_at.isoformat(),
                "heartbeat_at": datetime.now(timezone.utc).isoformat(),
                **extra,
            },
        )

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self.heartbeat_path.unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WatcherLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_heartbeat(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def watcher_running(ctx: Context) -> bool:
    """True while an `orch watch` holds the lock of this context's state dir."""
    path = ctx.state_dir / LOCK_FILE
    if not path.exists():
        return False
    f = _try_lock(path)
    if f is None:
        return True
    with contextlib.suppress(OSError):
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    f.close()
    return False


def watcher_info(ctx: Context) -> dict[str, Any]:
    """The running watcher's heartbeat ({} when none runs)."""
    return read_heartbeat(ctx.state_dir / HEARTBEAT_FILE) if watcher_running(ctx) else {}
