"""One worker run: `setup -> run -> write results -> mark done`, or `.run_failed` and an exit code.

Success writes, in this order: the result (`metrics.json` for eval/probe, `summary.json` for
train), `manifest.json` (size + sha256 of every artifact), then `.run_complete` LAST, so that
its presence means every other file is final. Failure writes `.run_failed` (exception type,
message, traceback tail) and returns a `WorkerExit` code: BAD_INPUT for a `WorkerError`,
LEAKAGE for the leakage guard, INTERRUPTED for SIGTERM/SIGINT/SIGHUP, ERROR otherwise.

train, eval and probe first check the runtime contract (`worker.runtime`: Python, torch,
transformers, CUDA when the stage's device is cuda; a BAD_INPUT naming the fix otherwise) and
their result file gets a "runtime" entry: the versions and the tokenizer class loaded.

A full disk must still leave a readable reason: at setup the run reserves a small preallocated
file (`.run_failed.reserve.tmp`); if writing `.run_failed` normally fails, the reason is written
into the reserved blocks in place and the file is renamed to `.run_failed` (overwriting
allocated blocks and renaming need no free space).

Under torchrun only rank 0 writes status, results and markers; other ranks print their
traceback to stderr and exit with the same code mapping.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import BaseModel, ValidationError

from state import names
from state.errors import WorkerError
from state.models import RunComplete, RunFailed, RunSpec
from state.phases import WorkerExit, WorkerPhase
from state.protocol import atomic_write_json, build_manifest, read_model, sha256_file
from state.worker_config import ARGS_BY_COMMAND, ExecArgs
from worker import runtime
from worker.context import Interrupted, LeakageError, RunContext, SaveRequest
from worker.status import NullStatus, StatusWriter

RESERVE = ".run_failed.reserve.tmp"  # ends in .tmp: never listed in a manifest
RESERVE_BYTES = 16 * 1024
TRACEBACK_TAIL_LINES = 30


# A task: validated args + context -> the result dict (metrics/summary), or None (exec).
Task = Callable[[Any, RunContext], "dict[str, Any] | None"]
RESULT_FILE = {"eval": names.METRICS, "probe": names.METRICS, "train": names.SUMMARY}
#: Commands checked against the runtime contract at start (`worker.runtime`).
RUNTIME_CHECKED = frozenset({"train", "eval", "probe"})


def parse_args(command: str, raw: dict[str, Any] | BaseModel) -> BaseModel:
    """Validate a subcommand's args with the shared models (`state.worker_config`)."""
    model = ARGS_BY_COMMAND.get(command)
    if model is None:
        raise WorkerError(
            f"unknown worker command {command!r}; use one of {sorted(ARGS_BY_COMMAND)}"
        )
    if isinstance(raw, model):
        return raw
    if isinstance(raw, BaseModel):
        raw = raw.model_dump()
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise WorkerError(
            f"invalid {command} args: " + "; ".join(lines),
            hint=f"see `python -m worker {command} --help` / state/worker_config.py",
        ) from exc


def load_spec(run_dir: Path) -> RunSpec:
    """`spec.json` of a run dir, or WorkerError saying what is wrong with it."""
    path = run_dir / names.SPEC
    if not path.exists():
        raise WorkerError(
            f"{path}: no spec.json",
            hint="launch with orch, or use `python -m worker <command> --run-dir DIR --args-json ...`",
        )
    try:
        raw = json.loads(path.read_text())
        return RunSpec.model_validate(raw)
    except (ValueError, ValidationError) as exc:
        raise WorkerError(
            f"{path}: unusable spec ({str(exc).splitlines()[0]})", hint="relaunch the stage"
        ) from exc


def exit_code_for(exc: BaseException) -> WorkerExit:
    if isinstance(exc, LeakageError):
        return WorkerExit.LEAKAGE
    if isinstance(exc, WorkerError):
        return WorkerExit.BAD_INPUT
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return WorkerExit.INTERRUPTED
    return WorkerExit.ERROR


