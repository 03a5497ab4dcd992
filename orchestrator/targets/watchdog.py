"""A deadline for blocking paramiko calls: a timer that closes the transport when it passes.

paramiko's `exec_command` waits for the server without a timeout and `recv_exit_status()` blocks
past `exec_command(timeout=)`; closing the transport is what makes such a call return. The ssh
target and its poll agent (`ssh.py`, `ssh_agent.py`) both use it.
"""

from __future__ import annotations

import threading
import time

import paramiko


class Watchdog:
    """Closes `transport` when `deadline` passes, so a blocked paramiko call returns."""

    def __init__(self, transport: paramiko.Transport, deadline: float) -> None:
        self.fired = False
        self._transport = transport
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self._transport.close()

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
