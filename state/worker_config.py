"""Arguments of the worker's subcommands, as typed models both sides share.

`jobs/` builds a `WorkerTask(command, args)` for each stage and validates `--set` overrides
against these models (so a typo fails on the laptop, before a box is rented); the worker parses
the same args from `spec.json`. No torch here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from state.phases import MaskMode

AttnImpl = Literal["sdpa", "eager", "flex_attention"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Schema = Literal["arc", "hellaswag", "piqa", "boolq", "mc", "sft"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSource(_Args):
    """One multiple-choice task (eval) or one SFT data set (train).

    `source`: `tiny:<name>` (built offline, deterministic), `hf:<dataset id>` (Hugging Face
    datasets, `subset`/`split`/`revision` apply), or a local path to `.jsonl`/`.json`/`.parquet` or a
    directory saved with `save_to_disk`. `format` names the schema adapter for the rows (arc, hellaswag, piqa, boolq, mc, sft).
    """

    name: str
    source: str
    format: Schema = "mc"
    subset: str | None = None
    split: str = "test"
    #: `hf:` sources: the dataset repo's commit (or tag/branch) to load; None = the default
    #: branch as it is today (unpinned). Recorded in spec.json with the rest of the args.
    revision: str | None = None
    limit: int | None = Field(None, ge=1)
    seed: int = 0


class _ModelArgs(_Args):
    model: str = Field(
        "tiny://default", description="hub id, local dir, tiny://NAME, or a checkpoint dir"
    )
    tokenizer: str | None = None
    revision: str | None = None
    attn_implementation: AttnImpl = "sdpa"
    dtype: DType = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    device: Device = "auto"
    max_length: int = Field(512, ge=8)
    seed: int = 1234
    heartbeat_s: float = Field(5.0, gt=0)
    trust_remote_code: bool = False


class EvalArgs(_ModelArgs):
    """`python -m worker eval`: multiple-choice log-likelihood evaluation."""

    tasks: list[TaskSource] = Field(default_factory=list)
    mask: MaskMode = MaskMode.CAUSAL
    batch_size: int = Field(16, ge=1)
    shared_context: bool = True  # encode the context once per question


class TrainArgs(_ModelArgs):
    """`python -m worker train`: completion-only SFT with a mask mode."""

    data: TaskSource
    eval_data: TaskSource | None = None
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    mask: MaskMode = MaskMode.CAUSAL
    allow_leaky: bool = False  # full_bidir only when reproducing the seed's failed run on purpose
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    save_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    probe_every: int = Field(50, ge=1)
    probe_batch_size: int = Field(8, ge=1)
    leak_ratio: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="reported only: whether mask loss < ratio * causal loss (the seed's rule); "
        "the leak verdict is the counterfactual (worker.probe)",
    )
    structural_check: bool = Field(
        True, description="guard (a) before training; false only to test the numeric probe alone"
    )
    gradient_checkpointing: bool = False
    wandb: bool = False
    wandb_project: str | None = None


class ProbeArgs(_ModelArgs):
    """`python -m worker probe`: loss under a mask vs causal loss, and the counterfactual (do
    the predictions of labels change when later tokens do?), same weights and samples."""

    data: TaskSource
    mask: MaskMode = MaskMode.PREFIX
    samples: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    leak_ratio: float = Field(0.5, gt=0, lt=1)


class ExecArgs(_Args):
    """`exec`: run an arbitrary argv as a stage (for ad-hoc stages and tests)."""

    argv: list[str]


ARGS_BY_COMMAND: dict[str, type[_Args]] = {
    "eval": EvalArgs,
    "train": TrainArgs,
    "probe": ProbeArgs,
    "exec": ExecArgs,
}
