"""Experiment profiles: which model, data, sizes and resources the study's stages use.

A profile holds everything that differs between "the whole study on a 2-core laptop in minutes"
(`tiny`, the embedded default) and "the real study on a rented GPU" (`ministral-3b`). The stage
table in `jobs.stages` is the same for both; a stage is a profile plus the stage's own mask,
inputs and flags. `orch.toml` picks the profile (`[experiment] profile = "ministral-3b"`), and
`--set KEY=VALUE` overrides single keys (see `jobs.overrides`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from state.errors import ConfigError
from state.models import Resources
from state.worker_config import TaskSource


class Profile(BaseModel):
    """One experiment profile. Arg dicts are validated by the worker's models at resolve time."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    model: str = Field(description="the base model of stages 1, 2, 3A, 3B")
    #: args every worker command takes (dtype, attention implementation, device, max_length...)
    common: dict[str, Any] = Field(default_factory=dict)
    eval_tasks: list[TaskSource]
    eval: dict[str, Any] = Field(default_factory=dict)  # extra EvalArgs (batch_size, ...)
    train_data: TaskSource
    train_eval_data: TaskSource | None = None
    train: dict[str, Any] = Field(default_factory=dict)  # extra TrainArgs (max_steps, lr, ...)
    eval_resources: Resources = Field(default_factory=Resources)
    train_resources: Resources = Field(default_factory=Resources)
    eval_timeout_s: float = 9 * 3600
    train_timeout_s: float = 9 * 3600  # the seed's TIMEOUT_SECS=32400
    eval_stale_after_s: float = 300
    train_stale_after_s: float = 300
    nproc_per_node: int = 1
    chance: float | None = Field(
        None, description="chance accuracy of the eval tasks, for the report"
    )
    #: The base model is built from the study's seed (`tiny://NAME?seed=S`), so `--seeds` varies
    #: its pre-training too. False for a hub model: its weights are what they are.
    model_follows_seed: bool = False


# --- tiny: the embedded default -----------------------------------------------------------
# The worker's offline tiny model (`tiny://default?seed=S`: a small Mistral-architecture model
# that worker/tiny.py pre-trains from the study seed when first built, then caches) and its
# synthetic tasks, 4 choices each (chance 0.25): `dup` (the item before the repeated one),
# `arith` (addition facts), `succ` (next number in a run).
#
# The tasks are chosen so the study's shape is a property of the design, not of one seed or
# one machine's rounding. `dup` needs each position to know "my token occurred earlier", which
# a causal model computes looking back and a bidirectional prompt corrupts (the first
# occurrence now sees the second), so stage 2 loses accuracy on every seed; arith and succ are
# solved by the last prompt token, whose attention a prefix mask leaves unchanged, and barely
# move. SFT covers all three tasks (`tiny:dup+arith+succ`, other rows than the eval's): prefix-LM
# SFT (3B) teaches the weights to work under the bidirectional prompt, causal SFT (3A) teaches
# nothing about it, and no task is left out to decay. Measured over seeds and CPU kernels:
# docs/RESULTS.md. (The earlier design, SFT on arith with a never-learned `recall` task, showed
# a drop on one machine's build and none on most seeds.)
# Sizes keep the whole study (7 worker stages) to minutes on a 2-core CPU.
TINY_TASKS = ("dup", "arith", "succ")
TINY_SFT_TASK = "dup+arith+succ"

TINY = Profile(
    name="tiny",
    description="tiny offline model and synthetic task on CPU (the embedded default; minutes on a laptop)",
    model="tiny://default",
    common={
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": "sdpa",
        "max_length": 128,
        "heartbeat_s": 2.0,
        "seed": 0,  # the study seed: model build, fine-tune order; `run-all --seeds N` varies it
    },
    eval_tasks=[
        TaskSource(name=t, source=f"tiny:{t}", format="mc", split="test", limit=200)
        for t in TINY_TASKS
    ],
    eval={"batch_size": 32},
    train_data=TaskSource(
        name="mix_sft", source=f"tiny:{TINY_SFT_TASK}", format="sft", split="train"
    ),
    train_eval_data=TaskSource(
        name="mix_sft_val",
        source=f"tiny:{TINY_SFT_TASK}",
        format="sft",
        split="validation",
        limit=128,
    ),
    train={
        "max_steps": 150,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 10,
        "eval_every": 25,
        "eval_batches": 4,
        "save_every": 150,
        "keep_checkpoints": 1,
        "log_every": 5,
        "probe_every": 25,
        "probe_batch_size": 8,
    },
    eval_timeout_s=30 * 60,
    train_timeout_s=30 * 60,
    eval_stale_after_s=120,
    train_stale_after_s=120,
    chance=0.25,
    model_follows_seed=True,
)

