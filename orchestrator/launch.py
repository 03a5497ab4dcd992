"""Start one stage on one target: sync, bootstrap, spec, secrets, tmux; and stop a run.

    rec = launch_stage(ctx, stage, "box")      # -> RunRecord, phase `running`
    stop_run(ctx, rec)                         # kill its tmux session, record `cancelled`

The target is checked first (its static configuration, then one round trip): a missing key
file or a box that does not answer is one error line and no run row. Then the run is recorded
(`pending`) and moves `syncing -> launching -> running` with history. On ANY failure after that
row exists the tmux session (if it started) is killed, the row is marked `failed` with the
reason (or dropped, when the box stopped answering before anything ran), and LaunchError says
what went wrong in one line: nothing is left half-started and no row stays in `launching`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import posixpath
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobs.plan import Capacity, gb, plan_stage
from jobs.profiles import PROFILES
from jobs.spec import InputRef, StageSpec
from orchestrator import __version__, bootstrap, wrapper
from orchestrator.codesync import sync_code
from orchestrator.config import SlurmTarget as SlurmConfig
from orchestrator.context import Context
from orchestrator.progress import Steps
from orchestrator.targets.base import Target
from orchestrator.targets.factory import make_target
from state import names
from state.errors import (
    ConfigError,
    LaunchError,
    OrchError,
    RuntimeContractError,
    StageError,
    UnreachableError,
)
from state.models import RunRecord, RunSpec, WorkerTask
from state.phases import Phase
from state.slurm import SLURM_ACTIVE, SLURM_WAITING
from state.worker_config import ARGS_BY_COMMAND

#: Deadline of the small remote commands of a launch (mkdir, tmux, ...).
QUICK_TIMEOUT_S = 30.0


# -- pure pieces ------------------------------------------------------------------------------
def run_dir_of(stage_dir: str, run_id: str) -> str:
    """`runs/<stage_dir>/<run_id>`, relative to the target's workdir (validated names)."""
    names.check_name(stage_dir, "stage dir")
    names.check_name(run_id, "run id")
    return f"{names.RUNS_DIR}/{stage_dir}/{run_id}"


def tmux_session_for(stage: str, run_id: str) -> str:
    """The tmux session name as tmux will spell it (tmux turns '.' in a session name into '_')."""
    return names.session_name(stage, run_id).replace(".", "_")


