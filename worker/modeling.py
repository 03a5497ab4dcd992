"""Load a causal LM and its tokenizer: a hub id, a local directory, a checkpoint directory, or
`tiny://NAME` (built offline by `worker.tiny`).

Device and dtype come from the run's args (`auto` = CUDA and bf16 when there is a GPU, else CPU
and fp32); the attention implementation is set at load time and checked against what a custom
mask needs (`worker.masks.check_impl`). Every failure is a WorkerError that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from state.errors import WorkerError
from state.worker_config import _ModelArgs
from worker import masks, tiny

# Config fields that define the architecture: a checkpoint that differs in any of them is not
# the model the run expects (loading would fail late, or worse, partially).
ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "tie_word_embeddings",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str, local_rank: int | None = None) -> torch.device:
    """`auto` = CUDA when visible, else CPU; `local_rank` picks the GPU of a torchrun rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise WorkerError(
                "device 'cuda' requested but no CUDA GPU is visible",
                hint="use device = 'auto' or 'cpu'",
            )
        return torch.device("cuda", local_rank or 0)
    if device != "cpu":
        raise WorkerError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
    return torch.device("cpu")


resolve_device = pick_device  # the name the trainer uses


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise WorkerError(
            f"unknown dtype {dtype!r}", hint=f"use auto or one of {', '.join(_DTYPES)}"
        )
    return _DTYPES[dtype]


def resolve_model_path(model: str) -> str:
    """`tiny://NAME` -> its cache dir; an existing local path -> its absolute path; else a hub id."""
    if model.startswith(tiny.SCHEME):
        return str(tiny.resolve(model))
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise WorkerError(
                f"model directory {p} has no config.json",
                hint="point `model` at a save_pretrained directory (or a checkpoint's model dir)",
            )
        return str(p.resolve())
    if model.startswith((".", "/", "~")):
        raise WorkerError(f"model directory {model} does not exist")
    return model


def arch_signature(config: Any) -> dict[str, Any]:
    """The architecture-defining fields of a config (object or dict), for comparisons."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return {k: get(k, None) for k in ARCH_FIELDS if get(k, None) is not None}


def check_config_matches(actual: Any, expected: Any, where: str) -> None:
    """Raise WorkerError when a checkpoint's architecture differs from the one the run expects."""
    a, e = arch_signature(actual), arch_signature(expected)
    diffs = [f"{k}: {a.get(k)!r} != expected {e[k]!r}" for k in e if k in a and a[k] != e[k]]
    if diffs:
        raise WorkerError(
            f"{where} was made with a different model config ({'; '.join(diffs)})",
            hint="point the run at a checkpoint of the same model, or start from a fresh run dir",
        )


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def load(
    args: _ModelArgs,
    *,
    training: bool = False,
    local_rank: int | None = None,
    expected_config: Any | None = None,
) -> Loaded:
    """Model (eval mode), tokenizer, device and weight dtype for `args`.

    `training=True` with dtype `auto` keeps fp32 weights on CUDA (the trainer runs bf16
    autocast: AdamW on bf16 weights loses small updates); evaluation gets bf16 weights on CUDA.
    `expected_config` (a config or dict): refuse a model whose architecture differs from it.
    The tokenizer comes from `args.tokenizer` if given, else from the model's directory, and
    always has a pad token (eos, or unk) so batches can be padded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout.log is read by people; no tqdm bars in it
    device = pick_device(args.device, local_rank)
    dtype = pick_dtype(args.dtype, device)
    if training and args.dtype == "auto":
        dtype = torch.float32
    masks.check_impl(args.attn_implementation, device)
    path = resolve_model_path(args.model)
    common: dict[str, Any] = {
        "revision": args.revision,
        "trust_remote_code": args.trust_remote_code,
    }
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except Exception as exc:
        raise WorkerError(
            f"cannot load model config for {args.model!r}: {_one_line(exc)}",
            hint="check the model id or local directory (no hub access: use a local dir or tiny://default)",
        ) from exc
    if expected_config is not None:
        check_config_matches(config, expected_config, f"model {args.model!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=args.attn_implementation, **common
        )
    except Exception as exc:
        raise WorkerError(
            f"cannot load model {args.model!r} with attn_implementation="
            f"{args.attn_implementation!r}: {_one_line(exc)}",
            hint="check the model files, or try attn_implementation 'sdpa' / 'eager'",
        ) from exc
    actual_impl = getattr(model.config, "_attn_implementation", None)
    if actual_impl != args.attn_implementation:
        raise WorkerError(
            f"model {args.model!r} runs {actual_impl!r} attention, not the requested "
            f"{args.attn_implementation!r}"
        )
    tok_path = args.tokenizer or path
    if args.tokenizer and args.tokenizer.startswith(tiny.SCHEME):
        tok_path = str(tiny.resolve(args.tokenizer))
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **common)
    except Exception as exc:
        raise WorkerError(
            f"cannot load tokenizer for {tok_path!r}: {_one_line(exc)}",
            hint="give `tokenizer` explicitly or check the model directory",
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise WorkerError(f"tokenizer of {args.model!r} has no pad, eos or unk token to pad with")
    if len(tokenizer) > model.config.vocab_size:
        raise WorkerError(
            f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}",
            hint="use the tokenizer that belongs to the model",
        )
    model.to(device)
    model.eval()
    return Loaded(model, tokenizer, device, dtype)


def load_model_and_tokenizer(
    args: _ModelArgs, *, expected_config: Any | None = None
) -> tuple[Any, Any, torch.device]:
    """(model in eval mode, tokenizer, device): `load` for evaluation and the probe."""
    loaded = load(args, expected_config=expected_config)
    return loaded.model, loaded.tokenizer, loaded.device


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
