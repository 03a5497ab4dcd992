"""Submit, ask about and cancel a run's Slurm job, through the login node (a `slurm` target).

    job_id = submit_run(target, cfg, spec, rec, python=..., nproc=..., wrapper_path=...)
    array_id = submit_array(target, cfg, {0: (spec0, rec0), 1: (spec1, rec1)}, ...)  # `12`
    cancel_job(target, job_id)
    job = job_state(target, job_id)      # a SlurmJob (the same reading the poll agent makes)

Every command is a list (the target quotes it); the job script is written into the run dir
first (`job.sh`), so what ran can be read and resubmitted by hand.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import TYPE_CHECKING

from orchestrator import wrapper
from orchestrator.slurm import jobscript
from orchestrator.sshcmd import quote_argv
from state import names
from state.errors import LaunchError
from state.models import SlurmJob
from state.slurm import INVALID_JOB_ID, array_spec, check_job_id, parse_squeue, squeue_argv

if TYPE_CHECKING:
    from orchestrator.config import SlurmTarget as SlurmConfig
    from orchestrator.targets.base import Target
    from state.models import RunRecord, RunSpec

QUICK_TIMEOUT_S = 30.0


def submit_run(
    target: Target,
    cfg: SlurmConfig,
    spec: RunSpec,
    rec: RunRecord,
    *,
    python: str,
    nproc: int,
    wrapper_path: str,
    after: Mapping[str, str] | None = None,
) -> str:
    """Write the run's job script and `sbatch` it; the job id (LaunchError with sbatch's
    words when Slurm refuses the job, e.g. more GPUs than any node has)."""
    code_dir = posixpath.join(target.workdir, names.CODE_DIR)
    run_dir_abs = posixpath.join(target.workdir, rec.run_dir)
    command = _run_command(cfg, spec, code_dir, run_dir_abs, python, nproc, wrapper_path)
    script_path = f"{run_dir_abs}/{jobscript.JOB_SCRIPT}"
    options = jobscript.sbatch_options(
        cfg, spec, job_name=rec.session, run_dir_abs=run_dir_abs, code_dir=code_dir, after=after
    )
    argv = jobscript.sbatch_argv(options, script_path)
    text = jobscript.job_script(
        run_dir_abs,
        command,
        submit_line=quote_argv(argv),
        nproc=nproc,
        tasks=jobscript.task_count(spec),
    )
    target.put_bytes(text.encode(), script_path, mode=0o755)
    return _sbatch(target, argv, f"the job of {rec.key}")


def submit_array(
    target: Target,
    cfg: SlurmConfig,
    tasks: Mapping[int, tuple[RunSpec, RunRecord]],
    *,
    job_name: str,
    output_dir_abs: str,
    python: str,
    nproc: int,
    wrapper_path: str,
    after: Mapping[str, str] | None = None,
) -> str:
    """One `sbatch --array=INDICES` for the runs of one stage, one task per seed: each task
    index i runs `tasks[i]`'s run (its own run dir, spec and wrapper command). The run dirs
    must be `output_dir_abs` with the index in place of `%a` (Slurm's output goes there).
    `after`: `{upstream task id: run key}` (`aftercorr`). The array job id; LaunchError
    with sbatch's words when Slurm refuses it."""
    code_dir = posixpath.join(target.workdir, names.CODE_DIR)
    scripted: dict[int, jobscript.ArrayTask] = {}
    for i, (spec, rec) in tasks.items():
        run_dir_abs = posixpath.join(target.workdir, rec.run_dir)
        if posixpath.normpath(run_dir_abs) != posixpath.normpath(
            output_dir_abs.replace("%a", str(int(i)))
        ):
            raise LaunchError(f"array task {i}: run dir {rec.run_dir} is not {output_dir_abs}")
        command = _run_command(cfg, spec, code_dir, run_dir_abs, python, nproc, wrapper_path)
        seed = spec.task.args.get("seed")
        scripted[int(i)] = jobscript.ArrayTask(
            seed=seed if isinstance(seed, int) else None, run_dir_abs=run_dir_abs, command=command
        )
    first_spec, first = tasks[min(tasks)]
    options = jobscript.sbatch_options(
        cfg,
        first_spec,
        job_name=job_name,
        run_dir_abs=output_dir_abs,
        code_dir=code_dir,
        after=after,
        array=array_spec(list(tasks)),
    )
    # One script, a copy in every task's run dir (what ran is readable next to each run);
    # sbatch reads the first at submission.
    scripts = [f"{t.run_dir_abs}/{jobscript.JOB_SCRIPT}" for _, t in sorted(scripted.items())]
    argv = jobscript.sbatch_argv(options, scripts[0])
    text = jobscript.array_job_script(
        scripted,
        submit_line=quote_argv(argv),
        nproc=nproc,
        agents=jobscript.task_count(first_spec),
    )
    for path in scripts:
        target.put_bytes(text.encode(), path, mode=0o755)
    return _sbatch(target, argv, f"the array job of {first.stage} ({len(tasks)} task(s))")


def worker_argv(
    cfg: SlurmConfig, spec: RunSpec, python: str, run_dir_abs: str, nproc: int
) -> list[str]:
    """The command the wrapper runs in the job: one worker process (under torchrun for
    `nproc > 1`) as on any box, or for `nodes`/`tasks_per_node` > 1 one torchrun agent per
    Slurm task through `srun` (`jobscript.agents_argv`)."""
    if jobscript.task_count(spec) > 1:
        return jobscript.agents_argv(
            python, run_dir_abs, nproc_per_node=nproc, cpus_per_task=cfg.cpus_per_task
        )
    return wrapper.worker_argv(python, run_dir_abs, nproc)


def _run_command(
    cfg: SlurmConfig,
    spec: RunSpec,
    code_dir: str,
    run_dir_abs: str,
    python: str,
    nproc: int,
    wrapper_path: str,
) -> str:
    """The wrapper command line that runs one run's worker in the job (its env, the run dir
    protocol's wrapper, torchrun or srun torchrun as the spec's layout asks)."""
    env = wrapper.run_env(code_dir=code_dir, run_dir_abs=run_dir_abs, spec=spec, extra=cfg.env)
    return wrapper.wrapper_command(
        wrapper_path=wrapper_path,
        run_dir_abs=run_dir_abs,
        argv=worker_argv(cfg, spec, python, run_dir_abs, nproc),
        env=env,
    )


def _sbatch(target: Target, argv: list[str], what: str) -> str:
    """Run `sbatch --parsable ...` on the login node: the job id, or LaunchError with
    sbatch's own words."""
    res = target.run(argv, timeout=QUICK_TIMEOUT_S)
    if res.returncode == 127:
        raise LaunchError(
            f"sbatch is not on PATH on the login node of {target.name!r}",
            hint="check host/user, or set env = { PATH = ... } for the target",
        )
    job_id = parse_job_id_or_none(res.stdout) if res.returncode == 0 else None
    if job_id is None:
        why = " ".join(res.stderr.split()) or f"exit {res.returncode}: {res.stdout.strip()}"
        raise LaunchError(f"Slurm refused {what} on {target.name!r}: {why}")
    return job_id


def parse_job_id_or_none(stdout: str) -> str | None:
    return jobscript.parse_job_id(stdout)


def job_state(target: Target, job_id: str) -> SlurmJob:
    """What squeue says about one job now (`known=False` once Slurm forgot it)."""
    res = target.run(squeue_argv([check_job_id(job_id)]), timeout=QUICK_TIMEOUT_S)
    if res.returncode != 0 and INVALID_JOB_ID in res.stderr:
        return SlurmJob(job_id=job_id, known=False)
    if res.returncode != 0:
        why = " ".join(res.stderr.split())[-300:] or f"exit {res.returncode}"
        return SlurmJob(job_id=job_id, error=f"squeue failed: {why}")
    return parse_squeue(res.stdout).get(job_id) or SlurmJob(job_id=job_id, known=False)


def cancel_job(target: Target, job_id: str) -> bool:
    """`scancel JOB` (SIGTERM to the job, then SIGKILL after Slurm's KillWait). True if asked.
    An array task (`12_1`) is cancelled alone; the array's other tasks run on."""
    res = target.run(["scancel", "--", check_job_id(job_id)], timeout=QUICK_TIMEOUT_S)
    return res.returncode == 0
