"""Multiple-choice evaluation by log-likelihood (lm-evaluation-harness conventions).

Each choice is scored by the summed log-probability of its continuation tokens given the
context (`data.encode_pair`: trailing context spaces move to the continuation; continuation
tokens are enc(ctx + cont)[len(enc(ctx)):]). `acc` = argmax of that score; `acc_norm` = argmax of
score / len(choice in characters, without the one delimiter space). Per task and macro;
`lm_eval_metrics` names, per task, the metrics lm-evaluation-harness reports for it.

As lm-evaluation-harness's HFLM (0.4.13, the dev extra's pin; tests/worker/
test_lm_eval_equality.py checks equal per-choice log-likelihoods and acc/acc_norm against it): a
BOS starts the context only when the stage's `add_bos` says so, or, unset, when the tokenizer
adds one by default (`resolve_add_bos`). `add_bos` true/false is lm-eval's
`add_bos_token=True/False`; unset is lm-eval's default `add_bos_token=None`, the tokenizer's own
default (since 0.4.9.2; 0.4.9's default was False: no BOS). Contexts are left-truncated
to the model's own limit (`context_limit`), not a fixed length. metrics.json records the BOS
rule, the limit, where each came from, and the tokenizer that loaded.

Masks: `causal`, or `prefix` = the context is bidirectional, the continuation causal over the
context and itself.

Shared context (default): the context is encoded ONCE per question and shared by its choices:
  1. context pass over the (left-padded) contexts, under the mode's mask, filling a KV cache;
     its last real position gives the log-probs of every choice's first token;
  2. the cache is repeated per choice (`Cache.reorder_cache`) and each continuation (minus its
     last token) runs causally on top, with a mask over [context slots | continuation slots]
     and position ids that continue the context's.
In prefix mode this is exactly the prefix-masked forward of context + continuation: context
positions attend only to context positions either way, so their keys/values are the same, and
continuation positions attend causally to everything before them. Tests check the equality
against `shared_context=False` (one full forward per choice).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from state.errors import WorkerError
from state.phases import MaskMode, WorkerPhase
from state.worker_config import EvalArgs
from worker import masks, modeling
from worker.data import McExample, encode_pair, load_mc_task

#: on_progress(questions done, questions in all, real tokens forwarded so far): called once
#: before the first batch and after every batch; `done` and the tokens only go up.
ProgressFn = Callable[[int, int, int], None]
EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class Question:
    ctx: list[int]
    conts: list[list[int]]
    label: int
    char_lens: list[int]


@dataclass
class Counter:
    positions: int = 0  # padded positions fed to the model (what compute scales with)
    tokens: int = 0  # real tokens fed


#: The metrics of each schema that lm-evaluation-harness (0.4.13) reports for the same task, from
#: its task YAMLs' `metric_list` (lm_eval/tasks/arc/arc_easy.yaml, arc_challenge.yaml includes it;
#: hellaswag/hellaswag.yaml; piqa/piqa.yaml; super_glue/boolq/default.yaml: `acc` only). The
#: worker's own `mc` rows (tiny tasks, local files) have no lm-eval counterpart.
LM_EVAL_METRICS: dict[str, list[str]] = {
    "arc": ["acc", "acc_norm"],
    "hellaswag": ["acc", "acc_norm"],
    "piqa": ["acc", "acc_norm"],
    "boolq": ["acc"],
    "mc": [],
}

#: lm-eval's HFLM._DEFAULT_MAX_LENGTH: the limit when neither the config nor the tokenizer says
DEFAULT_MAX_LENGTH = 2048


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts an encoding with its BOS by default, i.e. whether
    `tokenizer("x")` (add_special_tokens=True) begins with `bos_token_id`."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_add_bos(tokenizer: Any, requested: bool | None) -> tuple[bool, str]:
    """(add BOS, where that came from: "stage" or "tokenizer default")."""
    if requested is None:
        return tokenizer_adds_bos(tokenizer), "tokenizer default"
    if requested and getattr(tokenizer, "bos_token_id", None) is None:
        raise WorkerError(
            "add_bos is true but the tokenizer has no BOS token",
            hint="leave add_bos unset (the tokenizer's default) or set it to false",
        )
    return bool(requested), "stage"


def context_limit(model: Any, tokenizer: Any, requested: int | None) -> tuple[int, str]:
    """(max tokens a context + continuation may feed, where that came from).

    The stage's `max_length` when set; else the model's `max_position_embeddings` (of the text
    config for a nested one; `n_positions`/`n_ctx` for older configs), capped by the tokenizer's
    `model_max_length` when that is a real number (not transformers' 1e30 "unset") and by the
    sliding window (a custom 4D mask cannot apply one); else lm-eval's 2048."""
    if requested is not None:
        return int(requested), "stage"
    cfg = masks.unwrap(model).config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limits: list[tuple[int, str]] = []
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append((value, f"config.{attr}"))
            break
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**9:
        limits.append((tok_max, "tokenizer.model_max_length"))
    window = getattr(text, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        limits.append((window, "config.sliding_window"))
    if not limits:
        return DEFAULT_MAX_LENGTH, "default"
    return min(limits, key=lambda x: x[0])


def prepare(
    examples: list[McExample],
    tokenizer: Any,
    max_length: int,
    add_bos: bool | None = None,
) -> tuple[list[Question], int]:
    """Tokenize every question (`encode_pair`, lm-eval's split; `add_bos` None = the
    tokenizer's default, `resolve_add_bos`); left-truncate contexts that do not fit.

    Truncation as lm-eval's `_loglikelihood_tokens`: the model is fed (context + continuation)
    minus its last token, at most `max_length` tokens, so a context keeps its last
    `max_length + 1 - len(continuation)` tokens (a BOS is not kept). One context serves all the
    choices here, cut for the longest one (lm-eval cuts per choice: its shorter choices keep a
    few more context tokens, in truncated questions only). Returns (questions, number truncated).
    """
    bos, _ = resolve_add_bos(tokenizer, add_bos)
    out, truncated = [], 0
    for ex in examples:
        pairs = [encode_pair(tokenizer, ex.context, c, add_bos=bos) for c in ex.choices]
        ctx = pairs[0][0]
        conts = [p[1] for p in pairs]
        if any(not c for c in conts):
            raise WorkerError(f"a choice of {ex.context[:60]!r} encodes to no tokens")
        longest = max(len(c) for c in conts)
        if longest > max_length:
            raise WorkerError(
                f"a choice is {longest} tokens, longer than max_length {max_length}",
                hint="raise max_length",
            )
        if len(ctx) + longest > max_length + 1:
            ctx = ctx[len(ctx) - (max_length + 1 - longest) :]
            truncated += 1
        char_lens = [max(1, len(c[1:] if c.startswith(" ") else c)) for c in ex.choices]
        out.append(Question(ctx, conts, ex.label, char_lens))
    return out, truncated


def _pad(
    rows: list[list[int]], pad_id: int, device: torch.device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        s = width - len(r) if left else 0
        ids[i, s : s + len(r)] = torch.tensor(r, dtype=torch.long)
        am[i, s : s + len(r)] = 1
    return ids.to(device), am.to(device)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(masks.unwrap(model).parameters()).dtype


@torch.no_grad()
def score_shared(
    model: Any, qs: list[Question], mode: MaskMode, pad_id: int, counter: Counter
) -> list[list[float]]:
    """Log-likelihood of each choice of each question, context encoded once (module docstring)."""
    device = next(model.parameters()).device
    impl = masks.model_impl(model)
    dtype = _model_dtype(model)
    # Left padding: every context ends at the last slot, so only that slot's logits are needed
    # (logits_to_keep=1: a (B, T, vocab) tensor would dominate memory on a 131k vocab).
    ctx_ids, ctx_am = _pad([q.ctx for q in qs], pad_id, device, left=True)
    n_ctx = ctx_am.sum(dim=1)
    ctx_mode = MaskMode.CAUSAL if mode is MaskMode.CAUSAL else MaskMode.PREFIX
    allowed = masks.allowed_matrix(ctx_am, n_ctx, ctx_mode)
    kw = {masks.cache_kwarg(model): _new_cache(model), "use_cache": True, **_keep_last(model)}
    out = masks.run_with_mask(
        model,
        ctx_ids,
        masks.to_impl_form(allowed, impl, dtype),
        masks.position_ids_for(ctx_am),
        **kw,
    )
    counter.positions += ctx_ids.numel()
    counter.tokens += int(ctx_am.sum())
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    last = out.logits[:, -1].float().log_softmax(-1)

    owner = [qi for qi, q in enumerate(qs) for _ in q.conts]
    conts = [c for q in qs for c in q.conts]
    scores = [float(last[qi, c[0]]) for qi, c in zip(owner, conts, strict=True)]
    if max(len(c) for c in conts) > 1:
        scores = _continuations(model, cache, owner, conts, ctx_am, pad_id, scores, counter)
    out_scores: list[list[float]] = [[] for _ in qs]
    for qi, s in zip(owner, scores, strict=True):
        out_scores[qi].append(s)
    return out_scores


def _keep_last(model: Any) -> dict[str, Any]:
    params = inspect.signature(masks.unwrap(model).forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _new_cache(model: Any) -> Any:
    # lazy, for start-up time: pulls in transformers
    from transformers import DynamicCache

    try:
        return DynamicCache(config=masks.unwrap(model).config)
    except TypeError:  # older transformers
        return DynamicCache()


def _continuations(
    model: Any,
    cache: Any,
    owner: list[int],
    conts: list[list[int]],
    ctx_am: torch.Tensor,
    pad_id: int,
    scores: list[float],
    counter: Counter,
) -> list[float]:
    """Second pass: every continuation but its last token, causally on top of its context."""
    device = ctx_am.device
    ctx_width = ctx_am.shape[1]
    n_ctx = ctx_am.sum(dim=1)
    impl = masks.model_impl(model)
    rows = [c[:-1] for c in conts]
    ids, am = _pad([r or [pad_id] for r in rows], pad_id, device)
    am[[i for i, r in enumerate(rows) if not r]] = 0
    r_len = ids.shape[1]
    own = torch.tensor(owner, device=device)
    cache.reorder_cache(own)  # one copy of the context's keys/values per choice
    ctx_real = ctx_am.bool()[own]  # (R, Tc): the real context slots of each choice's question
    j = torch.arange(r_len, device=device)
    causal = j[None, :, None] >= j[None, None, :]  # (1, Tr, Tr)
    cont_part = causal & am.bool()[:, None, :]
    allowed = torch.cat([ctx_real[:, None, :].expand(-1, r_len, -1), cont_part], dim=2)
    # padded continuation rows see their own slot (no all-masked softmax row)
    pad_q = ~am.bool()
    allowed[:, :, ctx_width:] |= (
        pad_q[:, :, None] & torch.eye(r_len, dtype=torch.bool, device=device)[None]
    )
    pos = n_ctx[own][:, None] + j[None, :]
    kw = {masks.cache_kwarg(model): cache, "use_cache": True}
    out = masks.run_with_mask(
        model, ids, masks.to_impl_form(allowed, impl, _model_dtype(model)), pos, **kw
    )
    counter.positions += ids.numel()
    counter.tokens += int(am.sum())
    logp = out.logits.float().log_softmax(-1)
    scores = list(scores)
    for i, c in enumerate(conts):
        if len(c) > 1:
            tgt = torch.tensor(c[1:], device=device)
            scores[i] += float(logp[i, : len(c) - 1].gather(1, tgt[:, None]).sum())
    return scores


@torch.no_grad()
def score_naive(
    model: Any, qs: list[Question], mode: MaskMode, pad_id: int, counter: Counter
) -> list[list[float]]:
    """Reference: one full forward of context + continuation per choice (prefix = context)."""
    device = next(model.parameters()).device
    owner = [qi for qi, q in enumerate(qs) for _ in q.conts]
    pairs = [(q.ctx, c) for q in qs for c in q.conts]
    ids, am = _pad([ctx + c for ctx, c in pairs], pad_id, device)
    plens = torch.tensor([len(ctx) for ctx, _ in pairs], device=device)
    logits = masks.forward(model, ids, am, plens, mode)
    counter.positions += ids.numel()
    counter.tokens += int(am.sum())
    logp = logits.float().log_softmax(-1)
    out: list[list[float]] = [[] for _ in qs]
    for i, ((ctx, c), qi) in enumerate(zip(pairs, owner, strict=True)):
        tgt = torch.tensor(c, device=device)
        s = logp[i, len(ctx) - 1 : len(ctx) - 1 + len(c)].gather(1, tgt[:, None]).sum()
        out[qi].append(float(s))
    return out


def accuracy(
    scores: list[list[float]], labels: list[int], char_lens: list[list[int]]
) -> dict[str, float]:
    """acc (argmax of log-likelihood) and acc_norm (argmax of log-likelihood per character);
    ties go to the first choice, as numpy.argmax does in lm-eval."""
    if not scores:
        raise WorkerError("no questions to score")

    def argmax(xs: list[float]) -> int:
        return max(range(len(xs)), key=lambda i: (xs[i], -i))

    acc = sum(argmax(s) == y for s, y in zip(scores, labels, strict=True)) / len(scores)
    norm = [
        [x / n for x, n in zip(s, ls, strict=True)] for s, ls in zip(scores, char_lens, strict=True)
    ]
    acc_norm = sum(argmax(s) == y for s, y in zip(norm, labels, strict=True)) / len(scores)
    return {"acc": acc, "acc_norm": acc_norm, "n": len(scores)}


def score_task(
    model: Any,
    qs: list[Question],
    mode: MaskMode,
    pad_id: int,
    batch_size: int,
    shared: bool,
    counter: Counter,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Scores of every question, in batches of `batch_size` questions (shared) or of about
    `batch_size` sequences (naive), longest first so padding stays small."""
    order = sorted(range(len(qs)), key=lambda i: -(len(qs[i].ctx) + max(map(len, qs[i].conts))))
    per_batch = batch_size if shared else max(1, batch_size // max(len(q.conts) for q in qs))
    scores: list[list[float]] = [[] for _ in qs]
    fn = score_shared if shared else score_naive
    for start in range(0, len(order), per_batch):
        idx = order[start : start + per_batch]
        for i, s in zip(idx, fn(model, [qs[i] for i in idx], mode, pad_id, counter), strict=True):
            scores[i] = s
        if on_batch:
            on_batch(len(idx))
    return scores


def evaluate(
    args: EvalArgs,
    on_progress: ProgressFn | None = None,
    on_event: EventFn | None = None,
    *,
    loaded: Any | None = None,
) -> dict[str, Any]:
    """Run `args` end to end; returns the content of metrics.json.

    `on_progress(done, total, tokens)` follows the questions scored and the tokens forwarded
    (`ProgressFn`); `on_event(kind, data)` gets a line per task and the warnings.

    `loaded`: an already loaded `modeling.Loaded` (tests, benchmarks) instead of `args.model`.
    """
    mode = MaskMode(args.mask)
    if mode is MaskMode.FULL_BIDIR:
        raise WorkerError(
            "evaluation supports mask 'causal' or 'prefix' (full_bidir would let a continuation "
            "see itself)"
        )
    if not args.tasks:
        raise WorkerError("no tasks to evaluate", hint="give at least one task in `tasks`")
    names = [t.name for t in args.tasks]
    if len(set(names)) != len(names):
        raise WorkerError(f"task names repeat: {names}", hint="give every task a distinct name")
    emit = on_event or (lambda kind, data: None)
    torch.manual_seed(args.seed)
    loaded = loaded or modeling.load(args)
    model, tok = loaded.model, loaded.tokenizer
    add_bos, bos_source = resolve_add_bos(tok, args.add_bos)
    max_length, length_source = context_limit(model, tok, args.max_length)
    prepared = {}
    n_truncated = {}
    for t in args.tasks:
        qs, truncated = prepare(load_mc_task(t), tok, max_length, add_bos)
        prepared[t.name] = qs
        n_truncated[t.name] = truncated
        if truncated:
            emit(
                "warning",
                {
                    "message": f"{t.name}: {truncated} contexts left-truncated to max_length "
                    f"{max_length} ({length_source})"
                },
            )
    # the self-check runs on the stage's own questions (never reserved low ids)
    sample = [q.ctx + q.conts[q.label] for qs in prepared.values() for q in qs[:4]]
    check_tokens = masks.verify_mask_path(model, sample=sample, tokenizer=tok)
    total = sum(len(q) for q in prepared.values())
    done = 0
    counter = Counter()
    if on_progress:
        on_progress(0, total, counter.tokens)

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total, counter.tokens)

    t0 = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for t in args.tasks:
        qs = prepared[t.name]
        scores = score_task(
            model,
            qs,
            mode,
            tok.pad_token_id,
            args.batch_size,
            args.shared_context,
            counter,
            on_batch,
        )
        res = accuracy(scores, [q.label for q in qs], [q.char_lens for q in qs])
        results[t.name] = {
            **res,
            "source": t.source,
            "format": t.format,
            "lm_eval_metrics": LM_EVAL_METRICS.get(t.format, []),
            "truncated": n_truncated[t.name],
        }
        emit("eval", {"task": t.name, **res})
    seconds = time.monotonic() - t0
    return {
        "model": args.model,
        "mask": mode.value,
        "attn_implementation": args.attn_implementation,
        "shared_context": args.shared_context,
        "add_bos": add_bos,
        "add_bos_source": bos_source,  # "stage" (add_bos set) or "tokenizer default"
        "max_length": max_length,
        "max_length_source": length_source,
        "tokenizer": getattr(loaded, "tokenizer_info", None) or modeling.tokenizer_info(tok),
        "mask_check_tokens": check_tokens,
        "tasks": results,
        "macro_acc": _mean([r["acc"] for r in results.values()]),
        "macro_acc_norm": _mean([r["acc_norm"] for r in results.values()]),
        "n_questions": total,
        "tokens_forwarded": counter.tokens,
        "positions_forwarded": counter.positions,
        "eval_seconds": round(seconds, 3),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
    }


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else float("nan")


def run_eval(args: EvalArgs, ctx: Any) -> dict[str, Any]:
    """The `eval` task for the worker lifecycle: status phase, progress and events.

    status.json's `step`/`total_steps` count questions, so during evaluation `steps_per_s` is
    questions/s and `tokens_per_s` real tokens forwarded/s."""
    ctx.status.set_phase(WorkerPhase.LOADING, f"loading {args.model}")
    modeling.prebuild(args.model, ctx.status)
    loaded = modeling.load(args)
    mask = MaskMode(args.mask).value
    ctx.status.set_phase(WorkerPhase.EVALUATING, f"{mask} mask on {len(args.tasks)} task(s)")
    ctx.status.reset_rates()  # rates from here on are evaluation rates
    reported = 0

    def progress(done: int, total: int, tokens: int) -> None:
        # status.step() adds up per-call token counts; evaluate() reports a running total.
        nonlocal reported
        delta, reported = tokens - reported, tokens
        ctx.status.progress(done, total, f"evaluated {done}/{total} questions", tokens=delta)

    def event(kind: str, data: dict[str, Any]) -> None:
        message = str(data.pop("message", "")) or ", ".join(f"{k}={v}" for k, v in data.items())
        ctx.status.event(kind, message, **data)

    return evaluate(args, progress, event, loaded=loaded)
