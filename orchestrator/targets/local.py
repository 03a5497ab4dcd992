"""The `local` target: runs on this machine, under `<state_dir>/local` unless `workdir` is set.

Same semantics as the ssh target so the rest of orch cannot tell them apart: every command has a
deadline (its whole process group is killed past it and UnreachableError is raised), a missing
program exits 127 as a remote shell would, files are written atomically, trees move with rsync
(partial-resume, --stats), and the poll agent is a long-lived `python -m state.agent` child with
pipes that answers one JSON line per request.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import state
from orchestrator.sshcmd import include_list_file, kill_group, quote_argv, rsync_argv, run_rsync
from orchestrator.targets.base import Agent, CommandResult, SyncStats, Target, decode_agent_answer
from state.errors import RemoteCommandError, TargetError, UnreachableError
from state.protocol import atomic_write_bytes

#: Where the controller's own `state` package lives: the local agent's fallback before a sync.
_CONTROLLER_ROOT = str(Path(state.__file__).resolve().parent.parent)


class LocalTarget(Target):
    """This machine. `python` is the interpreter runs and the agent use (default: this one)."""

    kind = "local"

    def __init__(
        self,
        name: str = "local",
        *,
        workdir: str | os.PathLike[str],
        python: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self._workdir = str(Path(workdir).expanduser().resolve())
        self.python = python or sys.executable
        self.env = dict(env or {})
        self._agent: LocalAgent | None = None

    @property
    def workdir(self) -> str:
        return self._workdir

    def path(self, p: str) -> Path:
        """A target path: absolute as is, else relative to the workdir."""
        q = Path(p)
        return q if q.is_absolute() else Path(self._workdir) / q

    # -- commands ---------------------------------------------------------------------------
    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        cwd: str | None = None,
        check: bool = False,
    ) -> CommandResult:
        _check_argv(argv)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(self.path(cwd)) if cwd else None,
                start_new_session=True,  # a deadline kills the command and all it started
            )
        except FileNotFoundError as exc:
            if cwd and not self.path(cwd).is_dir():
                res = CommandResult(
                    tuple(argv), 1, "", f"cd: {self.path(cwd)}: No such file or directory\n"
                )
            else:
                res = CommandResult(
                    tuple(argv), 127, "", f"{argv[0]}: command not found ({exc.strerror})\n"
                )
            return _checked(res, check, self.name)
        except PermissionError as exc:
            return _checked(
                CommandResult(tuple(argv), 126, "", f"{argv[0]}: {exc.strerror}\n"),
                check,
                self.name,
            )
        try:
            out, err = proc.communicate(input=stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise UnreachableError(
                f"target {self.name}: `{_short(argv)}` did not finish within {timeout:g}s (killed)"
            ) from None
        res = CommandResult(
            tuple(argv),
            proc.returncode,
            out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
        )
        return _checked(res, check, self.name)

    # -- files ----------------------------------------------------------------------------
    def put_bytes(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        # The protocol's writer: mkstemp creates the temp file 0600, so a secret is never
        # readable by others, even briefly, and readers never see a half-written file.
        atomic_write_bytes(self.path(remote_path), data, mode)

    def get_file(self, remote_path: str, local_path: Path) -> None:
        src = self.path(remote_path)
        try:
            data = src.read_bytes()
        except FileNotFoundError as exc:
            raise RemoteCommandError(
                f"target {self.name}: {src} does not exist", returncode=1
            ) from exc
        except OSError as exc:
            raise TargetError(f"target {self.name}: cannot read {src}: {exc.strerror}") from exc
        atomic_write_bytes(local_path, data)

    def sync_up(
        self,
        local_dir: Path,
        remote_dir: str,
        *,
        excludes: list[str],
        delete: bool = True,
        filter_files: list[Path] | None = None,
    ) -> SyncStats:
        """Mirror `local_dir` into `remote_dir`. With `filter_files` (paths relative to
        `local_dir`) exactly those files are mirrored; with `delete` anything else there goes."""
        dest = self.path(remote_dir)
        dest.mkdir(parents=True, exist_ok=True)
        with include_list_file(filter_files) as ff:
            argv = rsync_argv(
                f"{Path(local_dir)}/", f"{dest}/", delete=delete, excludes=excludes, filter_file=ff
            )
            return run_rsync(argv, timeout=None, what=f"sync to target {self.name}")

    def sync_down(
        self,
        remote_dir: str,
        local_dir: Path,
        *,
        excludes: list[str] | None = None,
        timeout: float | None = None,
    ) -> SyncStats:
        src = self.path(remote_dir)
        if not src.is_dir():
            raise RemoteCommandError(f"target {self.name}: {src} is not a directory", returncode=23)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        argv = rsync_argv(
            f"{src}/", f"{Path(local_dir)}/", excludes=excludes, untrusted_source=True
        )
        return run_rsync(argv, timeout=timeout, what=f"pull from target {self.name}")

    # -- agent ------------------------------------------------------------------------------
    def agent(self) -> Agent:
        if self._agent is None or not self._agent.alive():
            if self._agent is not None:
                self._agent.close()
            self._agent = LocalAgent(self)
        return self._agent

    def agent_argv(self) -> list[str]:
        return [self.python, "-m", "state.agent", "--workdir", self._workdir]

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None


class LocalAgent(Agent):
    """`python -m state.agent` as a child process; one JSON line each way per request.

    Started lazily on the first request; a timeout or EOF kills it and raises UnreachableError,
    and the next request starts a new one.
    """

    def __init__(self, target: LocalTarget, start_timeout: float = 30.0) -> None:
        self.target = target
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._lock = threading.RLock()  # close() may run inside a locked drain

    def alive(self) -> bool:
        return self._proc is None or self._proc.poll() is None

    def _start(self, timeout: float) -> None:
        code = Path(self.target.workdir) / "code"
        # Before the first sync the controller's own package answers (it is the same code).
        pythonpath = str(code) if (code / "state" / "agent.py").is_file() else _CONTROLLER_ROOT
        env = {**os.environ, "PYTHONPATH": pythonpath}
        Path(self.target.workdir).mkdir(parents=True, exist_ok=True)
        try:
            self._proc = subprocess.Popen(
                self.target.agent_argv(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.target.workdir,
                start_new_session=True,
            )
        except OSError as exc:
            raise TargetError(
                f"target {self.target.name}: cannot start the agent with {self.target.python}: {exc.strerror}",
                hint="set `python` for this target in orch.toml to a working interpreter",
            ) from exc
        self._buf = b""
        ready = self._read_line(time.monotonic() + timeout, starting=True)
        if not ready.get("ready"):
            self.close()
            raise TargetError(
                f"target {self.target.name}: the agent sent {ready!r} instead of ready"
            )

    def request(self, payload: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        with self._lock:
            return self._request(payload, timeout)

    def drain(self, wait: float) -> bool:
        """Wait (outside the lock) up to `wait` s for output, then hand every complete pushed
        line to `on_push`. False once the agent is gone: the next request starts a new one."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return False
        fd = proc.stdout.fileno()
        if b"\n" not in self._buf:
            with contextlib.suppress(OSError, ValueError):
                select.select([fd], [], [], wait)
        with self._lock:
            if self._proc is not proc:
                return False
            ready, _, _ = select.select([fd], [], [], 0)
            chunk = os.read(fd, 65536) if ready else b""
            self._buf += chunk
            while b"\n" in self._buf:
                raw, _, self._buf = self._buf.partition(b"\n")
                try:
                    line = decode_agent_answer(self.target.name, raw)
                except TargetError:
                    self.close()
                    return False
                if self.is_push(line) and self.on_push is not None:
                    self.on_push(line)
            if ready and not chunk:  # EOF: the agent exited
                self.close()
                return False
        return True

    def _request(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start(max(timeout, self.start_timeout))
            deadline = time.monotonic() + timeout
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(payload).encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            self.close()
            raise UnreachableError(
                f"target {self.target.name}: the agent went away ({exc})"
            ) from exc
        return self._read_line(deadline)

    def _read_line(self, deadline: float, *, starting: bool = False) -> dict[str, Any]:
        """The next answer line; pushed lines met on the way go to `on_push`."""
        while True:
            answer = self._next_line(deadline, starting=starting)
            if not self.is_push(answer):
                return answer
            if self.on_push is not None:
                self.on_push(answer)

    def _next_line(self, deadline: float, *, starting: bool = False) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise UnreachableError(
                    f"target {self.target.name}: the agent did not answer in time"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                err = self._stderr_tail()
                rc = self._proc.poll()
                self.close()
                if starting:
                    raise RemoteCommandError(
                        f"target {self.target.name}: the agent failed to start: {err}",
                        returncode=rc if rc is not None else -1,
                        stderr=err,
                        hint="check the target's `python` and that the code is synced (orch launch does)",
                    )
                raise UnreachableError(f"target {self.target.name}: the agent exited: {err}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return decode_agent_answer(self.target.name, line)
        except TargetError:
            self.close()  # out of step with the agent: the next request starts a fresh one
            raise

    def _stderr_tail(self) -> str:
        if self._proc is None or self._proc.stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            if self._proc.poll() is None:
                return ""
            return " ".join(self._proc.stderr.read()[-500:].decode("utf-8", "replace").split())
        return ""

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            kill_group(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _check_argv(argv: list[str]) -> None:
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"argv must be a non-empty list of str, got {argv!r}")


def _checked(res: CommandResult, check: bool, target: str) -> CommandResult:
    if check and res.returncode != 0:
        raise RemoteCommandError(
            f"target {target}: `{_short(list(res.argv))}` exited {res.returncode}: "
            f"{' '.join(res.stderr.split())[-300:] or '(no stderr)'}",
            returncode=res.returncode,
            stderr=res.stderr,
        )
    return res


def _short(argv: list[str], n: int = 120) -> str:
    s = quote_argv(argv)
    return s if len(s) <= n else s[: n - 3] + "..."
