"""Ask Slurm about batch jobs, on the login node (the poll agent calls this in its round trip).

One `squeue --states=all` for every job of a poll: it lists jobs that are pending or running,
and jobs that ended less than `MinJobAge` ago with their final state. A job id it does not list
left Slurm's memory (`known=False`); a failing squeue (controller down, no Slurm here) is an
`error`, which tells nothing about the job. `squeue` and the environment it needs
(`SLURM_CONF` where the cluster's config is not in /etc/slurm) come from the agent's own
environment, which the target sets.

Array jobs (`sbatch --array`, one task per seed of a study): a task is `<array job>_<task>`
(`12_1`), the id `squeue -r` lists it under (ArrayJobID, ArrayTaskID) and `scancel 12_1`
cancels. Before its tasks start Slurm keeps a pending array as one record (`12_[0-2]` in
`squeue`'s `%i`, ArrayTaskID `0-2`), which is read as one job per task. Measured on Slurm
22.05: `sbatch --parsable --array=0-2` prints the array job id (`12`); once scheduled, each
task gets a JobID of its own (the last task keeps `12`), so JobID alone never names a task;
a pending task cancelled with `scancel 12_1` leaves squeue at once (no CANCELLED row);
`squeue --jobs` with one id Slurm forgot fails ("Invalid job id specified"), with several ids
it omits the forgotten ones (exit 0, even when none is known).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping

from state.models import SlurmJob

#: `squeue -O` fields, `|`-separated and never truncated (the `:|` suffix).
SQUEUE_FIELDS = (
    "JobID",
    "State",
    "Reason",
    "exit_code",
    "restartcnt",
    "Dependency",
    "ArrayJobID",
    "ArrayTaskID",
    "Comment",  # last: the only free text, it may hold a `|`
)
#: The first fields: an older reading without the graph's and the arrays' fields is still read.
_REQUIRED_FIELDS = 5
_ARRAY_LAYOUT = len(SQUEUE_FIELDS) + 1  # `|`-split parts of a full line (the trailing `|`)
#: How orch's job comment names the upstream runs of a graph (`--comment`).
AFTER_PREFIX = "orch-after"
_JOB_ID_RE = re.compile(r"^[0-9]+(_[0-9]+)?$")
MAX_JOBS = 500
#: What squeue says (and exits 1) when the one id it was asked about is not known any more.
INVALID_JOB_ID = "Invalid job id specified"
#: Most tasks one collapsed pending array record is read into (a sanity bound, not Slurm's).
MAX_ARRAY_TASKS = 10_000

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
    """One squeue for every job of a poll; `--array`: one line per array task, pending ones too."""
    fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
    ids = ",".join(job_ids)
    return ["squeue", "--noheader", "--states=all", "--jobs", ids, "--array", "-O", fmt]


def task_job_id(array_job_id: str, task: int) -> str:
    """The id of one array task: `12`, 1 -> `12_1` (what scancel and squeue --jobs take)."""
    return check_job_id(f"{check_job_id(array_job_id)}_{int(task)}")


def split_job_id(job_id: str) -> tuple[str, int | None]:
    """`12_1` -> ("12", 1); `12` -> ("12", None) (ValueError for anything else)."""
    base, _, task = check_job_id(job_id).partition("_")
    return base, int(task) if task else None


def array_spec(indices: list[int]) -> str:
    """`--array=` of some task indices, in runs: [0, 1, 2] -> `0-2`, [0, 2, 3] -> `0,2-3`."""
    nums = sorted(set(int(i) for i in indices))
    if not nums or nums[0] < 0:
        raise ValueError(f"array task indices must be >= 0 and at least one: {indices!r}")
    runs: list[list[int]] = []
    for n in nums:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def group_tasks(upstreams: Mapping[int, Iterable[str]]) -> list[tuple[tuple[str, ...], list[int]]]:
    """Task indices of one stage grouped by the upstream array jobs they wait on: one array
    job per group. Slurm cancels a task whose `aftercorr` upstream array has no task of its
    index (measured), so only tasks that wait on the same arrays may share one; on a fresh
    study that is every task, a single group. `{index: upstream array job ids}` ->
    `[(array job ids, indices)]`, in the order of the first index of each group."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i in sorted(upstreams):
        key = tuple(sorted(set(check_job_id(j) for j in upstreams[i]), key=int))
        groups.setdefault(key, []).append(int(i))
    return list(groups.items())