# --- ministral-3b: the real study --------------------------------------------------------
# Mistral's Ministral 3 3B base model (3.4B language model + 0.4B vision encoder, BF16 weights,
# Apache-2.0): https://huggingface.co/mistralai/Ministral-3-3B-Base-2512
# The checkpoint is a vision+text `Mistral3ForConditionalGeneration` (model_type "mistral3"; text
# decoder "ministral3": 26 layers, hidden 3072, 32/8 heads, YaRN rope, tied embeddings), which
# AutoModelForCausalLM refuses: the worker loads its text decoder alone as Ministral3ForCausalLM
# (worker.modeling), so stage 3's checkpoints/final is a plain causal LM that stage 4 loads.
# Tested on a tiny local replica in tests/worker/test_ministral_loading.py.
MINISTRAL_3B_ID = "mistralai/Ministral-3-3B-Base-2512"

MINISTRAL_3B = Profile(
    name="ministral-3b",
    description="Ministral 3 3B base on the real multiple-choice benchmarks, bf16 on one GPU",
    model=MINISTRAL_3B_ID,
    common={
        "dtype": "bfloat16",
        "device": "cuda",
        "attn_implementation": "sdpa",
        "max_length": 1024,
        "heartbeat_s": 5.0,
    },
    eval_tasks=[
        # lm-evaluation-harness conventions: ARC on test, the others on validation (their test
        # labels are hidden). PIQA's original repo (ybisk/piqa) is a loading script that
        # datasets>=4 no longer runs; baber/piqa is the same data as parquet, as the harness uses.
        TaskSource(
            name="arc_easy",
            source="hf:allenai/ai2_arc",
            subset="ARC-Easy",
            split="test",
            format="arc",
        ),
        TaskSource(
            name="arc_challenge",
            source="hf:allenai/ai2_arc",
            subset="ARC-Challenge",
            split="test",
            format="arc",
        ),
        TaskSource(
            name="hellaswag", source="hf:Rowan/hellaswag", split="validation", format="hellaswag"
        ),
        TaskSource(name="piqa", source="hf:baber/piqa", split="validation", format="piqa"),
        TaskSource(name="boolq", source="hf:google/boolq", split="validation", format="boolq"),
    ],
    eval={"batch_size": 16},
    # Completion-only SFT on human-written instructions (10k rows; chat `messages` ending with
    # the assistant turn, which the worker's `sft` schema reads; a base model has no chat
    # template, so the prompt is the earlier turns joined by newlines). The response is what
    # the loss sees; the prompt is what stage 3B learns to read bidirectionally.
    train_data=TaskSource(
        name="no_robots", source="hf:HuggingFaceH4/no_robots", split="train", format="sft"
    ),
    train_eval_data=TaskSource(
        name="no_robots_test",
        source="hf:HuggingFaceH4/no_robots",
        split="test",
        format="sft",
        limit=256,
    ),
    train={
        # fp32 master weights, bf16 compute: the trainer autocasts to bf16 on CUDA when the weights
        # are fp32. AdamW on bf16 weights silently drops updates smaller than bf16's resolution,
        # which at lr 1e-5 is most of them.
        "dtype": "float32",
        "max_steps": 2000,
        "batch_size": 8,
        "grad_accum": 4,
        "lr": 1e-5,
        "lr_schedule": "cosine",
        "warmup_steps": 50,
        "weight_decay": 0.0,
        "eval_every": 200,
        "eval_batches": 16,
        "save_every": 500,
        "keep_checkpoints": 2,
        "log_every": 10,
        "probe_every": 200,
        "probe_batch_size": 4,
        "gradient_checkpointing": True,
    },
    # Full fine-tuning of 3.4B parameters with fp32 weights, grads and AdamW state needs
    # ~16 bytes/param (~55 GB) before activations (checkpointed): an 80 GB card (A100/H100).
    # Evaluation in bf16 fits a 24 GB card.
    eval_resources=Resources(gpus=1, min_gpu_ram_gb=24),
    train_resources=Resources(gpus=1, min_gpu_ram_gb=80),
    eval_timeout_s=9 * 3600,
    train_timeout_s=9 * 3600,
    # Loading 8 GB of weights from the hub can take minutes; the worker heartbeats meanwhile,
    # but a slow disk or a long first compile should not read as "hung".
    eval_stale_after_s=900,
    train_stale_after_s=900,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (TINY, MINISTRAL_3B)}
DEFAULT_PROFILE = "tiny"


def get_profile(name: str | None) -> Profile:
    """The profile called `name` (None -> the default); ConfigError listing the known ones."""
    key = name or DEFAULT_PROFILE
    try:
        return PROFILES[key]
    except KeyError:
        raise ConfigError(
            f"unknown experiment profile {key!r}",
            hint=f"known profiles: {', '.join(PROFILES)}; set experiment.profile in orch.toml",
        ) from None
