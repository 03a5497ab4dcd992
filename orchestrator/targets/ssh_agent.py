"""The poll agent over ssh: one `python -m state.agent` on a channel that stays open.

A poll is one JSON line each way on that channel (about a millisecond on loopback) instead of a
new channel and a new remote Python (hundreds of ms). A request that times out, or a channel that
closes, drops the whole connection (a frozen box looks exactly like that) and raises
UnreachableError; the next request reconnects and starts a new agent.
"""

from __future__ import annotations

import json
import select
import threading
import time
from typing import Any, Protocol

import paramiko

from orchestrator.sshcmd import quote_argv
from orchestrator.targets.base import Agent, decode_agent_answer
from orchestrator.targets.watchdog import Watchdog
from state.errors import RemoteCommandError, TargetError, UnreachableError


class ChannelSource(Protocol):
    """What the agent needs of its connection (`SshTarget` is one): channels on a transport
    with a deadline, and word of a failure so the connection is dropped and remade."""

    name: str

    @property
    def current_transport(self) -> paramiko.Transport | None: ...

    def open_channel(self, deadline: float) -> tuple[paramiko.Transport, paramiko.Channel]: ...

    def after_failure(self, t: paramiko.Transport) -> None: ...

    def agent_argv(self) -> list[str]: ...


class SshAgent(Agent):
    """The poll agent on a channel that stays open; restarted after a timeout or EOF."""

    def __init__(self, target: ChannelSource, start_timeout: float = 30.0) -> None:
        self.target = target
        self.start_timeout = start_timeout
        self._chan: paramiko.Channel | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def _start(self, deadline: float) -> None:
        command = quote_argv(self.target.agent_argv())
        t, chan = self.target.open_channel(deadline)
        with Watchdog(t, deadline):
            try:
                chan.exec_command(command)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self.target.after_failure(t)
                raise UnreachableError(
                    f"target {self.target.name}: cannot start the agent: {exc}"
                ) from exc
        chan.settimeout(0.0)
        self._chan, self._buf = chan, b""
        ready = self._read_line(deadline, starting=True)
        if not ready.get("ready"):
            self.close()
            raise TargetError(
                f"target {self.target.name}: the agent sent {ready!r} instead of ready"
            )

    def request(self, payload: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        with self._lock:
            if (
                self._chan is None
                or self._chan.closed
                or self._chan.get_transport() is not self.target.current_transport
            ):
                self.close()
                self._start(time.monotonic() + max(timeout, self.start_timeout))
            assert self._chan is not None
            deadline = time.monotonic() + timeout
            line = json.dumps(payload).encode() + b"\n"
            try:
                self._chan.settimeout(max(0.01, timeout))
                self._chan.sendall(line)
                self._chan.settimeout(0.0)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self._fail()
                raise UnreachableError(
                    f"target {self.target.name}: the agent channel broke: {exc}"
                ) from exc
            return self._read_line(deadline)

    def _read_line(self, deadline: float, *, starting: bool = False) -> dict[str, Any]:
        """The next answer line; pushed lines met on the way go to `on_push`."""
        while True:
            answer = self._next_line(deadline, starting=starting)
            if not self.is_push(answer):
                return answer
            self._pushed(answer)

    def _pushed(self, line: dict[str, Any]) -> None:
        if self.on_push is not None:
            self.on_push(line)

    def drain(self, wait: float) -> bool:
        """Wait (outside the lock) up to `wait` s for data, then hand every complete pushed line
        to `on_push`. False once the channel is gone: the next request reconnects."""
        chan = self._chan
        if chan is None or chan.closed:
            return False
        if b"\n" not in self._buf and not chan.recv_ready():
            select.select([chan], [], [], wait)
        with self._lock:
            if self._chan is not chan:
                return False
            assert chan is not None  # (mypy narrows `chan` to the attribute's type above)
            try:
                while chan.recv_ready():
                    chunk = chan.recv(65536)
                    if not chunk:
                        break
                    self._buf += chunk
            except (OSError, paramiko.SSHException, EOFError):
                self._fail()
                return False
            while b"\n" in self._buf:
                raw, _, self._buf = self._buf.partition(b"\n")
                try:
                    line = decode_agent_answer(self.target.name, raw)
                except TargetError:
                    self.close()
                    return False
                if self.is_push(line):
                    self._pushed(line)  # an answer nobody waits for is dropped
            transport = chan.get_transport()
            if chan.eof_received or chan.closed or not transport.is_active():
                if transport.is_active():
                    self.close()
                else:
                    self._fail()
                return False
        return True

    def _next_line(self, deadline: float, *, starting: bool = False) -> dict[str, Any]:
        chan = self._chan
        assert chan is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail()
                raise UnreachableError(
                    f"target {self.target.name}: the agent did not answer in time"
                )
            if chan.recv_ready():
                try:
                    chunk = chan.recv(65536)
                except (OSError, paramiko.SSHException, EOFError) as exc:
                    self._fail()
                    raise UnreachableError(
                        f"target {self.target.name}: the agent channel broke: {exc}"
                    ) from exc
                if chunk:
                    self._buf += chunk
                    continue
            if chan.eof_received or chan.closed or not chan.get_transport().is_active():
                self._agent_gone(chan, starting)
            select.select([chan], [], [], min(left, 0.05))
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return decode_agent_answer(self.target.name, line)
        except TargetError:
            self.close()  # out of step with the agent: the next request starts a fresh one
            raise

    def _agent_gone(self, chan: paramiko.Channel, starting: bool) -> None:
        err = b""
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        text = " ".join(err.decode("utf-8", "replace").split())[-500:]
        rc = chan.exit_status if chan.exit_status_ready() else -1
        transport_ok = chan.get_transport().is_active()
        self.close()
        if starting and transport_ok:
            raise RemoteCommandError(
                f"target {self.target.name}: the agent failed to start (exit {rc}): {text or '(no stderr)'}",
                returncode=rc,
                stderr=text,
                hint="check the target's `python` and that the code is synced (orch launch does)",
            )
        if not transport_ok:
            self.target.after_failure(chan.get_transport())
        raise UnreachableError(
            f"target {self.target.name}: the agent channel closed: {text or 'EOF'}"
        )

    def _fail(self) -> None:
        """A timed-out or broken agent means a frozen or gone box: drop the whole connection."""
        chan = self._chan
        self.close()
        if chan is not None:
            self.target.after_failure(chan.get_transport())

    def close(self) -> None:
        chan, self._chan = self._chan, None
        self._buf = b""
        if chan is not None:
            chan.close()
