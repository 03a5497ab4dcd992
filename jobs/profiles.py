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


class Throughput(BaseModel):
    """How fast one GPU model (or `cpu`) runs this profile's stages, in real (non-padding)
    tokens per second, as the worker counts them (`train_tokens_per_second` of summary.json;
    `tokens_forwarded / eval_seconds` of metrics.json). `orch plan` prefers a previous run's
    own numbers (run dirs under `runs/`) and falls back to these."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train_tokens_per_s: float | None = Field(None, gt=0)
    eval_tokens_per_s: float | None = Field(None, gt=0)
    source: str = Field(
        description="where the numbers come from: a run, or how they were estimated"
    )


class PlanHints(BaseModel):
    """What `orch plan` needs to know about a profile that its stage args do not say: the
    model's shape (a config.json dict, for `state.footprint`), the size of what is downloaded,
    and the work one stage does."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: The base model's config.json (or the keys of it `state.footprint.ModelShape` reads); a
    #: nested `text_config` is read as the decoder's.
    base_config: dict[str, Any] = Field(default_factory=dict)
    hf_model_gb: float = Field(0.0, ge=0, description="the model's files in the HF cache")
    hf_datasets_gb: float = Field(0.0, ge=0, description="every data set of the study, cached")
    venv_gb: float = Field(
        1.5, ge=0, description="the worker's venv (the image's torch is reused, not installed)"
    )
    setup_s: float = Field(60.0, ge=0, description="per stage: start, download, load")
    eval_tokens: int = Field(0, ge=0, description="real tokens one eval stage forwards")
    train_tokens_per_row: int = Field(0, ge=0, description="mean real tokens of one SFT row")
    #: Keyed by the GPU name as Vast spells it (`H100 SXM`, `RTX 4090`) or `cpu`.
    throughput: dict[str, Throughput] = Field(default_factory=dict)


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
    #: The model's hub repo asks each account to accept its conditions: runs need an `HF_TOKEN`
    #: of an account that did (launch refuses without one; `orch plan` checks it on the hub).
    hub_gated: bool = False
    plan: PlanHints = Field(default_factory=PlanHints)


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
    plan=PlanHints(
        # worker/tiny.py's TinySpec and the config.json it builds (vocab = the task words)
        base_config={
            "model_type": "mistral",
            "vocab_size": 61,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "tie_word_embeddings": True,
        },
        hf_model_gb=0.0005,  # the tiny model's cache dir (~330 KB), nothing from a hub
        hf_datasets_gb=0.0,  # tiny tasks are generated, not downloaded
        venv_gb=0.0,  # the local target uses this interpreter as it is
        setup_s=5.0,
        # measured here (2-core CPU): stage1's metrics.json forwards 5004 tokens; the SFT rows
        # of tiny:dup+arith+succ average 10 real tokens (stage3b: 17395 tok/s at 105 steps/s,
        # batch 16)
        eval_tokens=5004,
        train_tokens_per_row=10,
        throughput={
            "cpu": Throughput(
                train_tokens_per_s=17000,
                eval_tokens_per_s=30000,
                source="measured: tiny study on a 2-core CPU (runs/*/summary.json, metrics.json)",
            )
        },
    ),
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
# Pinned inputs: the hub commit of every repo the study reads, so a rerun reads the same bytes
# (no_robots has renamed its splits once already). Settable like any arg
# (`--set revision=SHA`, `--set data.revision=SHA`, `--set tasks.0.revision=SHA`); recorded in
# each run's spec.json and in the report. `orch plan` checks every one on the hub before a box
# is rented. Where the SHAs come from (no machine here reaches the hub, so none was resolved
# here): the data sets' are the commits other public evaluation code pins for these repos (the
# same five SHAs recur across independent projects); the model's is the commit whose README
# carries the `extra_gated_description` (its raw/blame pages at that SHA, seen on a hub mirror).
MINISTRAL_3B_REVISION = "a9edf793a71806359fd534d28ef75f7cdb68bf16"
DATASET_REVISIONS = {
    "allenai/ai2_arc": "210d026faf9955653af8916fad021475a3f00453",
    "Rowan/hellaswag": "218ec52e09a7e7462a5400043bb9a69a41d06b76",
    "baber/piqa": "142f6d7367fd9877f0fb3b5734ea6a545f54cdd1",
    "google/boolq": "35b264d03638db9f4ce671b711558bf7ff0f80d5",
    "HuggingFaceH4/no_robots": "e6f9a4ac5c37faeb744ba9ecf0473184d7f8105b",
}


