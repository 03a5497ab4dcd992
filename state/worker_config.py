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
#: which tokenizer implementation loads: "hf" = the HF files (tokenizer.json/tokenizer_config.json)
#: even where a `tekken.json` and `mistral_common` would make transformers 5 pick its
#: MistralCommonBackend; "mistral-common" = that backend (tekken.json required); "auto" =
#: whatever transformers picks (`AutoTokenizer.from_pretrained(mistral_format=None)`).
TokenizerBackend = Literal["auto", "hf", "mistral-common"]


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
    tokenizer_backend: TokenizerBackend = "hf"
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
    #: start every context with BOS: None = what the tokenizer does by default (whether
    #: `tokenizer("x")` starts with its BOS), as lm-evaluation-harness >= 0.4.9.2 with its
    #: default add_bos_token=None; true/false = the stage's rule (lm-eval's
    #: add_bos_token=True/False). metrics.json records the rule applied and where it came from.
    add_bos: bool | None = None
    #: contexts are left-truncated to this many tokens; None = the model's own limit
    #: (max_position_embeddings, capped by the tokenizer's model_max_length when that is set).
    max_length: int | None = Field(None, ge=8)  # type: ignore[assignment]


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
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="step checkpoints kept; pruned before each save, so at most "
        "max(keep_checkpoints, 2) are on disk while one is written (worker.checkpoints)",
    )
    final_weights_only: bool = Field(
        True,
        description="checkpoints/final holds the weights and tokenizer only (no optimizer "
        "state): what stage 4 loads, a third of a step checkpoint with fp32 AdamW",
    )
    #: SFT formatting (worker.data): the tokenizer's chat template only when asked (recorded in
    #: spec.json like every arg); otherwise the plain role format of worker.data's docstring.
    chat_template: bool = Field(
        False, description="render SFT rows with the tokenizer's chat template (it must have one)"
    )
    #: Rows whose prompt + response exceed max_length. Default `drop`: a row trained on is one
    #: the researcher wrote; cutting a prompt's left end usually cuts its instruction or system
    #: turn (no_robots puts them first), which teaches answers to text the model never saw.
    #: The counts dropped/cut go to events and summary.json.
    long_rows: Literal["drop", "truncate_prompt_left", "error"] = Field(
        "drop",
        description="rows longer than max_length: drop them, cut the prompt's left end (the "
        "response is never cut), or fail the stage",
    )
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
