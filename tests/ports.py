"""Free TCP ports on loopback for the test daemons (sshd, slurmctld, slurmd).

`bind(0)` hands out a port from the kernel's ephemeral range, which is also where every
outgoing connection (ssh, rsync, HTTP) takes its local port: between the pick and the daemon's
own bind, or while a test keeps a daemon down and then restarts it on the same port, a client
connection can take it ("Address already in use"). So ports come from below that range, in a
slice of their own for each pytest-xdist worker, and each is checked free before it is given.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

#: below Linux's default ephemeral range (32768-60999) and above the usual services
LOW, HIGH = 20000, 32000


def _ephemeral() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _slice() -> range:
    """This process's ports: one slice of LOW..HIGH per xdist worker (gw0, gw1, ...)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    width = (HIGH - LOW) // count
    start = LOW + (index % count) * width
    return range(start, start + width)


_rng = random.Random(os.getpid())


def free_port() -> int:
    """A port nobody listens on, outside the ephemeral range (falls back to `bind(0)`)."""
    lo, hi = _ephemeral()
    ports = [p for p in _slice() if not lo <= p <= hi]
    for _ in range(200):
        port = _rng.choice(ports) if ports else 0
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port in {_slice()} on 127.0.0.1")
