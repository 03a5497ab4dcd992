"""Typed stage specs: what a stage runs, what it needs, what it makes, and its limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from state.models import Resources, WorkerTask


class InputRef(BaseModel):
    """An input produced by another stage: `artifact` under that stage's latest succeeded run.

    At launch it resolves to `runs/<stage_dir>/<run_id>/<artifact>` on the same target, and is
    written into the worker args at `arg` (e.g. `model`), so the checkpoint never travels
    through the laptop.
    """

    model_config = ConfigDict(extra="forbid")
    stage: str
    artifact: str = "checkpoints/final"
    arg: str = "model"


class StageSpec(BaseModel):
    """One stage of the study, fully resolved for a profile (overrides applied)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    stage_dir: str
    description: str = ""
    task: WorkerTask
    inputs: list[InputRef] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)  # files the run must produce
    timeout_s: float = 9 * 3600  # the seed's TIMEOUT_SECS
    stale_after_s: float = 300
    #: Poll this stage's target at least this often while it runs (None: the target's own
    #: `[monitor] interval_s`); e.g. a short stage whose failure should page within a second.
    poll_interval_s: float | None = Field(None, gt=0)
    resources: Resources = Field(default_factory=Resources)
    nproc_per_node: int = 1
    #: Slurm nodes of the job (`--nodes`), one torchrun agent on each; > 1 on a slurm target only.
    nodes: int = Field(1, ge=1)
    #: torchrun agents a node (`--ntasks-per-node`): 1 on a real cluster; 2 on one node stands in
    #: for two nodes on the test cluster (CPU only: the agents would share the node's GPUs).
    tasks_per_node: int = Field(1, ge=1)
    local_only: bool = False  # e.g. `report`: runs on the laptop, not on a target

    @property
    def tasks(self) -> int:
        """Slurm tasks of the job, one torchrun agent each (1: the single-node path)."""
        return self.nodes * self.tasks_per_node

    @property
    def depends_on(self) -> list[str]:
        return [i.stage for i in self.inputs]