def _pinned(src: TaskSource) -> TaskSource:
    """`src` with the pinned revision of its hub data set (unchanged when none is pinned)."""
    repo = src.source.removeprefix("hf:")
    rev = DATASET_REVISIONS.get(repo) if src.source.startswith("hf:") else None
    return src.model_copy(update={"revision": rev}) if rev else src


# The published text_config of the checkpoint (config.json), the part the footprint reads.
MINISTRAL_3B_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "ministral3",
    "vocab_size": 131072,
    "hidden_size": 3072,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": True,
}

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
        "revision": MINISTRAL_3B_REVISION,
    },
    eval_tasks=[
        _pinned(t)
        for t in [
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
                name="hellaswag",
                source="hf:Rowan/hellaswag",
                split="validation",
                format="hellaswag",
            ),
            TaskSource(name="piqa", source="hf:baber/piqa", split="validation", format="piqa"),
            TaskSource(name="boolq", source="hf:google/boolq", split="validation", format="boolq"),
        ]
    ],
    # max_length None: contexts are cut to the model's own limit, as lm-eval does (the
    # benchmark questions are far shorter; the 1024 of `common` is the SFT rows' length)
    eval={"batch_size": 16, "max_length": None},
    # Completion-only SFT on human-written instructions (10k rows; chat `messages` ending with
    # the assistant turn, which the worker's `sft` schema reads; a base model has no chat
    # template, so the prompt is the earlier turns joined by newlines). The response is what
    # the loss sees; the prompt is what stage 3B learns to read bidirectionally.
    train_data=_pinned(
        TaskSource(
            name="no_robots", source="hf:HuggingFaceH4/no_robots", split="train", format="sft"
        )
    ),
    train_eval_data=_pinned(
        TaskSource(
            name="no_robots_test",
            source="hf:HuggingFaceH4/no_robots",
            split="test",
            format="sft",
            limit=256,
        )
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
        # One step checkpoint (fp32 weights + AdamW moments) is ~41 GB. The worker prunes
        # before it saves, so keeping 2 peaks at two on disk (82 GB), as keeping 1 does (the
        # previous one stays until the new one is complete): 2 costs nothing more and leaves an
        # older one to resume from. `orch plan` shows the numbers.
        "keep_checkpoints": 2,
        # no_robots rows longer than max_length are dropped (counted in events and summary):
        # cutting a prompt's left end would cut its instruction, which comes first.
        "long_rows": "drop",
        "final_weights_only": True,
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
    # The repo asks for its conditions to be accepted (`extra_gated_*` in its model card).
    hub_gated=True,
    plan=PlanHints(
        base_config={"model_type": "mistral3", "text_config": MINISTRAL_3B_TEXT_CONFIG},
        # the checkpoint's safetensors in bf16: 3.43B language model + 0.4B vision encoder
        hf_model_gb=7.8,
        hf_datasets_gb=0.5,  # ARC, HellaSwag, PIQA, BoolQ, no_robots: parquet + arrow cache
        venv_gb=1.5,  # transformers, datasets, ...; the image's torch is kept
        setup_s=300.0,  # first download of 7.8 GB, then loading (cached for later stages)
        # ARC-E 2376 + ARC-C 1172 + HellaSwag 10042 + PIQA 1838 + BoolQ 3270 questions, each
        # context once plus its choices (Tekken tokens, about 150 per question)
        eval_tokens=2_800_000,
        train_tokens_per_row=450,  # no_robots: ~1.7 KB of text per row (16.5 MB / 9500 rows)
        # No GPU was lent to measure these: they are estimates from FLOPs, replaced by a run's
        # own numbers as soon as one exists (`orch plan` reads runs/*/summary.json). Training:
        # 8 x 3.43e9 FLOPs per token (forward, backward, checkpointed recompute) x 1.6 for
        # padding, at 30% of the card's dense bf16 peak; eval: 2 x 3.43e9 x 1.2 at 25%.
        throughput={
            gpu: Throughput(
                train_tokens_per_s=round(peak * 0.30 / (8 * 3.43e9 * 1.6)),
                eval_tokens_per_s=round(peak * 0.25 / (2 * 3.43e9 * 1.2)),
                source=f"estimate: {peak / 1e12:.0f} TFLOP/s bf16 peak, 30%/25% utilisation",
            )
            for gpu, peak in {
                "H200": 989e12,
                "H100 SXM": 989e12,
                "H100 NVL": 835e12,
                "H100 PCIE": 756e12,
                "A100 SXM4": 312e12,
                "A100 PCIE": 312e12,
                "A100X": 312e12,
                "L40S": 362e12,
                "RTX 6000Ada": 364e12,
                "RTX 4090": 165e12,
                "RTX A6000": 155e12,
            }.items()
        },
    ),
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
