"""Load a causal LM and its tokenizer: a hub id, a local directory, a checkpoint directory, or
`tiny://NAME` (built offline by `worker.tiny`).

A vision+text checkpoint whose text decoder is a causal LM (Ministral 3: `Mistral3ForConditional
Generation`, model_type `mistral3` with a `ministral3` text_config, which `AutoModelForCausalLM`
refuses) is loaded text-only: its decoder and LM head become a plain `<Text>ForCausalLM`, so the
masks, the trainer and `save_pretrained` see an ordinary causal LM, and a fine-tuned checkpoint
saved from it loads back through `AutoModelForCausalLM`.

Device and dtype come from the run's args (`auto` = CUDA and bf16 when there is a GPU, else CPU
and fp32); the attention implementation is set at load time and checked against what a custom
mask needs (`worker.masks.check_impl`). Every failure is a WorkerError that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from state.errors import WorkerError
from state.worker_config import _ModelArgs
from worker import masks, runtime, tiny

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


def prebuild(model: str, status: Any) -> None:
    """Build a `tiny://` model now if it is not cached, saying how far along in the status
    message (the live line of `orch launch --wait`) and the run's events, so a first run is
    not a silent minute. Any other model: nothing to do here."""
    if not model.startswith(tiny.SCHEME):
        return

    def say(line: str) -> None:
        status.update(message=line)
        status.event("info", line)

    tiny.resolve(model, progress=say)


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
    """The architecture-defining fields of a config (object or dict), for comparisons; of its
    text decoder's config when it has one (a vision+text checkpoint is compared with the text-only
    checkpoints fine-tuned from it)."""
    text = config.get("text_config") if isinstance(config, dict) else None
    if isinstance(config, dict):
        config = text if isinstance(text, dict) else config
    elif hasattr(config, "get_text_config"):
        config = config.get_text_config()
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
    #: what tokenizer loaded (`tokenizer_info`): recorded in metrics.json
    tokenizer_info: dict[str, Any] = field(default_factory=dict)


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
    # lazy, for start-up time: pulls in transformers
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
    model: Any
    try:
        if _is_causal_lm_config(config):
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=args.attn_implementation, **common
            )
        else:
            model = _load_text_only(path, config, dtype, args.attn_implementation, common)
    except WorkerError:
        raise
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
    backend = getattr(args, "tokenizer_backend", "hf")
    if backend == "mistral-common":
        _check_mistral_common(tok_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **common, **_backend_kwargs(backend))
    except WorkerError:
        raise
    except Exception as exc:
        raise WorkerError(
            f"cannot load tokenizer for {tok_path!r} (tokenizer_backend {backend!r}): "
            f"{_one_line(exc)}",
            hint="give `tokenizer` explicitly or check the model directory"
            + (
                "; 'mistral-common' needs `pip install mistral-common` and a tekken.json"
                if backend == "mistral-common"
                else ""
            ),
        ) from exc
    info = tokenizer_info(tokenizer, backend)
    if backend != "auto" and info["backend"] != backend:
        raise WorkerError(
            f"tokenizer_backend {backend!r} was asked for but {info['class']} loaded",
            hint="set tokenizer_backend to 'auto' to accept whatever transformers picks",
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise WorkerError(f"tokenizer of {args.model!r} has no pad, eos or unk token to pad with")
    if len(tokenizer) > model.config.vocab_size:
        raise WorkerError(
            f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}",
            hint="use the tokenizer that belongs to the model",
        )
    runtime.note_tokenizer(tokenizer)  # the class really loaded: events and the result file
    model.to(device)
    model.eval()
    return Loaded(model, tokenizer, device, dtype, info)


def _backend_kwargs(backend: str) -> dict[str, Any]:
    """The `AutoTokenizer.from_pretrained` kwargs that make the backend choice explicit.

    transformers 5 (transformers/models/auto/tokenization_auto.py: `AutoTokenizer.from_pretrained`
    and `_use_mistral_format`, checked on 5.24): for the Mistral model types (mistral, ministral3,
    mistral3, pixtral...) `mistral_format=None` returns `MistralCommonBackend` whenever
    `mistral_common` is importable and the repo has a `tekken.json`, whatever tokenizer.json and
    tokenizer_config.json say; `mistral_format=False` short-circuits to the HF files and `True`
    forces MistralCommonBackend (ImportError / OSError when it cannot). transformers 4.x has no
    such switch (and never picks mistral-common from AutoTokenizer), so nothing is passed there.
    """
    # lazy, for start-up time: pulls in transformers, tokenizers
    from transformers.models.auto import tokenization_auto

    has_switch = hasattr(tokenization_auto, "_use_mistral_format")
    if backend == "auto":
        return {}
    if backend == "hf":
        return {"mistral_format": False} if has_switch else {}
    if not has_switch:
        # lazy, for start-up time: pulls in transformers
        import transformers

        raise WorkerError(
            f"tokenizer_backend 'mistral-common' needs transformers 5 (have "
            f"{transformers.__version__})",
            hint="use tokenizer_backend 'hf', or upgrade transformers",
        )
    return {"mistral_format": True}


#: transformers' own floor for MistralCommonBackend (`MISTRAL_COMMON_MIN_VERSION`, 5.24)
MISTRAL_COMMON_MIN = "1.11.5"


def _check_mistral_common(tok_path: str) -> None:
    """tokenizer_backend 'mistral-common' can load: the package importable (transformers also
    wants pillow for it, `is_mistral_common_available`) and, for a local directory, a tekken.json
    in it; else one error naming the fix, before transformers' own ImportError / OSError (whose
    fix, `mistral_format=False`, is not a stage setting)."""
    # lazy, for start-up time: pulls in transformers
    from transformers.utils.import_utils import is_mistral_common_available

    if not is_mistral_common_available(MISTRAL_COMMON_MIN):
        raise WorkerError(
            f"tokenizer_backend 'mistral-common' needs the mistral-common package (>= "
            f"{MISTRAL_COMMON_MIN}, with pillow), which is not importable here",
            hint=f"pip install 'mistral-common>={MISTRAL_COMMON_MIN}' pillow, or set "
            "tokenizer_backend 'hf' to use the HF tokenizer files",
        )
    local = Path(tok_path)
    if local.is_dir() and not (local / "tekken.json").is_file():
        raise WorkerError(
            f"tokenizer_backend 'mistral-common' needs a tekken.json, and {local} has none",
            hint="set tokenizer_backend 'hf' to use its tokenizer.json, or point `tokenizer` "
            "at a directory with the model's tekken.json",
        )


def tokenizer_info(tokenizer: Any, requested: str = "hf") -> dict[str, Any]:
    """What loaded, for metrics.json and the checks: its class, whether it is a fast (Rust
    tokenizers) one, the backend family ("mistral-common" or "hf") and the backend asked for."""
    name = type(tokenizer).__name__
    return {
        "class": name,
        "is_fast": bool(getattr(tokenizer, "is_fast", False)),
        "backend": "mistral-common" if name.startswith("MistralCommon") else "hf",
        "requested": requested,
    }


def load_model_and_tokenizer(
    args: _ModelArgs, *, expected_config: Any | None = None
) -> tuple[Any, Any, torch.device]:
    """(model in eval mode, tokenizer, device): `load` for evaluation and the probe."""
    loaded = load(args, expected_config=expected_config)
    return loaded.model, loaded.tokenizer, loaded.device


def _is_causal_lm_config(config: Any) -> bool:
    # lazy, for start-up time: pulls in transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def _load_text_only(
    path: str, config: Any, dtype: torch.dtype, impl: str, common: dict[str, Any]
) -> Any:
    """The text decoder of a vision+text checkpoint as a plain causal LM.

    transformers' own class loads the checkpoint (so its weight-name conversions apply, whatever
    layout the files use); its decoder and LM head are then moved, not copied, into the causal
    LM class of the text config (built on the meta device: no second set of weights), and the
    vision tower is dropped.
    """
    # lazy, for start-up time: pulls in transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    model_type = getattr(config, "model_type", "?")
    if (
        text_config is None
        or text_config is config
        or not _is_causal_lm_config(text_config)
        or type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    ):
        raise WorkerError(
            f"model type {model_type!r} is neither a causal LM nor a vision+text model with a "
            "causal-LM text decoder",
            hint="use a decoder-only causal LM (Llama/Mistral family) or a Mistral3-style "
            "checkpoint",
        )
    full = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=impl, **common
    )
    decoder: Any = full.get_decoder()
    head: Any = full.get_output_embeddings()
    text_config = full.config.get_text_config()
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config, attn_implementation=impl)
    prefix = causal.base_model_prefix
    have, want = type(decoder), type(getattr(causal, prefix, None))
    if have is not want or head is None:
        raise WorkerError(
            f"cannot take the text decoder out of {type(full).__name__}: its decoder is "
            f"{have.__name__}, not the {want.__name__} of {type(causal).__name__}"
        )
    setattr(causal, prefix, decoder)
    causal.lm_head = head
    # one config object, the one the decoder's layers read (attention implementation included)
    causal.config = decoder.config
    tied = head.weight is decoder.get_input_embeddings().weight
    causal.config.tie_word_embeddings = tied  # saved checkpoints must tie exactly as loaded
    causal.config.architectures = [type(causal).__name__]
    causal.generation_config = full.generation_config
    left = [n for n, t in [*causal.named_parameters(), *causal.named_buffers()] if t.is_meta]
    if left:
        raise WorkerError(
            f"text-only load of {type(full).__name__} left {len(left)} tensors unloaded "
            f"({', '.join(left[:3])})"
        )
    causal.name_or_path = full.name_or_path
    return causal


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