def _is_disk_full(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "file write failed" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def failure_record(run_id: str, exc: BaseException, code: int) -> RunFailed:
    msg = str(exc) or type(exc).__name__
    if _is_disk_full(exc):
        msg = f"disk full: {msg} (free space on the box, lower keep_checkpoints, then relaunch to resume)"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tail = "\n".join(tb.rstrip().splitlines()[-TRACEBACK_TAIL_LINES:])
    return RunFailed(
        run_id=run_id,
        reason=msg,
        error_type=type(exc).__name__,
        traceback_tail=tail,
        exit_code=code,
    )


# ---- markers ----------------------------------------------------------------------------


def reserve_failure_space(run_dir: Path) -> None:
    """Preallocate the blocks `.run_failed` will need if the disk fills up later."""
    path = run_dir / RESERVE
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            # Real bytes too: some filesystems (tmpfs, overlay) treat fallocate lazily.
            os.pwrite(fd, b" " * RESERVE_BYTES, 0)
            os.fsync(fd)
        finally:
            os.close(fd)


def write_failed(run_dir: Path, record: RunFailed) -> None:
    """Write `.run_failed`; on a full disk, into the reserved blocks; never raises."""
    try:
        atomic_write_json(run_dir / names.RUN_FAILED, record)
        with contextlib.suppress(OSError):
            os.unlink(run_dir / RESERVE)
        return
    except OSError:
        pass
    data = _fit(record, RESERVE_BYTES)
    reserve = run_dir / RESERVE
    try:
        fd = os.open(reserve, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(reserve, run_dir / names.RUN_FAILED)
        return
    except OSError:
        pass
    # No reserve (it could not be made): a last, tiny, in-place attempt.
    with contextlib.suppress(OSError):
        fd = os.open(run_dir / names.RUN_FAILED, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, _fit(record, 512))
        finally:
            os.close(fd)


def _fit(record: RunFailed, limit: int) -> bytes:
    """The record as JSON of at most `limit` bytes (shorten the traceback, then the reason)."""
    rec = record.model_copy()
    data = rec.model_dump_json().encode()
    while len(data) > limit and rec.traceback_tail:
        rec.traceback_tail = rec.traceback_tail[len(rec.traceback_tail) // 2 + 1 :]
        data = rec.model_dump_json().encode()
    while len(data) > limit and len(rec.reason) > 20:
        rec.reason = rec.reason[: len(rec.reason) // 2] + "..."
        data = rec.model_dump_json().encode()
    return data


def finish_success(ctx: RunContext, command: str, result: dict[str, Any] | None) -> None:
    """Result file, then manifest, then `.run_complete` (last)."""
    ctx.status.set_phase(WorkerPhase.SAVING, "writing results and manifest")
    if result is not None and command in RESULT_FILE:
        atomic_write_json(ctx.run_dir / RESULT_FILE[command], result)
    manifest = build_manifest(ctx.run_dir, ctx.run_id)
    atomic_write_json(ctx.run_dir / names.MANIFEST, manifest)
    digest = sha256_file(ctx.run_dir / names.MANIFEST)
    atomic_write_json(
        ctx.run_dir / names.RUN_COMPLETE, RunComplete(run_id=ctx.run_id, manifest_sha256=digest)
    )
    with contextlib.suppress(OSError):
        os.unlink(ctx.run_dir / RESERVE)


# ---- signals ----------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_raise(
    run_dir: Path | None = None, request: SaveRequest | None = None
) -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into `Interrupted` so the run can leave `.run_failed`; SIGUSR1
    (Slurm's time-limit warning, forwarded by the job script) sets `request`, and so does a
    `.checkpoint_request` the job script left before this handler was there (the job script
    starts the worker with USR1 ignored, so an early signal is lost but never kills it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    def save_handler(signum: int, frame: FrameType | None) -> None:
        if request is not None:
            request.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, save_handler)
    if run_dir is not None and request is not None:
        with contextlib.suppress(OSError):
            os.unlink(run_dir / names.CHECKPOINT_REQUEST)
            request.set()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- tasks ------------------------------------------------------------------------------


def _task(command: str) -> Task:
    # Imported here: `exec` and the CLI's --help must not pay for torch.
    if command == "train":
        # lazy, for start-up time: pulls in torch
        from worker.train import train

        return train
    if command == "probe":
        # lazy, for start-up time: pulls in torch
        from worker.probe import run_probe

        return run_probe
    if command == "eval":
        from worker.evaluate import run_eval  # worker engineer A

        return run_eval
    if command == "exec":
        return run_exec
    raise WorkerError(f"unknown worker command {command!r}")


def run_exec(args: ExecArgs, ctx: RunContext) -> None:
    """Run `args.argv` as a child; its output goes to our stdout, its last line to status."""
    if not args.argv:
        raise WorkerError("exec needs a non-empty argv")
    env = dict(os.environ, ORCH_RUN_DIR=str(ctx.run_dir), ORCH_RUN_ID=ctx.run_id)
    ctx.status.set_phase(WorkerPhase.RUNNING, " ".join(args.argv)[:200])
    try:
        child = subprocess.Popen(
            args.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()
        )
    except OSError as exc:
        raise WorkerError(
            f"cannot start {args.argv[0]!r}: {exc.strerror}", hint="check the stage's argv"
        ) from exc
    tail: deque[str] = deque(maxlen=3)
    try:
        assert child.stdout is not None
        for raw in child.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            print(line, flush=True)
            if line.strip():
                tail.append(line.strip()[-300:])
                ctx.status.update(message=line[-500:])
        code = child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    if code != 0:
        last = f"; last output: {' | '.join(tail)}" if tail else ""
        raise RuntimeError(f"command {args.argv[0]!r} exited with code {code}{last}")
    return None


# ---- the run ----------------------------------------------------------------------------


#: For tests only (tests/slurm/test_slurm_array.py): a run of this study seed fails at its
#: start with BAD_INPUT, as an unusable input would. Unset everywhere else.
TEST_FAIL_SEED_ENV = "ORCH_TEST_FAIL_SEED"


def _fail_seed_for_tests(spec: RunSpec | None) -> None:
    want = os.environ.get(TEST_FAIL_SEED_ENV, "").strip()
    seed = spec.task.args.get("seed") if spec is not None else None
    if want and seed is not None and str(seed) == want:
        raise WorkerError(f"{TEST_FAIL_SEED_ENV}={want}: seed {seed} fails on purpose (a test)")


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def execute(
    run_dir: str | os.PathLike[str],
    command: str,
    raw_args: dict[str, Any] | BaseModel,
    *,
    run_id: str | None = None,
    stage: str | None = None,
    spec: RunSpec | None = None,
    error: WorkerError | None = None,
) -> int:
    """Run one worker task in `run_dir` with the full marker protocol; return the exit code.

    `error`: the input was already found unusable (e.g. no spec.json); record it as the
    failure instead of running anything.
    """
    rd = Path(run_dir).resolve()
    rd.mkdir(parents=True, exist_ok=True)
    rank, world = _rank()
    run_id = run_id or (spec.run_id if spec else rd.name)
    stage = stage or (spec.stage if spec else rd.parent.name or "adhoc")
    main = rank == 0
    if (rd / names.RUN_COMPLETE).exists():  # every rank: none may start a finished run
        print(f"[worker] {rd} is already complete; nothing to do", flush=True)
        return int(WorkerExit.OK)
    previous = None
    if main:
        previous = read_model(rd / names.RUN_FAILED, RunFailed).value
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rd / names.RUN_FAILED)  # a relaunch (resume) of a failed/killed run
        reserve_failure_space(rd)
    status: StatusWriter = NullStatus()
    request = SaveRequest()
    try:
        with _signals_raise(rd, request):
            if error is not None:
                raise error
            _fail_seed_for_tests(spec)
            args = parse_args(command, raw_args)
            if main:
                status = StatusWriter(
                    rd, run_id, stage, heartbeat_s=getattr(args, "heartbeat_s", 5.0)
                )
            ctx = RunContext(rd, run_id, stage, status, rank, world, spec, save_request=request)
            with status:
                if previous is not None:
                    status.event("info", f"relaunched after a failed attempt: {previous.reason}")
                status.set_phase(
                    WorkerPhase.STARTING, f"{command} pid={os.getpid()} rank={rank}/{world}"
                )
                if command in RUNTIME_CHECKED:
                    runtime.start_check(args, status)
                result = _task(command)(args, ctx)
                if command in RUNTIME_CHECKED and isinstance(result, dict):
                    result = {**result, "runtime": runtime.report()}
                if main:
                    finish_success(ctx, command, result)
                status.update(phase=WorkerPhase.DONE, message="done", eta_s=0.0)
                status.event("phase", "done")
        return int(WorkerExit.OK)
    except BaseException as exc:
        code = exit_code_for(exc)
        record = failure_record(run_id, exc, int(code))
        if main:
            write_failed(rd, record)
            with contextlib.suppress(Exception):
                if isinstance(status, NullStatus):  # failed before the writer existed
                    status = StatusWriter(rd, run_id, stage)
                status.update(phase=WorkerPhase.FAILED, message=record.reason[:500])
                status.event("error", record.reason, error_type=record.error_type)
                status.stop()
        print(
            f"[worker] FAILED ({record.error_type}, exit {int(code)}): {record.reason}",
            file=sys.stderr,
            flush=True,
        )
        if not isinstance(exc, (WorkerError, Interrupted, KeyboardInterrupt)):
            print(record.traceback_tail, file=sys.stderr, flush=True)
        return int(code)
