"""Ask Slurm about batch jobs, on the login node (the poll agent calls this in its round trip).

One `squeue --states=all` for every job of a poll: it lists jobs that are pending or running,
and jobs that ended less than `MinJobAge` ago with their final state. A job id it does not list
left Slurm's memory (`known=False`); a failing squeue (controller down, no Slurm here) is an
`error`, which tells nothing about the job. `squeue` and the environment it needs
(`SLURM_CONF` where the cluster's config is not in /etc/slurm) come from the agent's own
environment, which the target sets.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from state.models import SlurmJob

#: `squeue -O` fields, `|`-separated and never truncated (the `:|` suffix).
SQUEUE_FIELDS = ("JobID", "State", "Reason", "exit_code", "restartcnt", "Dependency", "Comment")
#: The first fields: an older reading without the graph's two is still understood.
_REQUIRED_FIELDS = 5
#: How orch's job comment names the upstream runs of a graph (`--comment`).
AFTER_PREFIX = "orch-after"
_JOB_ID_RE = re.compile(r"^[0-9]+(_[0-9]+)?$")
MAX_JOBS = 500

#: Job states and what the monitor makes of them (orchestrator/monitor/statemachine.py).
SLURM_WAITING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
SLURM_ACTIVE = frozenset(
    {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
)
SLURM_LOST = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"})
SLURM_TIMED_OUT = frozenset({"TIMEOUT", "DEADLINE"})


def check_job_id(job_id: str) -> str:
    """A Slurm job id (`123`, or `123_4` for an array task); ValueError otherwise."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
        raise ValueError(f"not a Slurm job id: {job_id!r}")
    return job_id


def squeue_argv(job_ids: list[str]) -> list[str]:
    fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
    return ["squeue", "--noheader", "--states=all", "--jobs", ",".join(job_ids), "-O", fmt]


def wait_status_exit(raw: str) -> int | None:
    """squeue's `exit_code` (a wait status: 768 is exit 3, 15 is SIGTERM) as a shell-style code."""
    try:
        status = int(raw)
    except ValueError:
        return None
    if status < 0:
        return None
    sig = status & 0x7F
    return 128 + sig if sig else (status >> 8) & 0xFF


def parse_squeue(out: str) -> dict[str, SlurmJob]:
    """squeue lines -> jobs by id (lines it cannot read are skipped)."""
    jobs: dict[str, SlurmJob] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < _REQUIRED_FIELDS:
            continue
        jid, state, reason, code, restarts = (p.strip() for p in parts[:_REQUIRED_FIELDS])
        dep = parts[5].strip() if len(parts) > 5 else ""
        comment = "|".join(parts[6:]).strip().rstrip("|").strip() if len(parts) > 6 else ""
        if not _JOB_ID_RE.match(jid):
            continue
        state = state.split()[0].upper() if state else ""  # "CANCELLED by 0" on some versions
        jobs[jid] = SlurmJob(
            job_id=jid,
            state=state,
            reason="" if reason in ("None", "(null)") else reason,
            exit_code=wait_status_exit(code),
            restarts=int(restarts) if restarts.isdigit() else 0,
            dependency="" if dep == "(null)" else dep,
            comment="" if comment == "(null)" else comment,
        )
    return jobs


def query_jobs(job_ids: list[str], timeout: float = 10.0) -> dict[str, SlurmJob]:
    """What Slurm says about each job id (every id gets an answer: known, gone, or error)."""
    ids = [check_job_id(j) for j in dict.fromkeys(job_ids)][:MAX_JOBS]
    if not ids:
        return {}

    def every(error: str) -> dict[str, SlurmJob]:
        return {j: SlurmJob(job_id=j, error=error) for j in ids}

    if shutil.which("squeue") is None:
        return every("squeue is not on PATH on the login node")
    try:
        res = subprocess.run(
            squeue_argv(ids), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return every(f"squeue did not answer within {timeout:g} s")
    except OSError as exc:
        return every(f"squeue: {exc}")
    if res.returncode != 0:
        why = " ".join(res.stderr.split())[-300:] or f"exit {res.returncode}"
        return every(f"squeue failed: {why}")
    seen = parse_squeue(res.stdout)
    return {j: seen.get(j) or SlurmJob(job_id=j, known=False) for j in ids}


def after_comment(upstream: dict[str, str]) -> str:
    """The job comment naming a graph job's upstream runs: `{job_id: run key}` ->
    `orch-after 11=stage3_finetune_prefill_bidir/20260101-120000 ...`."""
    return " ".join([AFTER_PREFIX, *(f"{check_job_id(j)}={k}" for j, k in upstream.items())])


def parse_after(comment: str) -> dict[str, str]:
    """`after_comment`'s `{job_id: run key}` back (empty for any other comment)."""
    words = comment.split()
    if not words or words[0] != AFTER_PREFIX:
        return {}
    out: dict[str, str] = {}
    for w in words[1:]:
        jid, _, key = w.partition("=")
        if _JOB_ID_RE.match(jid) and key:
            out[jid] = key
    return out


_DEP_RE = re.compile(r"after\w*:([0-9_]+)(?:\(([a-z]+)\))?")


def failed_upstream(job: SlurmJob) -> list[str]:
    """The upstream runs (keys, else `Slurm job ID`) whose failure left `job`'s dependency
    never satisfied, from its `Dependency` field and orch's comment."""
    named = parse_after(job.comment)
    bad = [m.group(1) for m in _DEP_RE.finditer(job.dependency) if m.group(2) == "failed"]
    bad = bad or list(named)  # the field was cleared: every upstream is a suspect
    return [f"{named[j]} (Slurm job {j})" if j in named else f"Slurm job {j}" for j in bad]
