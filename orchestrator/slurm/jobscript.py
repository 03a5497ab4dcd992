"""The sbatch job of one run: its options from the stage spec and the target, and the job
script that runs the same wrapper as a tmux launch (so the run-dir protocol is unchanged).
Pure: builds lists and text, no I/O.

    sbatch_argv(cfg, spec, job_name=..., run_dir_abs=..., code_dir=..., script=...)
    job_script(run_dir_abs, wrapper_command_line)
    agents_argv(python, run_dir_abs, nproc_per_node=G)   # nodes > 1: srun, one torchrun a task
    array_job_script({0: ArrayTask(seed=0, run_dir_abs=..., command=...), 1: ...})

An array job (`--array=0-2`, one task per seed of a study) runs one script for every task:
`SLURM_ARRAY_TASK_ID` picks the task's run dir and its wrapper command (whose spec.json holds
the seed), so each task keeps the run-dir protocol of a single run.

The options go on sbatch's command line as list items (quoted by the target), never into
`#SBATCH` lines, so no value is ever parsed by a shell or by Slurm's script scanner. Slurm's
own output (its "CANCELLED ... DUE TO TIME LIMIT" lines) is appended to the run's stdout.log,
which `orch logs` reads.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.wrapper import Expanded
from state import names
from state.slurm import after_comment, split_job_id

if TYPE_CHECKING:
    from orchestrator.config import SlurmTarget as SlurmConfig
    from state.models import RunSpec

#: The job script's own name in the run dir.
JOB_SCRIPT = "job.sh"


def time_limit_minutes(timeout_s: float, margin_s: float = 0.0) -> int:
    """`--time` in whole minutes (Slurm's unit): the stage timeout plus a margin, at least 1."""
    return max(1, math.ceil((float(timeout_s) + float(margin_s)) / 60.0))


def gres_option(gpus: int, gpu_type: str | None) -> str | None:
    if gpus <= 0:
        return None
    return f"--gres=gpu:{gpu_type}:{gpus}" if gpu_type else f"--gres=gpu:{gpus}"


def sbatch_options(
    cfg: SlurmConfig,
    spec: RunSpec,
    *,
    job_name: str,
    run_dir_abs: str,
    code_dir: str,
    after: Mapping[str, str] | None = None,
    array: str | None = None,
) -> list[str]:
    """Every sbatch option of a run, as `--name=value` items. `after`: `{job_id: run key}` of
    the upstream runs of the study's graph: the job starts once they all succeeded
    (`afterok`), Slurm cancels it if one does not (`--kill-on-invalid-dep=yes`), and the job's
    comment names them so the monitor can say which one failed.

    `array` (`0-2`): an array job, one task per seed; `run_dir_abs` then holds `%a` (the task
    index) so each task's Slurm output lands in its own run dir. Its `after` are upstream
    array tasks (`11_0`, `11_1`, ...): task i waits on task i of each upstream array only
    (`aftercorr:11`), and only task i is cancelled when that one fails."""
    names.check_name(job_name, "Slurm job name")
    gpus = max(int(spec.resources.gpus), 0)
    layout = (
        [f"--nodes={int(spec.nodes)}", f"--ntasks-per-node={int(spec.tasks_per_node)}"]
        if task_count(spec) > 1
        else ["--nodes=1", "--ntasks=1"]
    )
    opts = [
        f"--job-name={job_name}",
        f"--output={run_dir_abs}/{names.STDOUT}",
        "--open-mode=append",
        f"--chdir={code_dir}",
        *layout,
        f"--time={time_limit_minutes(spec.timeout_s, cfg.time_margin_s)}",
        "--requeue" if cfg.requeue else "--no-requeue",
    ]
    for key, value in (("partition", cfg.partition), ("account", cfg.account), ("qos", cfg.qos)):
        if value:
            opts.append(f"--{key}={value}")
    if cfg.cpus_per_task:
        opts.append(f"--cpus-per-task={cfg.cpus_per_task}")
    if cfg.mem:
        opts.append(f"--mem={cfg.mem}")
    gres = gres_option(gpus, cfg.gpu_type)
    if gres:
        opts.append(gres)
    if cfg.signal_before_s > 0:
        # `B:`: to the batch shell (the job script), which notes it; without it Slurm signals
        # only job steps, and a batch job that runs no srun has none.
        opts.append(f"--signal=B:USR1@{cfg.signal_before_s}")
    if array:
        opts.append(f"--array={array}")
    if after:
        opts += [
            dependency_option(list(after)),
            "--kill-on-invalid-dep=yes",
            f"--comment={after_comment(dict(after))}",
        ]
    opts += list(cfg.sbatch_args)
    return opts


def task_count(spec: RunSpec) -> int:
    """Slurm tasks of the run's job, one torchrun agent each; 1 is the single-node path."""
    return max(int(spec.nodes), 1) * max(int(spec.tasks_per_node), 1)


#: The rendezvous port is `RDZV_PORT_BASE + job id % RDZV_PORT_SPAN`: the same for every agent
#: of a job without any of them asking, different for jobs submitted close together (a node
#: may host the head of several jobs), and below Linux's ephemeral range (32768-60999), so no
#: outgoing connection holds it by chance. Two jobs whose ids differ by a multiple of the span
#: heading on one node at once would collide: that job's rendezvous fails at its start, loudly.
RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000

#: torchrun's own signal handling: these end the agent and, through it, the ranks (its
#: default, pinned so that a newer default cannot change it). SIGUSR1 is kept OUT: torchrun
#: treats every signal in this list as a death signal (it forwards it, then SIGKILLs the ranks
#: after `--shutdown-timeout` and exits non-zero), while Slurm's USR1 must make the ranks
#: checkpoint and train on. The agents ignore USR1 instead (`_AGENT`) and Slurm delivers it
#: to every process of the step, ranks included, on every node.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"

#: Each task starts its agent with USR1 ignored (the ranks inherit it until the worker's
#: handler is in place, as on the single-node path).
_AGENT = ["sh", "-c", 'trap "" USR1; exec "$@"', "orch-agent"]


def agents_argv(
    python: str, run_dir_abs: str, *, nproc_per_node: int, cpus_per_task: int | None = None
) -> list[str]:
    """The worker command of a multi-task job: `srun` starts one torchrun agent per task (on
    every node of the allocation) and they meet at a c10d rendezvous on the allocation's first
    node; the `Expanded` items name the job script's variables (`_RENDEZVOUS`) and Slurm's,
    expanded by the job script on that node. `--kill-on-bad-exit=1`: one agent failing ends
    them all (the others would wait at the rendezvous or in a collective until the limit)."""
    srun = ["srun", "--kill-on-bad-exit=1"]
    if cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task.
        srun.append(f"--cpus-per-task={int(cpus_per_task)}")
    return [
        *srun,
        *_AGENT,
        python, "-m", "torch.distributed.run",
        Expanded("--nnodes=$SLURM_NTASKS"),
        f"--nproc_per_node={int(nproc_per_node)}",
        "--rdzv_backend=c10d",
        Expanded("--rdzv_endpoint=$rdzv_head:$rdzv_port"),
        Expanded("--rdzv_id=$SLURM_JOB_ID"),
        f"--signals-to-handle={SIGNALS_TO_HANDLE}",
        "-m", "worker", "run", "--run-dir", run_dir_abs,
    ]  # fmt: skip


def dependency_option(job_ids: list[str]) -> str:
    """`--dependency=afterok:11:12` on whole jobs; on array tasks (`11_0`, `11_1`, `12_0`)
    `--dependency=aftercorr:11:12`: each task after the same-index task of those arrays."""
    split = [split_job_id(j) for j in job_ids]
    if all(task is None for _, task in split):
        return "--dependency=afterok:" + ":".join(job_ids)
    if any(task is None for _, task in split):
        raise ValueError(f"an array job waits on array tasks only, not on {job_ids!r}")
    return "--dependency=aftercorr:" + ":".join(dict.fromkeys(base for base, _ in split))


def sbatch_argv(options: list[str], script_path: str) -> list[str]:
    """`sbatch --parsable OPTIONS... SCRIPT`: prints `JOBID` (or `JOBID;CLUSTER`)."""
    return ["sbatch", "--parsable", *options, script_path]


def parse_job_id(stdout: str) -> str | None:
    """The job id `sbatch --parsable` printed (`123` or `123;cluster`), or None."""
    for line in stdout.splitlines():
        jid = line.strip().split(";", 1)[0]
        if jid.isdigit():
            return jid
    return None


# The batch shell: clears what an earlier attempt of a requeued job left (so a rerun is judged
# by its own exit code), forwards Slurm's early-warning USR1 to the worker, and waits for the
# wrapper through signals (a trapped signal interrupts `wait`; the wrapper itself handles TERM
# from scancel or the time limit and writes exit_code), then exits with the wrapper's code.
# The wrapper starts with USR1 ignored (an ignored signal stays ignored across exec), so a
# warning that comes before the worker's handler is there never kills anything: the
# `.checkpoint_request` file left first tells the worker at its start instead. On USR1 the
# worker saves a step checkpoint at its next step boundary and trains on (worker/train.py).
_BODY = """\
{run_dir}
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then
    rm -f -- "$run_dir/{exit_code}" "$run_dir/{pid}" "$run_dir/{run_failed}" "$run_dir/{request}"
    echo "orch: Slurm job $SLURM_JOB_ID restarted (restart $SLURM_RESTART_COUNT)"
fi
echo "orch: Slurm job $SLURM_JOB_ID on $(hostname) (${{SLURM_JOB_PARTITION:-?}})"
{rendezvous}sig=""
usr1=""
trap '' USR1
{start}
w=$!
trap 'sig=1; usr1=1' USR1
trap 'sig=1' TERM
while :; do
    wait "$w"
    rc=$?
    if [ -n "$usr1" ]; then
        usr1=""
        echo "orch: Slurm says the time limit is near (USR1): asking the worker for a checkpoint"
        : >"$run_dir/{request}"
        p=$(cat "$run_dir/{pid}" 2>/dev/null)
        case "$p" in
            ''|*[!0-9]*) ;;
            *) kill -USR1 "$p" 2>/dev/null{children} ;;
        esac
    fi
    if [ -n "$sig" ]; then
        sig=""
        if kill -0 "$w" 2>/dev/null; then
            continue
        fi
    fi
    break
done
exit "$rc"
"""

#: Under torchrun the pid file names torchrun (which ignores USR1): its children are the ranks.
_CHILDREN = '; pkill -USR1 -P "$p" 2>/dev/null'

# A multi-task job (`agents_argv`): where its torchrun agents meet, read from Slurm's
# environment by the batch shell, which runs on the allocation's first node (hence the
# `hostname` fallback when scontrol is not on the compute nodes). The pid file then names
# srun, which forwards the USR1 to every process of its step, on every node.
_RENDEZVOUS = """\
rdzv_head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
rdzv_head=${{rdzv_head:-$(hostname)}}
rdzv_port=$(({base} + SLURM_JOB_ID % {span}))
echo "orch: rendezvous c10d at $rdzv_head:$rdzv_port (id $SLURM_JOB_ID):\
 $SLURM_NTASKS torchrun agent(s) on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)"
"""


def job_script(
    run_dir_abs: str, command: str, *, submit_line: str = "", nproc: int = 1, tasks: int = 1
) -> str:
    """The job script: `command` is the wrapper's one shell-command line (`wrapper_command`);
    `nproc > 1`: the worker runs under torchrun, whose children get the USR1; `tasks > 1`:
    under `srun` (`agents_argv`), after the script found the rendezvous."""
    head = "#!/bin/sh\n# orch: the batch job of one run (docs/slurm.md); submitted as\n"
    head += "".join(f"#   {line}\n" for line in (submit_line or "sbatch job.sh").splitlines())
    return head + _body(f"run_dir={shlex.quote(run_dir_abs)}", f"{command} &", nproc, tasks)


def _body(run_dir: str, start: str, nproc: int, tasks: int = 1) -> str:
    return _BODY.format(
        run_dir=run_dir,
        exit_code=names.EXIT_CODE,
        pid=names.PID,
        run_failed=names.RUN_FAILED,
        request=names.CHECKPOINT_REQUEST,
        start=start,
        rendezvous=_RENDEZVOUS.format(base=RDZV_PORT_BASE, span=RDZV_PORT_SPAN)
        if tasks > 1
        else "",
        children=_CHILDREN if nproc > 1 and tasks <= 1 else "",
    )


@dataclass(frozen=True)
class ArrayTask:
    """One task of an array job: the seed it runs, its run dir, its wrapper command line."""

    seed: int | None
    run_dir_abs: str
    command: str


def array_job_script(
    tasks: Mapping[int, ArrayTask], *, submit_line: str = "", nproc: int = 1, agents: int = 1
) -> str:
    """The job script of an array job: `SLURM_ARRAY_TASK_ID` picks the task's run dir (and
    says which seed it is), then starts that task's wrapper; an index it does not know exits 2
    before anything runs."""
    if not tasks:
        raise ValueError("an array job needs at least one task")
    head = "#!/bin/sh\n# orch: the array job of one stage, one task per seed (docs/slurm.md);"
    head += " submitted as\n"
    head += "".join(f"#   {line}\n" for line in (submit_line or "sbatch job.sh").splitlines())
    pick = ['case "${SLURM_ARRAY_TASK_ID:-}" in']
    start = ['case "$SLURM_ARRAY_TASK_ID" in']
    for i in sorted(tasks):
        t = tasks[i]
        seed = "" if t.seed is None else f" (seed {int(t.seed)})"
        note = shlex.quote(f"orch: array task {int(i)}{seed}: {t.run_dir_abs}")
        pick.append(f"    {int(i)}) run_dir={shlex.quote(t.run_dir_abs)}; echo {note} ;;")
        start.append(f"    {int(i)}) {t.command} & ;;")
    pick.append(
        '    *) echo "orch: array task ${SLURM_ARRAY_TASK_ID:-?} is not one of this job\'s" >&2;'
        " exit 2 ;;"
    )
    pick.append("esac")
    start.append("esac")
    return head + _body("\n".join(pick), "\n".join(start), nproc, agents)
