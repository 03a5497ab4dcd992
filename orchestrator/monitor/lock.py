"""The watcher lock: one watcher per state dir (`orch watch`, or the monitor inside
`orch dashboard`), and a way for others to know who runs it.

An exclusive `flock` on `<state_dir>/watcher.lock` is held for the watcher's life; the kernel
drops it when the process dies however it dies (kill -9 included), so a stale file never blocks
a restart. `<state_dir>/watcher.json` is a heartbeat (holder kind, pid, host, start, last beat)
for humans, for `orch status`, and for the refusal a second watcher prints:

    error: a dashboard (pid 1234, since 22:01) is already watching /p/.orch; quit it (q) or use it instead
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from state.errors import OrchError
from state.protocol import atomic_write_json

if TYPE_CHECKING:
    from orchestrator.context import Context

LOCK_FILE = "watcher.lock"
HEARTBEAT_FILE = "watcher.json"
HOLDER_WAIT_S = 1.0  # a new holder writes its heartbeat right after it takes the lock

#: Who may hold the lock, as a refusal names them, and what the refused user can do about it.
HOLDERS: dict[str, tuple[str, str]] = {
    "watch": (
        "an `orch watch`",
        "stop it (Ctrl-C in its terminal) or just read `orch status`, which it keeps fresh",
    ),
    "dashboard": ("a dashboard", "quit it (q) or use it instead"),
}


class WatcherBusyError(OrchError):
    """Another watcher (`orch watch`, or the monitor inside `orch dashboard`) already watches
    this state dir. `holder` is its heartbeat ({} when it could not be read)."""

    def __init__(self, message: str, *, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}

    @property
    def who(self) -> str:
        """Who holds the lock, e.g. "a dashboard (pid 1234, since 22:01)"."""
        return describe_holder(self.holder)


def describe_holder(info: dict[str, Any], *, now: datetime | None = None) -> str:
    """A watcher's heartbeat in words: "a dashboard (pid 1234, since 22:01)" (pure apart from
    the local time zone). The host is named only when it is not this one; the date only when
    it is not today."""
    name = HOLDERS.get(str(info.get("holder") or ""), ("another watcher", ""))[0]
    parts: list[str] = []
    if info.get("pid"):
        parts.append(f"pid {info['pid']}")
    host = info.get("host")
    if host and host != socket.gethostname():
        parts.append(f"on {host}")
    try:
        started = datetime.fromisoformat(str(info["started_at"])).astimezone()
    except (KeyError, ValueError):
        started = None
    if started is not None:
        today = (now or datetime.now(timezone.utc)).astimezone().date()
        fmt = "%H:%M" if started.date() == today else "%Y-%m-%d %H:%M"
        parts.append(f"since {started.strftime(fmt)}")
    return f"{name} ({', '.join(parts)})" if parts else name


def busy_message(info: dict[str, Any], state_dir: Path) -> str:
    """The one-line refusal: who holds the lock and what to do (pure, see describe_holder)."""
    todo = HOLDERS.get(str(info.get("holder") or ""), ("", ""))[1] or (
        "stop it first, or just read `orch status`"
    )
    return f"{describe_holder(info)} is already watching {state_dir}; {todo}"


def _try_lock(path: Path) -> IO[str] | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def _holder_info(path: Path, wait_s: float = HOLDER_WAIT_S) -> dict[str, Any]:
    """The lock holder's heartbeat. The file can lag the lock by a moment (a new holder writes
    it just after taking the lock; one killed with -9 left its own behind): wait briefly for
    one whose process lives, else give what there is."""
    deadline = time.monotonic() + wait_s
    while True:
        info = read_heartbeat(path)
        local = info.get("host") in (None, socket.gethostname())
        if info and (not local or _alive(info.get("pid"))):
            return info
        if time.monotonic() >= deadline:
            return info if info and not local else {}
        time.sleep(0.05)


class WatcherLock:
    """Held by the one running watcher of a state dir: `holder` says which kind ("watch" for
    `orch watch`, "dashboard" for the monitor inside `orch dashboard`), so a refused second
    watcher can say who holds it."""

    def __init__(self, state_dir: Path, *, holder: str = "watch") -> None:
        if holder not in HOLDERS:
            raise ValueError(f"unknown lock holder {holder!r} (one of {', '.join(HOLDERS)})")
        self.lock_path = state_dir / LOCK_FILE
        self.heartbeat_path = state_dir / HEARTBEAT_FILE
        self.holder = holder
        self._file: IO[str] | None = None
        self.started_at = datetime.now(timezone.utc)

    def acquire(self, *, holder_wait_s: float = HOLDER_WAIT_S) -> None:
        """Take the lock, or WatcherBusyError naming who holds it and what to do (waiting up
        to `holder_wait_s` for a holder that has just taken it to say who it is)."""
        f = _try_lock(self.lock_path)
        if f is None:
            info = _holder_info(self.heartbeat_path, holder_wait_s)
            raise WatcherBusyError(busy_message(info, self.lock_path.parent), holder=info)
        self._file = f
        self.beat()

    def beat(self, **extra: Any) -> None:
        atomic_write_json(
            self.heartbeat_path,
            {
                "holder": self.holder,
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
