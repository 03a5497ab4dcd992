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
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator import wrapper
from orchestrator.context import Context
from orchestrator.targets.base import Target
from state import names
from state.models import RunRecord
from state.phases import Phase
from tests.webhook import Webhook

REPO = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = REPO / "tests" / "monitor_worker.py"


def write_project(
    root: Path,
    target_toml: str,
    *,
    hook_url: str,
    monitor: dict[str, Any],
    target: str = "box",
    extra: str = "",
) -> Path:
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


def wait_until(
    pred: Callable[[], object], timeout: float = 30.0, every: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(every)


def prepare_target(target: Target, *, sync: bool = True) -> None:
    """Code and the worker-like script on the target, as `orch launch` would have them
    (`sync=False`: the box is this machine, so its code dir may just link to this checkout)."""
    from orchestrator.codesync import sync_code

    if sync:
        sync_code(target, REPO)
    else:
        target.run(["mkdir", "-p", target.workdir], timeout=10, check=True)
        target.run(["ln", "-sfn", str(REPO), f"{target.workdir}/code"], timeout=10, check=True)
    target.put_bytes(
        wrapper.wrapper_script(), wrapper.wrapper_remote_path(target.workdir), mode=0o755
    )
    target.put_bytes(
        WORKER_SCRIPT.read_bytes(), f"{target.workdir}/bin/monitor_worker.py", mode=0o644
    )


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
    every: float | None = None,
) -> RunRecord:
    """Record a run (phase running, as `orch launch` leaves it) and start the worker-like process
    under tmux through the launcher's wrapper, which writes pid and exit_code."""
    _counter[0] += 1
    run_id = (
        datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 1000}{_counter[0]}"
    )
    stage_dir = f"{stage}_dir"
    run_dir = f"{names.RUNS_DIR}/{stage_dir}/{run_id}"
    session = names.session_name(stage, run_id)
    now = datetime.now(timezone.utc)
    spec = {
        "timeout_s": timeout_s,
        "stale_after_s": stale_after_s,
        "run_id": run_id,
        "stage": stage,
    }
    rec = RunRecord(
        run_id=run_id,
        stage=stage,
        stage_dir=stage_dir,
        target=target.name,
        phase=Phase.RUNNING,
        session=session,
        run_dir=run_dir,
        created_at=now,
        updated_at=now,
        spec_json=json.dumps(spec),
    )
    ctx.store.insert_run(rec)
    wd = target.workdir
    rd_abs = f"{wd}/{run_dir}"
    target.run(["mkdir", "-p", rd_abs], timeout=10, check=True)
    argv = [
        getattr(target, "python", sys.executable),
        f"{wd}/bin/monitor_worker.py",
        rd_abs,
        "--outcome",
        outcome,
        "--seconds",
        str(seconds),
        *(["--every", str(every)] if every is not None else []),
    ]
    cmd = wrapper.wrapper_command(
        wrapper_path=wrapper.wrapper_remote_path(wd),
        run_dir_abs=rd_abs,
        argv=argv,
        env={"PYTHONPATH": f"{wd}/code"},
    )
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


__all__ = [
    "Webhook",
    "kill_session",
    "prepare_target",
    "signal",
    "signal_pid",
    "start_run",
    "wait_until",
    "worker_pid",
    "write_project",
]
