"""Shared pieces of the monitor's integration tests and benchmark: a webhook receiver (a real
HTTP server on 127.0.0.1 that Apprise's `json://` posts to), a project with orch.toml pointing
at a real sshd, and a worker-like process started under tmux through the launcher's own wrapper.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from orchestrator import wrapper
from orchestrator.context import Context
from orchestrator.targets.base import Target
from state import names
from state.models import RunRecord
from state.phases import Phase

REPO = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = REPO / "tests" / "monitor_worker.py"


class Webhook:
    """Collects JSON POSTs; `fail_with` makes it answer that status instead (to test retries)."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, dict[str, Any]]] = []
        self.fail_with: int | None = None
        self.cond = threading.Condition()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n)
                if hook.fail_with is not None:
                    self.send_response(hook.fail_with)
                    self.end_headers()
                    return
                try:
                    body = json.loads(data)
                except ValueError:
                    body = {"raw": data.decode(errors="replace")}
                with hook.cond:
                    hook.posts.append((time.monotonic(), body))
                    hook.cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def titles(self) -> list[str]:
        with self.cond:
            return [str(p.get("title", "")) for _, p in self.posts]

    def matching(self, *words: str) -> list[dict[str, Any]]:
        with self.cond:
            return [p for _, p in self.posts
                    if all(w in str(p.get("title", "")) + "\n" + str(p.get("message", "")) for w in words)]

    def wait_for(self, *words: str, timeout: float = 30.0, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [p for _, p in self.posts
                       if all(w in str(p.get("title", "")) + "\n" + str(p.get("message", "")) for w in words)]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no alert with {words} within {timeout} s; got {self.titles()}")
                self.cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_project(root: Path, target_toml: str, *, hook_url: str, monitor: dict[str, Any],
                  target: str = "box", extra: str = "") -> Path:
    """A project folder with orch.toml: one target, fast monitor settings, a webhook alert."""
    root.mkdir(parents=True, exist_ok=True)
    mon = "\n".join(f"{k} = {json.dumps(v)}" for k, v in monitor.items())
    text = (
        f'default_target = "{target}"\n'
        f"{target_toml}"
        f'python = "{sys.executable}"\n\n'
        f"[targets.{target}.monitor]\n{mon}\n\n"
        f'[alerts]\nurls = ["{hook_url}"]\n{extra}'
    )
    (root / "orch.toml").write_text(text)
    return root


def wait_until(pred: Callable[[], object], timeout: float = 30.0, every: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(every)


def prepare_target(target: Target) -> None:
    """Code and the worker-like script on the target, as `orch launch` would have them."""
    from orchestrator.codesync import sync_code

    sync_code(target, REPO)
    target.put_bytes(wrapper.wrapper_script(), wrapper.wrapper_remote_path(target.workdir), mode=0o755)
    target.put_bytes(WORKER_SCRIPT.read_bytes(), f"{target.workdir}/bin/monitor_worker.py", mode=0o644)


_counter = [0]


def start_run(
    ctx: Context,
    target: Target,
    *,
    outcome: str = "forever",
    seconds: float = 1.0,
    timeout_s: float = 3600.0,
    stale_after_s: float = 300.0,
    stage: str = "mon",
) -> RunRecord:
    """Record a run (phase running, as `orch launch` leaves it) and start the worker-like process
    under tmux through the launcher's wrapper, which writes pid and exit_code."""
    _counter[0] += 1
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 1000}{_counter[0]}"
    stage_dir = f"{stage}_dir"
    run_dir = f"{names.RUNS_DIR}/{stage_dir}/{run_id}"
    session = names.session_name(stage, run_id)
    now = datetime.now(timezone.utc)
    spec = {"timeout_s": timeout_s, "stale_after_s": stale_after_s, "run_id": run_id, "stage": stage}
    rec = RunRecord(run_id=run_id, stage=stage, stage_dir=stage_dir, target=target.name, phase=Phase.RUNNING,
                    session=session, run_dir=run_dir, created_at=now, updated_at=now, spec_json=json.dumps(spec))
    ctx.store.insert_run(rec)
    wd = target.workdir
    rd_abs = f"{wd}/{run_dir}"
    target.run(["mkdir", "-p", rd_abs], timeout=10, check=True)
    argv = [getattr(target, "python", sys.executable), f"{wd}/bin/monitor_worker.py", rd_abs,
            "--outcome", outcome, "--seconds", str(seconds)]
    cmd = wrapper.wrapper_command(wrapper_path=wrapper.wrapper_remote_path(wd), run_dir_abs=rd_abs, argv=argv,
                                  env={"PYTHONPATH": f"{wd}/code"})
    target.run(wrapper.tmux_new_session_argv(session, wd, cmd), timeout=10, check=True)
    return rec


def worker_pid(target: Target, rec: RunRecord, timeout: float = 10.0) -> int:
    """The worker's pid (the wrapper writes it; same machine, so we can signal it)."""
    path = Path(target.workdir) / rec.run_dir / names.PID

    def read() -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    return int(wait_until(read, timeout, what=f"pid file of {rec.key}"))


def kill_session(target: Target, rec: RunRecord) -> None:
    target.run(["tmux", "kill-session", "-t", wrapper.tmux_exact(rec.session)], timeout=10)


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def orch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def quote(argv: list[str]) -> str:
    return shlex.join(argv)


__all__ = ["Webhook", "kill_session", "prepare_target", "signal", "signal_pid", "start_run",
           "wait_until", "worker_pid", "write_project"]
