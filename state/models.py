"""Typed models of the run-directory files (`status.json`, events, manifest, markers, spec).

Files written by the worker use `extra="ignore"` so that an older controller can read a newer
worker's files; the schema version lets a reader say "from a newer orch" instead of guessing.
Config-like models (the spec) use `extra="forbid"`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from state.phases import Phase, WorkerPhase

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schema_version: int = SCHEMA_VERSION


class GpuStat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    index: int
    name: str = ""
    util_pct: float | None = None
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None


class RunStatus(_FileModel):
    """`status.json`: rewritten atomically by the worker on every heartbeat/step/eval.

    `seq` only goes up: the controller judges progress by it, never by comparing the clocks of
    two hosts.
    """

    run_id: str
    stage: str
    phase: WorkerPhase = WorkerPhase.STARTING
    seq: int = 0
    pid: int | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    losses: list[float] = Field(default_factory=list)  # recent train losses, newest last
    lr: float | None = None
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    started_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    disk_free_bytes: int | None = None
    gpus: list[GpuStat] = Field(default_factory=list)
    message: str = ""
    leak_flag: bool = False
    #: The first step the leakage probe flagged. The worker's summary.json carries it; the
    #: observer copies it from there when the worker did not set it here.
    first_leak_step: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class Event(_FileModel):
    """One line of `events.jsonl` (append-only)."""

    ts: datetime = Field(default_factory=utcnow)
    kind: Literal[
        "phase",
        "train",
        "eval",
        "probe",
        "checkpoint",
        "metric",
        "warning",
        "error",
        "info",
    ]
    step: int | None = None
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: str  # relative to the run dir, POSIX separators
    size: int
    sha256: str


class Manifest(_FileModel):
    """`manifest.json`: every artifact's size and sha256, written just before `.run_complete`."""

    run_id: str
    created_at: datetime = Field(default_factory=utcnow)
    files: list[ManifestEntry] = Field(default_factory=list)

    def by_path(self) -> dict[str, ManifestEntry]:
        return {f.path: f for f in self.files}


class RunComplete(_FileModel):
    """`.run_complete`: written last, on success only."""

    run_id: str
    finished_at: datetime = Field(default_factory=utcnow)
    manifest_sha256: str = ""


class RunFailed(_FileModel):
    """`.run_failed`: why the run failed (exception type, message, traceback tail)."""

    run_id: str
    failed_at: datetime = Field(default_factory=utcnow)
    reason: str
    error_type: str = ""
    traceback_tail: str = ""
    exit_code: int | None = None


class WorkerTask(BaseModel):
    """What the worker runs: a subcommand and its arguments (validated by the worker)."""

    model_config = ConfigDict(extra="forbid")
    command: Literal["eval", "train", "probe", "exec"]
    args: dict[str, Any] = Field(default_factory=dict)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: int = 0
    min_gpu_ram_gb: float | None = None


class RunSpec(_FileModel):
    """`spec.json`: the resolved stage spec, written at launch. Contains no secrets."""

    model_config = ConfigDict(extra="forbid")
    run_id: str
    stage: str
    stage_dir: str
    profile: str = "tiny"
    task: WorkerTask
    #: Upstream inputs resolved to paths relative to the target's workdir (e.g. a checkpoint).
    inputs: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = 9 * 3600
    stale_after_s: float = 300
    poll_interval_s: float | None = None
    resources: Resources = Field(default_factory=Resources)
    nproc_per_node: int = 1
    #: A Slurm job of `nodes` x `tasks_per_node` torchrun agents (docs/slurm.md "Several nodes").
    nodes: int = 1
    tasks_per_node: int = 1
    git_commit: str | None = None
    git_dirty: bool = False
    target: str = "local"
    launched_by: str = ""
    launched_at: datetime = Field(default_factory=utcnow)
    orch_version: str = ""
    #: Set on an automatic relaunch of a lost run (orchestrator.vast.relaunch): the run it
    #: replaces, the relaunches in its chain so far, and the checkpoint it resumed from.
    relaunch_of: str | None = None
    relaunch_count: int = 0
    resumed_from: str | None = None


class SlurmJob(BaseModel):
    """What Slurm says about a run's batch job (`squeue -t all`), read by the agent on the
    login node in the same round trip as the run dir. `known` is False once the job left
    Slurm's memory (MinJobAge): the run dir is then the only witness. `error` is set when
    Slurm could not be asked (controller down): nothing can be told from it."""

    model_config = ConfigDict(extra="ignore")
    job_id: str
    known: bool = True
    state: str = ""  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...
    reason: str = ""  # why it waits (Resources, Priority, Dependency) or how it ended
    exit_code: int | None = None  # the batch script's exit status (signal deaths: 128+N)
    restarts: int = 0  # requeues so far
    error: str = ""
    dependency: str = ""  # `afterok:11(failed),afterok:12(unfulfilled)`: the graph's edges
    comment: str = ""  # orch's own note: `orch-after 11=STAGE_DIR/RUN_ID ...` (upstream runs)


class RunObservation(BaseModel):
    """Everything the monitor's state machine needs about one run, from one remote poll."""

    model_config = ConfigDict(extra="ignore")
    run_dir: str  # relative to the target workdir: runs/<stage_dir>/<run_id>
    status: RunStatus | None = None
    status_state: Literal["ok", "missing", "unreadable", "newer_schema"] = "missing"
    complete: bool = False
    failed: RunFailed | None = None
    failed_marker: bool = False
    manifest_present: bool = False
    exit_code: int | None = None
    session_alive: bool | None = None
    pid_alive: bool | None = None
    last_events: list[Event] = Field(default_factory=list)
    slurm: SlurmJob | None = None  # runs submitted to a Slurm cluster


class TargetObservation(BaseModel):
    """The answer of one poll of one target: every requested run plus the box itself."""

    model_config = ConfigDict(extra="ignore")
    ok: bool = True
    host_time: datetime = Field(default_factory=utcnow)
    disk_free_bytes: int | None = None
    gpus: list[GpuStat] = Field(default_factory=list)
    runs: list[RunObservation] = Field(default_factory=list)
    error: str = ""


class RunRecord(BaseModel):
    """A run as the controller's store holds it."""

    model_config = ConfigDict(extra="ignore")
    run_id: str
    stage: str
    stage_dir: str
    target: str
    phase: Phase
    session: str
    run_dir: str  # relative to the target workdir
    created_at: datetime
    updated_at: datetime
    reason: str = ""
    exit_code: int | None = None
    last_seq: int | None = None
    last_seq_change_at: datetime | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    unreachable_since: datetime | None = None
    pulled_at: datetime | None = None
    spec_json: str = ""  # the spec as written (no secrets)
    status_json: str = ""  # last status.json seen
    job_id: str = ""  # the Slurm job id of a run on a `slurm` target

    @property
    def key(self) -> str:
        return f"{self.stage_dir}/{self.run_id}"