def check_artifact(path: str) -> str:
    """An artifact path inside a run dir: relative, no `..`, no odd characters."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(not names.is_valid_name(p) for p in parts):
        raise StageError(
            f"invalid artifact path {path!r}: use names separated by '/' inside the run dir"
        )
    return path


def merge_inputs(task: WorkerTask, resolved: dict[str, str], workdir: str) -> WorkerTask:
    """The task with every resolved input (relative to the workdir) written into its args as an
    absolute path, then validated by the worker's args model (ConfigError-free: StageError)."""
    args = dict(task.args)
    for arg, rel in resolved.items():
        args[arg] = posixpath.join(workdir, rel)
    model = ARGS_BY_COMMAND[task.command]
    try:
        model.model_validate(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise StageError(f"{task.command} args invalid at {loc or '(top)'}: {err['msg']}") from None
    return WorkerTask(command=task.command, args=args)


def secret_values(
    forward: list[str], environ: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """(values found in the environment, names missing) for a target's `forward_env`."""
    env = os.environ if environ is None else environ
    for k in forward:
        wrapper.check_env_name(k)
    found = {k: env[k] for k in forward if k in env}
    return found, [k for k in forward if k not in env]


HF_TOKEN = "HF_TOKEN"


def forwarded_names(
    forward_env: list[str], forward_hf_token: bool, environ: dict[str, str] | None = None
) -> list[str]:
    """The secrets a run gets: `forward_env`, plus HF_TOKEN when it is set here and the target
    forwards it by default (`forward_hf_token`); a default never warns when it is not set."""
    env = os.environ if environ is None else environ
    names_ = list(forward_env)
    if forward_hf_token and HF_TOKEN not in names_ and env.get(HF_TOKEN):
        names_.append(HF_TOKEN)
    return names_


def check_gated_token(stage: StageSpec, profile: str | None, forwarded: dict[str, str]) -> None:
    """ConfigError, before anything is recorded, when the stage loads its profile's gated hub
    model and no HF_TOKEN goes with the run (the download would fail minutes into a paid box)."""
    p = PROFILES.get(profile or "")
    model = str(stage.task.args.get("model", ""))
    if p is None or not p.hub_gated or model != p.model or forwarded.get(HF_TOKEN):
        return
    raise ConfigError(
        f"stage {stage.name} loads {model}, a gated hub model, and no HF_TOKEN would reach the run",
        hint=f"accept its conditions at https://huggingface.co/{model}, then export HF_TOKEN "
        "(a read token); `orch plan` checks the token on the hub",
    )


def git_info(root: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the project, or (None, False) outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None, False
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return head.stdout.strip() or None, bool(dirty.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None, False


# -- inputs and ids -----------------------------------------------------------------------------
def resolve_inputs(
    ctx: Context, stage: StageSpec, target_name: str, after: dict[str, RunRecord] | None = None
) -> dict[str, str]:
    """Each InputRef -> `runs/<stage_dir>/<run_id>/<artifact>` of the latest succeeded run of
    that stage on the same target (StageError naming the stage and suggesting --with-deps),
    or of the upstream run in `after` (submitted in the same Slurm graph, not finished yet)."""
    resolved: dict[str, str] = {}
    for ref in stage.inputs:
        if after and ref.stage in after:
            resolved[ref.arg] = f"{after[ref.stage].run_dir}/{check_artifact(ref.artifact)}"
            continue
        resolved[ref.arg] = _resolve_one(ctx, stage, ref, target_name)
    return resolved


def run_seed(rec: RunRecord) -> int | None:
    """The study seed a run was launched with (`task.args.seed` of its spec), if any."""
    try:
        seed = json.loads(rec.spec_json or "{}").get("task", {}).get("args", {}).get("seed")
    except (ValueError, AttributeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _resolve_one(ctx: Context, stage: StageSpec, ref: InputRef, target_name: str) -> str:
    runs = ctx.store.list_runs(stage=ref.stage, target=target_name)
    done = [r for r in runs if r.phase == Phase.SUCCEEDED]
    # A seeded study chains runs of one seed: stage 4 of seed 3 evaluates 3B's seed-3
    # checkpoint, never the newest checkpoint of another seed.
    seed = stage.task.args.get("seed")
    same = [r for r in done if run_seed(r) == seed] if isinstance(seed, int) else done
    if not same:
        which = f" with seed {seed}" if done else ""
        raise StageError(
            f"stage {stage.name} needs a succeeded run of {ref.stage}{which} on target {target_name!r}; there is none",
            hint=f"run `orch launch {stage.name} --with-deps --target {target_name}`, or launch {ref.stage} first",
        )
    return f"{same[0].run_dir}/{check_artifact(ref.artifact)}"


def new_unique_run_id(ctx: Context, stage_dir: str) -> str:
    """A fresh `YYYYmmdd-HHMMSS` run id; a short random suffix when that second is taken."""
    rid = names.new_run_id()
    while ctx.store.get_run(stage_dir, rid) is not None:
        rid = names.new_run_id(suffix=secrets.token_hex(2))
    return rid


# -- launch ---------------------------------------------------------------------------------------
def check_layout(stage: StageSpec, target_name: str, kind: str) -> None:
    """ConfigError, before anything starts, for `nodes > 1` (or `tasks_per_node > 1`) on a
    target that is not a Slurm cluster: only Slurm hands out several nodes to one job."""
    if stage.tasks > 1 and kind != "slurm":
        raise ConfigError(
            f"stage {stage.name}: nodes={stage.nodes} tasks_per_node={stage.tasks_per_node} needs"
            f" a slurm target, and {target_name!r} is a {kind} target",
            hint='use --target CLUSTER (a kind = "slurm" target), or --set nodes=1',
        )


def launch_stage(
    ctx: Context,
    stage: StageSpec,
    target_name: str | None = None,
    *,
    sync: bool = True,
    run_id: str | None = None,
    profile: str | None = None,
    seed: Callable[[Target, RunRecord], None] | None = None,
    spec_extra: dict[str, Any] | None = None,
    report: Steps | None = None,
    after: dict[str, RunRecord] | None = None,
    held: bool = False,
) -> RunRecord:
    """Launch `stage` on a target and return its record (phase `running`).

    `held` (a `slurm` target only): prepare the run dir (spec, secrets) but submit nothing;
    the record stays `launching` until the stage's array job, one task per seed, is submitted
    for it (orchestrator/graph_runner.py).

    `after` (a `slurm` target only): the upstream runs by stage, submitted in the same graph
    and not finished yet: their run dirs are this stage's inputs, and its job starts once
    their jobs succeeded (`orchestrator.slurm.graph`).

    `report` says what each step is doing (code sync, bootstrap) to a person waiting.

    `seed(target, rec)` runs once the new run dir exists and before the worker starts (an
    auto-relaunch puts the checkpoint to resume from there); `spec_extra` sets further
    `spec.json` fields (the relaunch lineage).

    Errors found before anything is recorded (bad names, unknown target, missing upstream run)
    raise ConfigError/StageError; anything after raises LaunchError, with the row marked failed.
    """
    names.check_name(stage.name, "stage")
    names.check_name(stage.stage_dir, "stage dir")
    tname, tcfg = ctx.config.target(target_name)
    if stage.local_only:
        raise StageError(
            f"stage {stage.name} runs on this machine, not on a target",
            hint=f"use `orch {stage.name}`",
        )
    if (after or held) and not isinstance(tcfg, SlurmConfig):
        raise ConfigError(f"target {tname!r} is not a slurm target: no job dependencies there")
    check_layout(stage, tname, tcfg.kind)
    resolved = resolve_inputs(ctx, stage, tname, after)
    forward, missing = secret_values(forwarded_names(tcfg.forward_env, tcfg.forward_hf_token))
    check_gated_token(stage, profile or ctx.config.experiment.profile, forward)
    for key in tcfg.env:
        wrapper.check_env_name(key)
    rid = names.check_name(run_id, "run id") if run_id else new_unique_run_id(ctx, stage.stage_dir)
    if ctx.store.get_run(stage.stage_dir, rid) is not None:
        raise LaunchError(
            f"run {stage.stage_dir}/{rid} already exists", hint="use another --run-id"
        )

    merge_inputs(stage.task, resolved, "/")  # validate the args now; the real paths need the box
    target = make_target(ctx, tname)
    _reach(target, stage.name)  # a misconfigured or silent target leaves no run row behind
    check_disk(ctx, target, stage, profile)  # a stage that cannot fit is never started
    rec = _insert_new_run(ctx, stage, tname, rid, fixed=run_id is not None)
    started = sending = False
    job_id = ""
    try:
        if missing:
            ctx.err.print(
                f"[yellow]warning:[/] forward_env not set here, not sent: {', '.join(missing)}"
            )
        if sync:
            _set_phase(ctx, rec, Phase.SYNCING)
            sync_code(target, ctx.project_root, report=report, exclude=ctx.config.sync.exclude)
        _set_phase(ctx, rec, Phase.LAUNCHING)
        python = bootstrap.ensure_env(ctx, target, report=report)
        task = merge_inputs(stage.task, resolved, target.workdir)
        spec = _build_spec(ctx, stage, task, rec, resolved, profile)
        if spec_extra:
            spec = RunSpec.model_validate({**spec.model_dump(), **spec_extra})
        spec_json = spec.model_dump_json(indent=2)
        wpath = wrapper.wrapper_remote_path(target.workdir)
        if not _prepare_run_dir(target, rec, wpath):
            target.put_bytes(wrapper.wrapper_script(), wpath, mode=0o755)
        if seed is not None:
            seed(target, rec)
        target.put_bytes((spec_json + "\n").encode(), _abs(target, f"{rec.run_dir}/{names.SPEC}"))
        if forward:
            target.put_bytes(
                wrapper.secrets_env_text(forward).encode(),
                _abs(target, f"{rec.run_dir}/{wrapper.SECRETS_FILE}"),
                mode=0o600,
            )
        sending = True  # from here a session may exist even if its answer never arrives
        if held:  # one task of an array job, submitted once every task's run dir is ready
            ctx.store.update_run(
                rec.stage_dir,
                rec.run_id,
                phase=Phase.LAUNCHING,
                spec_json=spec_json,
                reason="run dir ready; waiting for its array job to be submitted",
            )
        elif isinstance(tcfg, SlurmConfig):  # a batch job, not a tmux session (docs/slurm.md)
            # lazy, for start-up time: orchestrator.slurm.submit only here
            from orchestrator.slurm.submit import submit_run

            job_id = submit_run(
                target,
                tcfg,
                spec,
                rec,
                python=python,
                nproc=stage.nproc_per_node,
                wrapper_path=wpath,
                after={r.job_id: r.key for r in (after or {}).values()},
            )
            started = True
            ctx.store.update_run(
                rec.stage_dir,
                rec.run_id,
                phase=Phase.QUEUED,
                spec_json=spec_json,
                job_id=job_id,
                reason=f"submitted as Slurm job {job_id}",
            )
        else:
            started = _start_session(
                target, tcfg.env, spec, rec, python, stage.nproc_per_node, wpath
            )
            ctx.store.update_run(
                rec.stage_dir, rec.run_id, phase=Phase.RUNNING, spec_json=spec_json, reason=""
            )
    except BaseException as exc:
        reason = _reason(exc)
        if started:
            with contextlib.suppress(Exception):
                if job_id:
                    # lazy, for start-up time: orchestrator.slurm.submit only here
                    from orchestrator.slurm.submit import cancel_job

                    cancel_job(target, job_id)
                else:
                    kill_session(target, rec.session)
        with contextlib.suppress(Exception):
            if not sending and (
                any(isinstance(e, UnreachableError) for e in (exc, exc.__cause__))
                or isinstance(exc, RuntimeContractError)
            ):
                # The box stopped answering, or its env cannot run the worker, before anything
                # ran: no run to keep on record (the error says what to fix).
                ctx.store.delete_run(rec.stage_dir, rec.run_id)
            else:
                ctx.store.update_run(
                    rec.stage_dir, rec.run_id, phase=Phase.FAILED, reason=f"launch failed: {reason}"
                )
        if isinstance(exc, LaunchError):
            raise
        if isinstance(exc, OrchError):
            raise LaunchError(f"launch of {stage.name} on {tname!r} failed: {reason}") from exc
        if isinstance(exc, Exception):
            raise LaunchError(f"launch of {stage.name} on {tname!r} failed: {reason}") from exc
        raise  # KeyboardInterrupt and friends: recorded as failed, then re-raised
    finally:
        with contextlib.suppress(Exception):
            target.close()
    final = ctx.store.get_run(rec.stage_dir, rec.run_id)
    assert final is not None
    return final


#: Disk needs below this are not checked (no round trip): the tiny profile never is.
DISK_CHECK_FROM_BYTES = 1_000_000_000

_FREE_DISK = r"""
import os, shutil, sys
p = sys.argv[1]
while p and not os.path.exists(p):
    p = os.path.dirname(p)
print(shutil.disk_usage(p or "/").free)
"""


def disk_need(ctx: Context, stage: StageSpec, profile: str | None, tname: str) -> tuple[int, str]:
    """(bytes, what) a stage still needs on its target's disk: its checkpoints at the peak of a
    save and its outputs (`jobs.plan`), plus the HF cache when no run has succeeded on the
    target yet (0 for stages that are not the profile's own train/eval)."""
    p = PROFILES.get(profile or ctx.config.experiment.profile)
    if p is None or stage.task.command not in ("train", "eval") or not p.plan.base_config:
        return 0, ""
    plan = plan_stage(stage, p, Capacity(tname, "?", device="cuda"))
    d = plan.disk
    fresh = not any(r.phase == Phase.SUCCEEDED for r in ctx.store.list_runs(target=tname))
    need = d.checkpoints_peak + d.outputs + (d.cache if fresh else 0)
    what = f"checkpoints at peak {gb(d.checkpoints_peak)} + outputs {gb(d.outputs)}"
    what += f" + HF cache {gb(d.cache)}" if fresh else ""
    return need, what


def check_disk(ctx: Context, target: Target, stage: StageSpec, profile: str | None) -> None:
    """LaunchError with the numbers, before the run is recorded, when the stage's checkpoints,
    outputs and cache cannot fit on the target's free disk."""
    need, what = disk_need(ctx, stage, profile, target.name)
    if need < DISK_CHECK_FROM_BYTES:
        return

    python = sys.executable if target.kind == "local" else bootstrap.BASE_PYTHON
    res = target.run([python, "-c", _FREE_DISK, target.workdir], timeout=QUICK_TIMEOUT_S)
    try:
        free = int(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return  # cannot tell: the worker checks again before each save
    if need > free:
        raise LaunchError(
            f"stage {stage.name} needs {gb(need)} of disk on {target.name!r} ({what}), "
            f"and {target.workdir} has {gb(free)} free",
            hint="nothing was started; free space or rent a bigger disk (disk_gb); "
            "`orch plan` shows the numbers",
        )


def _reach(target: Target, stage: str) -> None:
    """Before the run is recorded: the target's static checks (`preflight`: key file, host),
    then one real round trip. ConfigError as it is; no answer is a LaunchError."""
    try:
        target.preflight()
        target.run(["true"], timeout=QUICK_TIMEOUT_S, check=True)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            target.close()
        if isinstance(exc, ConfigError) or not isinstance(exc, Exception):
            raise
        raise LaunchError(
            f"launch of {stage} on {target.name!r} failed: {_reason(exc)}",
            hint="nothing was started or recorded",
        ) from exc


def _insert_new_run(
    ctx: Context, stage: StageSpec, tname: str, rid: str, *, fixed: bool
) -> RunRecord:
    """Record the run as `pending`. Two launches of one stage in the same second (run-all's
    threads) get distinct ids: on a clash a fresh suffixed id is tried."""
    for _ in range(8):
        now = datetime.now(timezone.utc)
        rec = RunRecord(
            run_id=rid,
            stage=stage.name,
            stage_dir=stage.stage_dir,
            target=tname,
            phase=Phase.PENDING,
            session=tmux_session_for(stage.name, rid),
            run_dir=run_dir_of(stage.stage_dir, rid),
            created_at=now,
            updated_at=now,
        )
        try:
            ctx.store.insert_run(rec)
            return rec
        except sqlite3.IntegrityError:
            if fixed:
                break
            rid = names.new_run_id(suffix=secrets.token_hex(2))
    raise LaunchError(f"run {stage.stage_dir}/{rid} already exists", hint="use another run id")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(exc).split())
    if isinstance(exc, OrchError):
        return text or type(exc).__name__
    # Not one of ours (an OSError, a bug): keep the type, it is the useful half of the message.
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _set_phase(ctx: Context, rec: RunRecord, phase: Phase) -> None:
    ctx.store.update_run(rec.stage_dir, rec.run_id, phase=phase)


def _abs(target: Target, rel: str) -> str:
    return posixpath.join(target.workdir, rel)


def _build_spec(
    ctx: Context,
    stage: StageSpec,
    task: WorkerTask,
    rec: RunRecord,
    resolved: dict[str, str],
    profile: str | None,
) -> RunSpec:
    commit, dirty = git_info(ctx.project_root)
    try:
        who = f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:
        who = ""
    return RunSpec(
        run_id=rec.run_id,
        stage=stage.name,
        stage_dir=stage.stage_dir,
        profile=profile or ctx.config.experiment.profile,
        task=task,
        inputs=resolved,
        timeout_s=stage.timeout_s,
        stale_after_s=stage.stale_after_s,
        poll_interval_s=stage.poll_interval_s,
        resources=stage.resources,
        nproc_per_node=stage.nproc_per_node,
        nodes=stage.nodes,
        tasks_per_node=stage.tasks_per_node,
        git_commit=commit,
        git_dirty=dirty,
        target=rec.target,
        launched_by=who,
        orch_version=__version__,
    )


# One round trip: create the parents and the code dir (tmux refuses a missing start dir, e.g.
# with --no-sync), then the run dir itself, whose last component must be new (a reused dir would
# mix two runs), and say whether the content-addressed wrapper is already there. A fixed
# program; the paths come as arguments.
_PREPARE = (
    'mkdir -p -- "$1" "$2" || exit 1; mkdir -- "$3" || exit 3; '
    'if [ -f "$4" ]; then echo wrapper-present; fi'
)


def _prepare_run_dir(target: Target, rec: RunRecord, wrapper_path: str) -> bool:
    """Create the run dir (and code dir); True when the wrapper script is already in place."""
    parent = _abs(target, posixpath.dirname(rec.run_dir))
    code_dir = _abs(target, names.CODE_DIR)
    argv = ["sh", "-c", _PREPARE, "sh", parent, code_dir, _abs(target, rec.run_dir), wrapper_path]
    res = target.run(argv, timeout=QUICK_TIMEOUT_S)
    if res.returncode != 0:
        why = " ".join(res.stderr.split()) or f"exit {res.returncode}"
        raise LaunchError(f"cannot create the run dir {rec.run_dir} on {target.name!r}: {why}")
    return "wrapper-present" in res.stdout


def _start_session(
    target: Target,
    env_cfg: dict[str, str],
    spec: RunSpec,
    rec: RunRecord,
    python: str,
    nproc: int,
    wrapper_path: str,
) -> bool:
    """Start the detached tmux session running the wrapper. True once it exists."""
    code_dir = _abs(target, names.CODE_DIR)
    run_dir_abs = _abs(target, rec.run_dir)
    env = wrapper.run_env(code_dir=code_dir, run_dir_abs=run_dir_abs, spec=spec, extra=env_cfg)
    command = wrapper.wrapper_command(
        wrapper_path=wrapper_path,
        run_dir_abs=run_dir_abs,
        argv=wrapper.worker_argv(python, run_dir_abs, nproc),
        env=env,
    )
    res = target.run(
        wrapper.tmux_new_session_argv(rec.session, code_dir, command), timeout=QUICK_TIMEOUT_S
    )
    if res.returncode == 127:
        raise LaunchError(
            f"tmux is not installed on target {target.name!r}",
            hint="install it there (apt-get install tmux)",
        )
    if res.returncode != 0:
        why = " ".join(res.stderr.split()) or f"exit {res.returncode}"
        raise LaunchError(f"tmux could not start session {rec.session} on {target.name!r}: {why}")
    return True


# -- sessions and stop -----------------------------------------------------------------------------
def kill_session(target: Target, session: str) -> bool:
    """Kill tmux session `session` (exact name). True if it existed."""
    res = target.run(
        ["tmux", "kill-session", "-t", wrapper.tmux_exact(session)], timeout=QUICK_TIMEOUT_S
    )
    return res.returncode == 0


def session_alive(target: Target, session: str) -> bool:
    res = target.run(
        ["tmux", "has-session", "-t", wrapper.tmux_exact(session)], timeout=QUICK_TIMEOUT_S
    )
    return res.returncode == 0


def read_remote_exit_code(target: Target, rec: RunRecord) -> int | None:
    """The run's `exit_code` on the target, or None while it has none (or it is partial)."""
    return _end_probe(target, rec)[0]


# One round trip: the exit code (if written) and whether the wrapper ever started the command.
_END_PROBE = 'cat -- "$1" 2>/dev/null; echo; if [ -e "$2" ]; then echo has-pid; fi'


def _end_probe(target: Target, rec: RunRecord) -> tuple[int | None, bool]:
    rd = _abs(target, rec.run_dir)
    argv = ["sh", "-c", _END_PROBE, "sh", f"{rd}/{names.EXIT_CODE}", f"{rd}/{names.PID}"]
    res = target.run(argv, timeout=QUICK_TIMEOUT_S)
    lines = res.stdout.splitlines()
    code: int | None = None
    with contextlib.suppress(ValueError, IndexError):
        code = int(lines[0].strip())
    return code, "has-pid" in lines[1:]


def _wait_for_exit_code(target: Target, rec: RunRecord, wait_s: float) -> int | None:
    """Wait for the wrapper to record the exit code after its session was killed.

    A wrapper hung up before it could set its traps (a stop right after launch) never started
    the command (no pid file) and never writes the file: after a short grace we write what it
    would have (128 + SIGHUP), so every ended run has an exit code.
    """
    deadline = time.monotonic() + wait_s
    no_pid_since: float | None = None
    while True:
        code, has_pid = _end_probe(target, rec)
        now = time.monotonic()
        if code is not None or now >= deadline:
            return code
        if has_pid:
            no_pid_since = None
        elif no_pid_since is None:
            no_pid_since = now
        elif now - no_pid_since >= 2.0:
            code = 128 + 1
            target.put_bytes(f"{code}\n".encode(), _abs(target, f"{rec.run_dir}/{names.EXIT_CODE}"))
            return code
        time.sleep(0.2)


def stop_run(ctx: Context, rec: RunRecord, *, wait_s: float = 15.0) -> RunRecord:
    """End a run's tmux session and record it `cancelled`.

    The wrapper traps the hang-up, stops the worker (SIGTERM, then SIGKILL) and writes
    `exit_code` (128+1); we wait up to `wait_s` for that file. A run already in a terminal phase
    is left as it is. A run whose session is already gone is left for the monitor to judge
    (its markers say how it ended), and LaunchError says so.
    """
    if rec.phase.is_terminal:
        return rec
    if rec.job_id:
        return stop_slurm_run(ctx, rec, wait_s=wait_s)

    target = make_target(ctx, rec.target)
    # Said BEFORE the kill, so a watcher polling meanwhile records `cancelled`, not `crashed`.
    ctx.store.request_cancel(rec.stage_dir, rec.run_id)
    try:
        killed = kill_session(target, rec.session)
        code = (
            _wait_for_exit_code(target, rec, wait_s)
            if killed
            else read_remote_exit_code(target, rec)
        )
    finally:
        with contextlib.suppress(Exception):
            target.close()
    if not killed:
        raise LaunchError(
            f"run {rec.key} has no live tmux session {rec.session} on {rec.target!r}"
            + (f" (it ended with exit code {code})" if code is not None else ""),
            hint="`orch status` records how it ended",
        )
    ctx.store.update_run(
        rec.stage_dir,
        rec.run_id,
        phase=Phase.CANCELLED,
        reason="stopped by the user",
        exit_code=code,
    )
    final = ctx.store.get_run(rec.stage_dir, rec.run_id)
    assert final is not None
    return final


def stop_slurm_run(ctx: Context, rec: RunRecord, *, wait_s: float = 15.0) -> RunRecord:
    """`scancel` a run's Slurm job and record it `cancelled`: a queued job just leaves the
    queue; a running one gets SIGTERM, which the wrapper turns into `exit_code` (143). A job
    Slurm says has already ended is left for the monitor to judge (LaunchError says so)."""
    # lazy, for start-up time: every command loads this file; orchestrator.slurm.submit only here
    from orchestrator.slurm.submit import cancel_job, job_state

    target = make_target(ctx, rec.target)
    live = SLURM_ACTIVE | SLURM_WAITING
    code = None
    try:
        job = job_state(target, rec.job_id)
        if job.known and not job.error and job.state not in live:
            raise LaunchError(
                f"run {rec.key}: Slurm job {rec.job_id} already ended ({job.state})",
                hint="`orch status` records how it ended",
            )
        # Said BEFORE the scancel, so a watcher polling meanwhile records `cancelled`.
        ctx.store.request_cancel(rec.stage_dir, rec.run_id)
        if not cancel_job(target, rec.job_id):
            raise LaunchError(f"scancel {rec.job_id} failed on {rec.target!r}")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            job = job_state(target, rec.job_id)
            if job.known and job.state in live:
                time.sleep(0.5)
                continue
            code = read_remote_exit_code(target, rec)
            break
    finally:
        with contextlib.suppress(Exception):
            target.close()
    ctx.store.update_run(
        rec.stage_dir,
        rec.run_id,
        phase=Phase.CANCELLED,
        reason=f"stopped by the user (scancel {rec.job_id})",
        exit_code=code,
    )
    final = ctx.store.get_run(rec.stage_dir, rec.run_id)
    assert final is not None
    return final
