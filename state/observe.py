"""Gather one `TargetObservation` on the box: what the monitor needs, in one local pass.

Runs on the target (through `python -m state.agent`, or directly for the local target). It only
reads: status files, markers, exit codes, the tmux session list, pid liveness, free disk and,
where `nvidia-smi` exists, GPU stats (cached for a few seconds: it costs tens of ms).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections import deque
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from state import names
from state.models import (
    GpuStat,
    RunFailed,
    RunObservation,
    RunStatus,
    SlurmJob,
    TargetObservation,
)
from state.protocol import (
    MAX_STATUS_BYTES,
    TooBig,
    parse_events,
    read_bounded,
    read_exit_code,
    read_model,
    read_small_int,
)
from state.slurm import query_jobs


class RunQuery(BaseModel):
    """One run to observe: its dir relative to the workdir and its tmux session."""

    model_config = ConfigDict(extra="ignore")
    run_dir: str
    session: str | None = None
    events_tail: int = 0
    #: a Slurm job id: its state comes from squeue, and no pid or tmux check is made here
    #: (the job runs on a compute node, not on this login node)
    job_id: str | None = None


class ObserveRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    runs: list[RunQuery] = Field(default_factory=list)
    gpus: bool = True


def tmux_sessions() -> set[str] | None:
    """Names of live tmux sessions; None if tmux is not installed; empty if no server."""
    if shutil.which("tmux") is None:
        return None
    try:
        out = subprocess.run(
            ["tmux", "list-sessions", "-F", "#{session_name}"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return set()  # "no server running": no sessions at all
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


_gpu_cache: tuple[float, list[GpuStat]] = (0.0, [])


def gpu_stats(max_age_s: float = 5.0) -> list[GpuStat]:
    """GPU name/utilisation/memory from nvidia-smi, cached for `max_age_s`."""
    global _gpu_cache
    now = time.monotonic()
    if now - _gpu_cache[0] < max_age_s:
        return _gpu_cache[1]
    stats: list[GpuStat] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=index,name,utilization.gpu,memory.used,memory.total",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            for line in out.stdout.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 5:
                    stats.append(
                        GpuStat(
                            index=int(parts[0]),
                            name=parts[1],
                            util_pct=_num(parts[2]),
                            mem_used_mb=_num(parts[3]),
                            mem_total_mb=_num(parts[4]),
                        )
                    )
        except (OSError, subprocess.TimeoutExpired, ValueError):
            stats = []
    _gpu_cache = (now, stats)
    return stats


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _tail_lines(path: Path, n: int, max_bytes: int = 65536) -> list[str]:
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return []  # a FIFO or device would block or stream forever
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return list(deque(data.splitlines(), maxlen=n))


def first_leak_step(run_dir: Path) -> int | None:
    """The first step the leakage probe flagged, from a training run's summary.json (written
    when training ends); None while there is none or it names no step."""
    try:
        step = json.loads(read_bounded(run_dir / names.SUMMARY, MAX_STATUS_BYTES)).get(
            "first_leak_step"
        )
    except (OSError, TooBig, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def observe_run(
    workdir: Path,
    q: RunQuery,
    sessions: set[str] | None,
    slurm_jobs: dict[str, SlurmJob] | None = None,
) -> RunObservation:
    rd = workdir / q.run_dir
    # Capped: a runaway or hostile status file is "unreadable", never read or sent whole.
    st = read_model(rd / names.STATUS, RunStatus, max_bytes=MAX_STATUS_BYTES)
    failed = read_model(rd / names.RUN_FAILED, RunFailed, max_bytes=MAX_STATUS_BYTES)
    obs = RunObservation(
        run_dir=q.run_dir,
        status=st.value,
        status_state=st.state,
        complete=(rd / names.RUN_COMPLETE).exists(),
        failed=failed.value,
        failed_marker=(rd / names.RUN_FAILED).exists(),
        manifest_present=(rd / names.MANIFEST).exists(),
        exit_code=read_exit_code(rd),
    )
    if q.job_id:
        obs.slurm = (slurm_jobs or {}).get(q.job_id) or SlurmJob(job_id=q.job_id, error="not asked")
        if q.events_tail:
            obs.last_events = list(parse_events(_tail_lines(rd / names.EVENTS, q.events_tail)))
        return obs
    if q.session and sessions is not None:
        obs.session_alive = q.session in sessions
    pid = read_small_int(rd / names.PID)
    if pid is None and st.value is not None:
        pid = st.value.pid
    if pid is not None and 0 < pid < 2**31:  # 0 and -1 would name a process group, not a run
        obs.pid_alive = pid_alive(pid)
    if obs.status is not None and obs.status.leak_flag and obs.status.first_leak_step is None:
        obs.status.first_leak_step = first_leak_step(rd)
    if q.events_tail:
        obs.last_events = list(parse_events(_tail_lines(rd / names.EVENTS, q.events_tail)))
    return obs


def observe(workdir: str | os.PathLike[str], request: ObserveRequest) -> TargetObservation:
    """Observe every requested run under `workdir` plus the box (disk, GPUs)."""
    wd = Path(workdir)
    sessions = tmux_sessions() if any(q.session and not q.job_id for q in request.runs) else None
    job_ids = [q.job_id for q in request.runs if q.job_id]
    slurm_jobs = query_jobs(job_ids) if job_ids else None
    disk = None
    with contextlib.suppress(OSError):
        disk = shutil.disk_usage(wd if wd.exists() else wd.parent).free
    return TargetObservation(
        disk_free_bytes=disk,
        gpus=gpu_stats() if request.gpus else [],
        runs=[observe_run(wd, q, sessions, slurm_jobs) for q in request.runs],
    )
