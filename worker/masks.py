"""Attention masks of the study: `causal`, `prefix` and `full_bidir`, in the form each attention
implementation needs, with padding folded in.

Every mask starts as one dense boolean tensor `allowed[b, q, k]` (True = query q may attend to key
k), built by `allowed_matrix`; the implementation-specific forms derive from it:

    sdpa            bool (B, 1, Q, K)                   True = attend
    eager           additive float (B, 1, Q, K)         0 = attend, dtype-min = masked
    flex_attention  BlockMask over the same bool tensor (CUDA only: see `check_impl`)

A 4D mask handed to a transformers model is used as it is (no padding merge, no check), so the
padding must already be in it, and a bool mask given to `eager` would be silently wrong: that is
why the form is chosen here from the implementation and never by the caller.

`prompt_lens[b]` counts the real (non-padding) prompt tokens of row b; the row's real tokens are
contiguous (right or left padding). Padded query rows still see one key (themselves), so no row
of the softmax is all-masked (NaN on some SDPA kernels); their outputs are never used.

`forward` is the one entry the trainer, the evaluator and the probe call: it builds the mask,
position ids (left padding aware), runs the model and checks, through a hook on every attention
module, that the mask object that reached attention is the one built here (no silent causal
fallback).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from state.errors import WorkerError
from state.phases import MaskMode

SUPPORTED_IMPLS = ("sdpa", "eager", "flex_attention")


def check_impl(impl: str, device: torch.device | str | None = None) -> None:
    """Refuse an attention implementation that cannot honour a custom mask."""
    if impl.startswith("flash_attention") or impl.startswith("kernels-community/flash"):
        raise WorkerError(
            f"attention implementation {impl!r} cannot take a custom (prefix) attention mask",
            hint="use attn_implementation = 'sdpa' (or 'flex_attention' on CUDA)",
        )
    if impl not in SUPPORTED_IMPLS:
        raise WorkerError(
            f"unknown attention implementation {impl!r}",
            hint=f"use one of {', '.join(SUPPORTED_IMPLS)}",
        )
    if impl == "flex_attention" and device is not None and torch.device(device).type != "cuda":
        # Measured with torch 2.13 CPU: transformers always torch.compile()s flex_attention, and
        # inductor's CPU flex kernel returned NaN or failed to compile for non-128-multiple
        # lengths. Refuse rather than train on garbage.
        raise WorkerError(
            "flex_attention needs a CUDA device (its compiled CPU kernel gives wrong results here)",
            hint="use attn_implementation = 'sdpa' on CPU",
        )


def _as_mode(mode: MaskMode | str) -> MaskMode:
    try:
        return MaskMode(mode)
    except ValueError as exc:
        raise WorkerError(
            f"unknown mask mode {mode!r}",
            hint=f"use one of {', '.join(m.value for m in MaskMode)}",
        ) from exc


def row_starts(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the first real token of each row (0 for right padding)."""
    am = attention_mask.to(torch.bool)
    if not bool(am.any(dim=1).all()):
        raise WorkerError("a batch row has no real tokens (attention_mask all zero)")
    return am.to(torch.int64).argmax(dim=1)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so a left-padded row gets the same positions (and
    rotary phases) as the unpadded row. Padding positions are clamped to 0; never attended."""
    am = attention_mask.to(torch.int64)
    return (am.cumsum(dim=1) - 1).clamp(min=0)


def _check_prompt_lens(prompt_lens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.int64, device=attention_mask.device)
    if prompt_lens.shape != (attention_mask.shape[0],):
        raise WorkerError(
            f"prompt_lens has shape {tuple(prompt_lens.shape)}, expected ({attention_mask.shape[0]},)"
        )
    n_real = attention_mask.to(torch.int64).sum(dim=1)
    if bool((prompt_lens < 0).any()) or bool((prompt_lens > n_real).any()):
        raise WorkerError("a prompt length is negative or longer than its row's real tokens")
    return prompt_lens


def allowed_matrix(
    attention_mask: torch.Tensor, prompt_lens: torch.Tensor, mode: MaskMode | str
) -> torch.Tensor:
    """Dense bool (B, T, T): True where query q may attend to key k.

    causal: k <= q. prefix: also every prompt token sees every prompt token. full_bidir: every
    real token sees every real token. Padding keys are never visible to real queries.
    """
    mode = _as_mode(mode)
    am = attention_mask.to(torch.bool)
    bsz, t = am.shape
    prompt_lens = _check_prompt_lens(prompt_lens, attention_mask)
    idx = torch.arange(t, device=am.device)
    q = idx.view(1, t, 1)
    k = idx.view(1, 1, t)
    key_real = am.view(bsz, 1, t)
    if mode is MaskMode.FULL_BIDIR:
        allowed = key_real.expand(bsz, t, t).clone()
    else:
        allowed = (k <= q) & key_real
        if mode is MaskMode.PREFIX:
            start = row_starts(am).view(bsz, 1)
            # [start, start + prompt_len): a half-open range of token indices. Writing the end as
            # `<= start + prompt_len` is the classic off-by-one that shows the prompt the first
            # response token; check_no_leak exists to catch exactly that.
            in_prompt = (idx.view(1, t) >= start) & (
                idx.view(1, t) < start + prompt_lens.view(bsz, 1)
            )
            allowed = allowed | (in_prompt.view(bsz, t, 1) & in_prompt.view(bsz, 1, t))
    # padded query rows see exactly one key, themselves: never an empty softmax row (NaN)
    pad_q = ~am
    if bool(pad_q.any()):
        eye = torch.eye(t, dtype=torch.bool, device=am.device).view(1, t, t)
        allowed = (allowed & am.view(bsz, t, 1)) | (pad_q.view(bsz, t, 1) & eye)
    return allowed


@dataclass(frozen=True)
class BuiltMask:
    """A mask in the form `impl` needs (`value`), and the dense bool it was made from."""

    value: Any  # torch.Tensor (4D) or a torch BlockMask
    allowed: torch.Tensor  # (B, Q, K) bool
    impl: str


def to_impl_form(allowed: torch.Tensor, impl: str, dtype: torch.dtype = torch.float32) -> Any:
    """Convert a dense bool (B, Q, K) into what the attention implementation consumes."""
    check_impl(impl)
    if impl == "sdpa":
        return allowed[:, None, :, :]
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return torch.where(allowed[:, None, :, :], zero, neg)
    # lazy, for start-up time: pulls in torch
    from torch.nn.attention.flex_attention import create_block_mask

    dense = allowed.contiguous()

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return dense[b, q_idx, kv_idx]

    bsz, q_len, kv_len = dense.shape
    return create_block_mask(mask_mod, bsz, None, q_len, kv_len, device=dense.device)


def build_mask(
    attention_mask: torch.Tensor,
    prompt_lens: torch.Tensor,
    mode: MaskMode | str,
    impl: str,
    dtype: torch.dtype = torch.float32,
) -> BuiltMask:
    """The mask for a full forward of a padded batch, in `impl`'s form."""
    allowed = allowed_matrix(attention_mask, prompt_lens, mode)
    return BuiltMask(value=to_impl_form(allowed, impl, dtype), allowed=allowed, impl=impl)


