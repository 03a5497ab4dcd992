"""The poll agent: a long-lived process on the box answering one JSON line per request.

    python -m state.agent --workdir /root/orch-work

The controller keeps one ssh channel open to it, so a poll costs one line each way (about 1 ms on
loopback) instead of a new ssh channel and a new remote process (about 170 ms). Requests:

    {"op": "ping"}                        -> {"ok": true, "pong": <monotonic>}
    {"op": "observe", "runs": [...]}      -> a TargetObservation as JSON
    {"op": "watch", "runs": [...], ...}   -> the same, plus `watching`, `chan`, `push`; from then
                                             on the agent also pushes lines by itself (state/watch.py)
    {"op": "exit"}                        -> ends the agent

Every answer is exactly one line; a pushed line carries a `push` number and never answers a
request (an agent older than `watch` answers it with an error: the controller then polls). A bad request gets {"ok": false, "error": "..."}; the agent
never dies on bad input, and exits when stdin closes (the channel dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from state.observe import ObserveRequest, observe
from state.watch import BoxWatcher, WatchRequest


def handle(workdir: str, line: str) -> tuple[str, bool]:
    """Answer one request line; returns (answer line, keep_running)."""
    try:
        req = json.loads(line)
        op = req.get("op") if isinstance(req, dict) else None
    except ValueError as exc:
        return json.dumps({"ok": False, "error": f"bad request: {exc}"}), True
    if op == "ping":
        return json.dumps({"ok": True, "pong": time.monotonic()}), True
    if op == "exit":
        return json.dumps({"ok": True}), False
    if op == "observe":
        try:
            obs = observe(workdir, ObserveRequest.model_validate(req))
        except ValidationError as exc:
            return json.dumps({"ok": False, "error": f"bad observe request: {exc}"}), True
        except Exception as exc:  # the agent must survive anything a run dir holds
            return json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), True
        return obs.model_dump_json(), True
    return json.dumps({"ok": False, "error": f"unknown op {op!r}"}), True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m state.agent", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="the target's workdir (runs/ lives under it)")
    args = ap.parse_args(argv)
    return serve(args.workdir, sys.stdin.fileno(), sys.stdout)


def serve(workdir: str, in_fd: int, out: TextIO) -> int:
    """Answer request lines from `in_fd` until EOF or `exit`; after a `watch` request also
    wait on the watched pids and push change lines (state/watch.py). One thread, one select."""
    out.write(json.dumps({"ok": True, "ready": True}) + "\n")
    out.flush()
    watcher: BoxWatcher | None = None
    buf = b""
    try:
        while True:
            fds = watcher.fds() if watcher is not None else {}
            wait = watcher.wait_s(time.monotonic()) if watcher is not None else None
            try:
                ready, _, _ = select.select([in_fd, *fds], [], [], wait)
            except InterruptedError:
                continue
            for fd in ready:
                if fd != in_fd and watcher is not None:
                    watcher.pid_exited(fd)
            if in_fd in ready:
                chunk = os.read(in_fd, 65536)
                if not chunk:
                    return 0  # the channel dropped
                buf += chunk
                while b"\n" in buf:
                    raw, _, buf = buf.partition(b"\n")
                    line = raw.decode("utf-8", "replace")
                    if not line.strip():
                        continue
                    answer, keep, watcher = _answer(workdir, line, watcher)
                    out.write(answer + "\n")
                    out.flush()
                    if not keep:
                        return 0
            if watcher is not None:
                pushed = watcher.tick(time.monotonic())
                for line in pushed:
                    out.write(line + "\n")
                if pushed:
                    out.flush()
    except BrokenPipeError:
        return 0
    finally:
        if watcher is not None:
            watcher.close()


def _answer(
    workdir: str, line: str, watcher: BoxWatcher | None
) -> tuple[str, bool, BoxWatcher | None]:
    """One request: `watch` (re)subscribes; anything else goes to `handle`."""
    try:
        req = json.loads(line)
    except ValueError:
        req = None
    if not (isinstance(req, dict) and req.get("op") == "watch"):
        answer, keep = handle(workdir, line)
        return answer, keep, watcher
    try:
        wreq = WatchRequest.model_validate(req)
        if watcher is None:
            watcher = BoxWatcher(Path(workdir), wreq)
        return watcher.subscribe(wreq), True, watcher
    except ValidationError as exc:
        return json.dumps({"ok": False, "error": f"bad watch request: {exc}"}), True, watcher
    except Exception as exc:  # the agent must survive anything a run dir holds
        return json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), True, watcher


if __name__ == "__main__":
    raise SystemExit(main())