_RANGE_RE = re.compile(r"^([0-9]+)(?:-([0-9]+)(?::([0-9]+))?)?$")


def parse_array_tasks(text: str) -> list[int] | None:
    """The task indices of squeue's ArrayTaskID (`3`, `0-2`, `0,2-4`, `[0-6:2]%2`, as a
    collapsed pending array shows them), or None when it is no array task (`N/A`) or
    cannot be read."""
    t = text.strip()
    if t.startswith("["):
        t = t[1:].split("]", 1)[0]
    t = t.split("%", 1)[0]  # `%N`: at most N tasks at once
    if not t:
        return None
    out: list[int] = []
    for part in t.split(","):
        m = _RANGE_RE.match(part.strip())
        if not m:
            return None
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi < lo or step < 1 or len(out) + (hi - lo) // step >= MAX_ARRAY_TASKS:
            return None
        out += range(lo, hi + 1, step)
    return out


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
    """squeue lines -> jobs by id (lines it cannot read are skipped). An array task is keyed
    `<ArrayJobID>_<ArrayTaskID>`; a collapsed pending record (`0-2`) gives one job per task."""
    jobs: dict[str, SlurmJob] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < _REQUIRED_FIELDS:
            continue
        jid, state, reason, code, restarts = (p.strip() for p in parts[:_REQUIRED_FIELDS])
        dep = parts[5].strip() if len(parts) > 5 else ""
        ids = [jid]
        rest = 6
        if len(parts) >= _ARRAY_LAYOUT and parts[6].strip().isdigit():
            rest = 8
            tasks = parse_array_tasks(parts[7])
            if tasks is not None:
                ids = [f"{parts[6].strip()}_{t}" for t in tasks]
        comment = "|".join(parts[rest:]).strip().rstrip("|").strip() if len(parts) > rest else ""
        if not _JOB_ID_RE.match(jid):
            continue
        state = state.split()[0].upper() if state else ""  # "CANCELLED by 0" on some versions
        for key in ids:
            jobs[key] = SlurmJob(
                job_id=key,
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
        if INVALID_JOB_ID in res.stderr:  # the id asked about left Slurm's memory
            return {j: SlurmJob(job_id=j, known=False) for j in ids}
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


_DEP_RE = re.compile(r"after\w*:([0-9]+(?:_(?:[0-9]+|\*))?)(?:\(([a-z]+)\))?")


def failed_upstream(job: SlurmJob) -> list[str]:
    """The upstream runs (keys, else `Slurm job ID`) whose failure left `job`'s dependency
    never satisfied, from its `Dependency` field and orch's comment. An array task's
    `aftercorr:11_*(failed)` names the upstream task of the same index (`11_<its task>`)."""
    named = parse_after(job.comment)
    _, task = split_job_id(job.job_id) if _JOB_ID_RE.match(job.job_id) else ("", None)
    if task is not None:  # an array task: only the upstream tasks of its own index
        named = {j: k for j, k in named.items() if split_job_id(j)[1] in (task, None)}

    def own(jid: str) -> str:
        return jid[:-1] + str(task) if jid.endswith("_*") and task is not None else jid

    bad = [own(m.group(1)) for m in _DEP_RE.finditer(job.dependency) if m.group(2) == "failed"]
    bad = bad or list(named)  # the field was cleared: every upstream is a suspect
    return [f"{named[j]} (Slurm job {j})" if j in named else f"Slurm job {j}" for j in bad]