def dense_allowed(mask: Any) -> torch.Tensor:
    """Recover the dense bool (B, Q, K) from any form this module builds."""
    if isinstance(mask, BuiltMask):
        return mask.allowed
    if isinstance(mask, torch.Tensor):
        m = mask[:, 0] if mask.dim() == 4 else mask
        if m.dtype == torch.bool:
            return m
        return m > torch.finfo(m.dtype).min / 2
    raise WorkerError(f"cannot inspect a mask of type {type(mask).__name__}; pass the BuiltMask")


def check_no_leak(mask: Any, prompt_lens: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Structural leakage guard: raise WorkerError unless the only attention to a later position
    is from a prompt token to a prompt token, and no real token sees a padding token.

    That rule is sufficient: information about a response token at index j can only reach an
    earlier position through an edge into j from before it, and only prompt keys may be seen
    from before. It catches `full_bidir` and the prefix off-by-one (prompt seeing the first
    response token) alike.
    """
    allowed = dense_allowed(mask).to(attention_mask.device)
    am = attention_mask.to(torch.bool)
    bsz, t = am.shape
    if allowed.shape != (bsz, t, t):
        raise WorkerError(
            f"mask shape {tuple(allowed.shape)} does not match the batch ({bsz}, {t}, {t})"
        )
    prompt_lens = _check_prompt_lens(prompt_lens, attention_mask)
    idx = torch.arange(t, device=am.device)
    start = row_starts(am).view(bsz, 1)
    in_prompt = (idx.view(1, t) >= start) & (idx.view(1, t) < start + prompt_lens.view(bsz, 1))
    real_q = am.view(bsz, t, 1)
    future = idx.view(1, 1, t) > idx.view(1, t, 1)
    ok_future = in_prompt.view(bsz, t, 1) & in_prompt.view(bsz, 1, t)
    bad = allowed & real_q & am.view(bsz, 1, t) & future & ~ok_future
    if bool(bad.any()):
        b, q, k = (int(x) for x in bad.nonzero()[0])
        s, p = int(start[b, 0]), int(prompt_lens[b])
        raise WorkerError(
            f"label leakage in the attention mask: row {b} position {q - s} "
            f"({'prompt' if q - s < p else 'response'}) can attend to later position {k - s} "
            f"(prompt length {p}); {int(bad.sum())} such pairs",
            hint="train with mask 'prefix' or 'causal'; full_bidir lets tokens see their labels",
        )
    pad_seen = allowed & real_q & ~am.view(bsz, 1, t)
    if bool(pad_seen.any()):
        b, q, k = (int(x) for x in pad_seen.nonzero()[0])
        raise WorkerError(f"attention mask lets real token {q} of row {b} see padding token {k}")


# ---------------------------------------------------------------------------------------------
# Runtime check: the mask that reaches attention is the mask built here.


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder (named `...self_attn` in HF decoders)."""
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


class _MaskProbe:
    """Records the `attention_mask` object each attention module receives."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = attention_modules(model)
        if not self.modules:
            raise WorkerError(
                f"cannot find the attention modules of {type(model).__name__} to verify the mask",
                hint="only decoders whose attention modules are named 'self_attn' are supported",
            )
        self.seen: list[Any] = []
        for m in self.modules:
            m.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if "attention_mask" in kwargs:
            self.seen.append(kwargs["attention_mask"])
        elif len(args) >= 3:
            self.seen.append(args[2])
        else:
            self.seen.append(None)


def _probe_for(model: torch.nn.Module) -> _MaskProbe:
    probe = getattr(model, "_orch_mask_probe", None)
    if probe is None:
        probe = _MaskProbe(model)
        model._orch_mask_probe = probe  # type: ignore[assignment]
    return probe


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DDP/compile wrapper (config and parameters live there)."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module  # type: ignore[assignment]
    return model


def model_impl(model: torch.nn.Module) -> str:
    return str(getattr(unwrap(model).config, "_attn_implementation", None) or "eager")


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x names the cache argument `cache`; 4.x `past_key_values`."""
    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_with_mask(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: Any,
    position_ids: torch.Tensor,
    **kwargs: Any,
) -> Any:
    """Run `model` with a prepared mask and verify that every attention module received exactly
    that object (a mask dropped or rebuilt by the model would be a silent causal fallback)."""
    probe = _probe_for(model)
    probe.seen = []
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
    if not probe.seen:
        raise WorkerError("no attention module ran during the forward; cannot verify the mask")
    if any(seen is not mask for seen in probe.seen):
        kinds = {type(s).__name__ for s in probe.seen}
        raise WorkerError(
            f"the attention mask reaching the model is not the one built ({', '.join(sorted(kinds))}); "
            "the model rebuilt or dropped it",
            hint="use a decoder whose attention takes a 4D mask as is (Llama/Mistral family)",
        )
    return out


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lens: torch.Tensor,
    mode: MaskMode | str,
    impl: str | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Logits (B, T, V) of a padded batch under `mode`; the one call trainer/evaluator/probe use.

    `impl` defaults to the model's configured attention implementation and must match it: the
    mask's form depends on it.
    """
    configured = model_impl(model)
    impl = impl or configured
    if impl != configured:
        raise WorkerError(
            f"mask built for {impl!r} but the model runs {configured!r} attention",
            hint="load the model with the attn_implementation the run asks for",
        )
    check_impl(impl, input_ids.device)
    _check_sliding_window(unwrap(model), input_ids.shape[1])
    dtype = next(unwrap(model).parameters()).dtype
    built = build_mask(attention_mask.to(input_ids.device), prompt_lens, mode, impl, dtype)
    out = run_with_mask(
        model,
        input_ids,
        built.value,
        position_ids_for(attention_mask).to(input_ids.device),
        **kwargs,
    )
    return out.logits


def _check_sliding_window(model: torch.nn.Module, length: int) -> None:
    window = getattr(model.config, "sliding_window", None)
    if window is not None and length > int(window):
        raise WorkerError(
            f"sequence length {length} exceeds the model's sliding window {window}; "
            "a custom 4D mask would silently drop the window",
            hint=f"set max_length <= {window}",
        )


#: what the self-check feeds at most: 2 rows of this many tokens
CHECK_LEN = 16


def ordinary_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of the tokenizer's ordinary vocabulary: not a special token (`all_special_ids`,
    added tokens marked special) and not below the number of special tokens (Tekken keeps its
    first 1000 ids for reserved control tokens, not all of them named)."""
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(added, Mapping):  # MistralCommonBackend has none (a method there); its
        # all_special_ids are the whole reserved block already
        special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    n = min(int(vocab_size), len(tokenizer))
    return [i for i in range(len(special), n) if i not in special]


def _live_embedding_ids(model: torch.nn.Module, vocab: int) -> list[int]:
    """Ids whose input-embedding rows are not degenerate (norm at least half the median): the
    fallback when neither data nor a tokenizer is at hand. All-zero reserved rows drop out."""
    emb = unwrap(model).get_input_embeddings()
    norms = emb.weight.detach()[:vocab].float().norm(dim=1).cpu()
    keep = (norms >= 0.5 * norms.median()) & (norms > 0)
    return [int(i) for i in keep.nonzero().flatten()]


def _check_batch(
    model: torch.nn.Module,
    vocab: int,
    sample: list[list[int]] | None,
    tokenizer: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(ids, attention_mask, prompt_lens, where the tokens came from) for `verify_mask_path`:
    2 rows, the second right-padded, prompts of about half of each row."""
    rows = [list(r[:CHECK_LEN]) for r in (sample or []) if len(r) >= 4 and max(r) < vocab]
    rows.sort(key=len, reverse=True)  # stable: the longest rows, in data order
    source = "data"
    if not rows:
        live = _live_embedding_ids(model, vocab)
        alive = set(live)
        pool = (
            [i for i in ordinary_ids(tokenizer, vocab) if i in alive]
            if tokenizer is not None
            else []
        )
        source = "tokenizer vocabulary"
        if len(pool) < 8:
            pool, source = live, "embedding rows"
        if len(pool) < 2:
            raise WorkerError("cannot pick tokens for the mask self-check: no usable vocabulary")
        gen = torch.Generator().manual_seed(0)
        picks = torch.randint(0, len(pool), (2, 12), generator=gen)
        rows = [[pool[int(i)] for i in row] for row in picks]
    first = rows[0]
    second = rows[1] if len(rows) > 1 else list(first)
    if len(second) == len(first) and len(second) >= 7:
        second = second[: len(second) - 3]  # one right-padded row
    width = len(first)
    ids = torch.full((2, width), int(first[0]), dtype=torch.long)
    am = torch.zeros((2, width), dtype=torch.long)
    for b, r in enumerate((first, second)):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        am[b, : len(r)] = 1
    plens = torch.tensor([min(len(r) - 1, max(2, len(r) // 2)) for r in (first, second)])
    return ids, am, plens, source


def verify_mask_path(
    model: torch.nn.Module,
    vocab_size: int | None = None,
    *,
    sample: list[list[int]] | None = None,
    tokenizer: Any = None,
) -> str:
    """One-off numeric check on a small batch of real tokens (a full and a right-padded row):

    1. causal mode through our mask equals the model's own default (2D mask) forward;
    2. prefix mode differs from causal at the prompt positions that gain keys (all but the last
       prompt token), so the model really uses the custom mask (a silent causal fallback would
       make them equal).

    The tokens: `sample`, token-id rows from the stage's own data (tokenized eval questions or
    SFT rows); else ids drawn from `tokenizer`'s ordinary vocabulary (`ordinary_ids`) whose
    input-embedding rows are not degenerate; else any such ids. Never low ids as such: in Mistral's Tekken
    vocabulary ids < 1000 are reserved special tokens whose embedding rows may be all zero, and
    then the logits are the same under any mask, so a correct model would fail check 2.
    Returns where the tokens came from ("data", "tokenizer vocabulary", "embedding rows").
    """
    device = next(model.parameters()).device
    vocab = int(vocab_size or unwrap(model).config.vocab_size)
    ids, am, plens, source = _check_batch(model, vocab, sample, tokenizer)
    ids, am, plens = ids.to(device), am.to(device), plens.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = forward(model, ids, am, plens, MaskMode.CAUSAL)
            ref = model(input_ids=ids, attention_mask=am).logits
            prefix = forward(model, ids, am, plens, MaskMode.PREFIX)
    finally:
        model.train(was_training)
    real = am.bool()
    diff = (ours.float() - ref.float()).abs()[real]
    pos = torch.arange(ids.shape[1], device=device)
    gains = pos[None, :] < (plens[:, None] - 1)  # prompt positions that see more under prefix
    moved = (prefix.float() - ours.float()).abs()[gains]
    if ours.dtype == torch.float32:
        tol = 1e-3 * (1.0 + ref.float().abs().max().item())  # deep models sum more rounding
        bad_causal, bad_prefix = diff.max().item() > tol, moved.max().item() <= tol
    else:
        # bf16/fp16: kernels differ in rounding (the default path may take SDPA's is_causal
        # flash kernel), so compare the causal mismatch with the size of a real mask change
        bad_prefix = moved.mean().item() <= 1e-3
        bad_causal = diff.mean().item() > 0.2 * max(moved.mean().item(), 1e-3)
    if bad_causal:
        raise WorkerError(
            f"causal mask through the custom path differs from the model's own causal forward "
            f"(max |diff| {diff.max().item():.3g}); the mask is not consumed as built"
        )
    if bad_prefix:
        raise WorkerError(
            "prefix mask gave the same logits as causal at prompt positions: the model ignores "
            f"the custom mask (silent causal fallback; tokens from the {source})"
        )
    return source
