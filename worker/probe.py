"""The numeric leakage probe (guard (b)): do the predictions of labels depend on later tokens?

Two measurements on the same weights and the same fixed held-out samples:

1. The loss ratio (what the seed measured: 0.070 under its leaky mask vs 1.023 causal). The
   loss under the training mask is compared with the causal loss. It is reported, but it is NOT
   the verdict: it cannot tell a leak from legitimate adaptation. A prefix-LM fine-tune (stage
   3B) teaches the weights to rely on bidirectional *prompt* attention; run causally, those
   weights lose what they learned to use, so their causal loss rises while the prefix loss
   falls (tiny model, `tiny:arith`, prefix mask: 0.18 prefix vs 1.32 causal at step 25). The
   ratio says "leak" and a correct run is stopped. Any model adapted to its mask looks better
   under that mask than under another one; that is what training does.

2. The counterfactual (the verdict). Under a leak-free mask the logits at position t depend
   only on tokens <= t (for response positions; prompt positions also see the rest of the
   prompt under `prefix`). So: run the training-mask forward twice, (a) on the batch as is and
   (b) on the same batch with every token from a per-row cut point k on (k inside the response)
   replaced by a random other token (never a special token), labels unchanged. Position t
   predicts token t+1. The compared positions are t in [P-1, k-1] (P = prompt length): their
   labels (tokens P..k) are unchanged, and their inputs (tokens <= k-1) are intact in both
   runs, so a leak-free mask gives bit-identical logits there (float noise at most). Position
   k-1 is the sharpest witness: its own label, token k, is visible to it only under a leaky
   mask (and corrupted in (b)), so a model that learned to copy labels loses its answer there.
   Under `full_bidir`, every compared position sees the corrupted tokens k.. and its logits
   move at once, even on weights that never learned to exploit the leak.

   The cut k runs from P (the whole response replaced: the compared position P-1 is the last
   prompt token, which catches a prefix mask that shows the prompt the first response token,
   the classic off-by-one) to the last response token, spread over the batch's rows
   (row i of n: k = P + floor(i * R / n), R = response length), so every batch has a row cut
   at P and the others sample the response evenly. The cut is a pure function of the batch,
   and the replacement tokens come from a fixed seed: the probe batch is the same every time.

   `future_sensitivity` = mean loss over the compared positions in (b) minus (a), in nats:
   how much the predictions of labels lose when later tokens change. `max_logit_diff` = the
   largest |logit (a) - logit (b)| over the compared positions.

   Verdict: leak = max_logit_diff > tolerance (1e-3 in fp32; 2e-2 * (1 + max |logit|) when the
   logits are bf16, where two forwards could round differently): the predictions of labels
   depend on later tokens. For `prefix` and `causal` the difference is exactly 0 on any
   weights, however far training has adapted them to their mask. The verdict does not wait for
   the loss to move: on weights never trained with the leak, corrupting the future can even
   LOWER the loss (the tiny model on `tiny:arith` under `full_bidir`: -2.9 nats, since seeing
   the real answer from the "wrong" side is out of distribution for causal weights), so a
   "loss must rise" rule would miss a leaky mask until the weights had learned to copy. The
   sign of future_sensitivity is reported as what it says: > 0 once the weights exploit the
   leak (predictions get worse without the true later tokens).

   Measured on the tiny model, `tiny:arith`, lr 1e-3, batch 16 (probe batch of 8 rows):
   full_bidir at step 0: ratio 64.6 (the ratio rule passes it), max |logit diff| 17.4, future
   sensitivity -2.91 -> flagged; after 150 full_bidir steps: ratio 0.082, sensitivity +3.49
   (the ratio rule first fired at step 50). prefix: ratio down to 0.10-0.30 from step 15 on,
   max |logit diff| exactly 0 at every probe. causal: ratio 1, difference exactly 0.

`python -m worker probe` runs it on given weights and samples and writes `metrics.json`; a leak
found there is a measurement (reported, exit 0), not a failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from state.errors import WorkerError
from state.phases import MaskMode, WorkerPhase
from worker import data, masks, modeling

if TYPE_CHECKING:
    from state.worker_config import ProbeArgs
    from worker.context import RunContext

Batch = Mapping[str, torch.Tensor]

#: A leak-free mask gives identical logits at the compared positions; in fp32 the two forwards
#: run the same kernels on the same inputs there (measured difference: exactly 0).
FP32_LOGIT_TOL = 1e-3
#: bf16 logits (autocast or bf16 weights), relative to the logits' size: bf16 keeps ~3
#: significant digits (one ulp is 0.4%), so this allows a few ulps of rounding difference.
BF16_LOGIT_TOL = 2e-2
#: Seed of the replacement tokens: the counterfactual batch is the same at every probe.
CF_SEED = 0


@dataclass(frozen=True)
class ProbeResult:
    """Both measurements on one set of weights and samples, and the verdict (see the module
    docstring): `leak` comes from the counterfactual, `ratio_flag` is the loss-ratio rule."""

    mask: str
    loss_mask: float  # mean response-token loss under `mask`
    loss_causal: float  # the same under causal attention
    leak_ratio: float  # the loss-ratio rule's threshold (reported, not the verdict)
    tokens: int  # response tokens behind loss_mask / loss_causal
    loss_cut: float  # mean loss over the compared positions, batch as is
    loss_cut_corrupted: float  # the same with the tokens from the cut on replaced
    max_logit_diff: float  # max |logit (a) - logit (b)| over the compared positions
    logit_tol: float
    compared: int  # compared positions

    @property
    def ratio(self) -> float:
        return self.loss_mask / self.loss_causal if self.loss_causal > 0 else float("inf")

    @property
    def ratio_flag(self) -> bool:
        """The loss-ratio rule alone (false-positives on prefix-LM adaptation)."""
        return self.loss_mask < self.leak_ratio * self.loss_causal

    @property
    def future_sensitivity(self) -> float:
        return self.loss_cut_corrupted - self.loss_cut

    @property
    def depends_on_future(self) -> bool:
        return self.max_logit_diff > self.logit_tol

    @property
    def leak(self) -> bool:
        return self.depends_on_future

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ratio": self.ratio,
            "ratio_flag": self.ratio_flag,
            "future_sensitivity": self.future_sensitivity,
            "depends_on_future": self.depends_on_future,
            "leak": self.leak,
        }

    def describe(self) -> str:
        if not self.leak:
            verdict = "predictions do not depend on later tokens"
        elif self.future_sensitivity > 0:
            verdict = "predictions depend on later tokens, and the weights use them"
        else:
            verdict = "predictions depend on later tokens (not exploited yet)"
        return (
            f"loss {self.loss_mask:.4f} under {self.mask} vs {self.loss_causal:.4f} causal "
            f"(ratio {self.ratio:.3f}, ratio rule {'would flag' if self.ratio_flag else 'passes'} "
            f"at {self.leak_ratio}); {verdict} (future sensitivity "
            f"{self.future_sensitivity:+.4f} nats, max |logit diff| {self.max_logit_diff:.3g}, "
            f"tolerance {self.logit_tol:.3g}, over {self.compared} positions)"
        )


@dataclass(frozen=True)
class Counterfactual:
    """The corrupted copy of a batch and the positions where a leak-free mask changes nothing."""

    input_ids: torch.Tensor  # (B, T): tokens from each row's cut on replaced
    compare: torch.Tensor  # (B, T) bool over predicting positions t (logits[:, t])
    cuts: torch.Tensor  # (B,) absolute index of each row's cut k


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose label is not -100, and their count.

    `labels` are aligned with the inputs (HF convention): logits at t predict labels at t+1.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    n = int((shift_labels != -100).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, n


def _logits(
    model: torch.nn.Module,
    batch: Batch,
    mode: MaskMode | str,
    *,
    input_ids: torch.Tensor | None = None,
    autocast: bool = False,
) -> torch.Tensor:
    device = next(masks.unwrap(model).parameters()).device
    ids = (batch["input_ids"] if input_ids is None else input_ids).to(device)
    am = batch["attention_mask"].to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        return masks.forward(model, ids, am, batch["prompt_lens"].to(device), mode)


def batch_loss(
    model: torch.nn.Module, batch: Batch, mode: MaskMode | str, *, autocast: bool = False
) -> tuple[torch.Tensor, int]:
    """(summed loss, response tokens) of one batch under `mode`, through the checked mask path."""
    logits = _logits(model, batch, mode, autocast=autocast)
    return token_loss_sum(logits, batch["labels"].to(logits.device))


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    mode: MaskMode | str,
    *,
    autocast: bool = False,
) -> tuple[float, int]:
    """Token-weighted mean loss over `batches` (eval mode, no grad; training mode restored)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            s, n = batch_loss(model, b, mode, autocast=autocast)
            total += float(s)
            count += n
    finally:
        model.train(was)
    return (total / count if count else float("nan")), count


def replacement_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> torch.Tensor:
    """Token ids a counterfactual may put in: the vocabulary minus special tokens (pad, bos,
    eos, unk), within the model's embedding size."""
    n = len(tokenizer)
    vocab = (
        getattr(getattr(masks.unwrap(model), "config", None), "vocab_size", None) if model else None
    )
    if isinstance(vocab, int):
        n = min(n, vocab)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = torch.tensor([i for i in range(n) if i not in special], dtype=torch.long)
    if ids.numel() < 2:
        raise WorkerError("the vocabulary has fewer than 2 ordinary tokens; cannot run the probe")
    return ids


def make_counterfactual(
    batch: Batch, replace_ids: torch.Tensor, seed: int = CF_SEED
) -> Counterfactual:
    """Corrupt each row from its cut k on (k = P + floor(i * R / n) for row i of n, P prompt
    and R response tokens) with random replacement tokens, each different from the token it
    replaces; mark the compared positions t in [P-1, k-1]. Right or left padding."""
    ids = batch["input_ids"].clone()
    am = batch["attention_mask"].to(torch.bool)
    plens = batch["prompt_lens"].to(torch.int64)
    n_rows, width = ids.shape
    starts = masks.row_starts(am)
    real = am.sum(dim=1)
    gen = torch.Generator().manual_seed(seed)
    compare = torch.zeros((n_rows, width), dtype=torch.bool)
    cuts = torch.zeros(n_rows, dtype=torch.long)
    pool = replace_ids.to(torch.long).cpu()
    for i in range(n_rows):
        s, p, length = int(starts[i]), int(plens[i]), int(real[i])
        r = length - p
        if p < 1 or r < 1:
            raise WorkerError(
                f"probe row {i} has {p} prompt and {r} response tokens; the probe needs both",
                hint="check the probe data's prompts and responses",
            )
        k = s + p + (i * r) // n_rows
        cuts[i] = k
        compare[i, s + p - 1 : k] = True  # t in [P-1, k-1] (absolute)
        picks = torch.randint(0, pool.numel(), (s + length - k,), generator=gen)
        new = pool[picks]
        same = new == ids[i, k : s + length]
        new[same] = pool[(picks[same] + 1) % pool.numel()]  # never the original token
        ids[i, k : s + length] = new
    return Counterfactual(input_ids=ids, compare=compare, cuts=cuts)


def _compared(
    logits: torch.Tensor, labels: torch.Tensor, compare: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits at the compared positions (N, V), their labels (N,))."""
    cmp = compare.to(logits.device)
    nxt = labels[:, 1:].to(logits.device)
    targets = torch.cat([nxt, torch.full_like(nxt[:, :1], -100)], dim=1)[cmp]
    if bool((targets == -100).any()):
        raise WorkerError("a compared probe position has no label (internal error)")
    return logits[cmp].float(), targets


@torch.no_grad()
def probe(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    mode: MaskMode | str,
    leak_ratio: float,
    replace_ids: torch.Tensor,
    *,
    autocast: bool = False,
) -> ProbeResult:
    """The loss ratio and the counterfactual on the same weights and batches (eval mode, no
    grad; training mode restored). `replace_ids`: see `replacement_ids`."""
    mode = MaskMode(mode)
    was = model.training
    model.eval()
    sums = {"mask": 0.0, "causal": 0.0, "cut": 0.0, "cut_cf": 0.0}
    tokens = compared = 0
    max_diff, max_logit, low_precision = 0.0, 0.0, False
    try:
        for b in batches:
            cf = make_counterfactual(b, replace_ids)
            logits = _logits(model, b, mode, autocast=autocast)
            low_precision = low_precision or logits.dtype != torch.float32
            s, n = token_loss_sum(logits, b["labels"])
            sums["mask"] += float(s)
            tokens += n
            if mode is MaskMode.CAUSAL:
                sums["causal"] += float(s)  # the same forward: no second pass
            la, targets = _compared(logits, b["labels"], cf.compare)
            del logits
            if mode is not MaskMode.CAUSAL:
                s_c, _ = batch_loss(model, b, MaskMode.CAUSAL, autocast=autocast)
                sums["causal"] += float(s_c)
            logits_cf = _logits(model, b, mode, input_ids=cf.input_ids, autocast=autocast)
            lb, _ = _compared(logits_cf, b["labels"], cf.compare)
            del logits_cf
            sums["cut"] += float(F.cross_entropy(la, targets, reduction="sum"))
            sums["cut_cf"] += float(F.cross_entropy(lb, targets, reduction="sum"))
            compared += int(targets.numel())
            max_diff = max(max_diff, float((la - lb).abs().max()))
            max_logit = max(max_logit, float(la.abs().max()))
    finally:
        model.train(was)
    tol = BF16_LOGIT_TOL * (1.0 + max_logit) if low_precision else FP32_LOGIT_TOL

    def mean(total: float, count: int) -> float:
        return total / count if count else float("nan")

    return ProbeResult(
        mask=mode.value,
        loss_mask=mean(sums["mask"], tokens),
        loss_causal=mean(sums["causal"], tokens),
        leak_ratio=leak_ratio,
        tokens=tokens,
        loss_cut=mean(sums["cut"], compared),
        loss_cut_corrupted=mean(sums["cut_cf"], compared),
        max_logit_diff=max_diff,
        logit_tol=tol,
        compared=compared,
    )


def run_probe(args: ProbeArgs, ctx: RunContext) -> dict[str, Any]:
    """`python -m worker probe`: both measurements on `args.samples` SFT samples -> metrics.json."""
    ctx.status.set_phase(WorkerPhase.LOADING, f"loading {args.model}")
    loaded = modeling.load(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = data.load_sft(args.data, tokenizer, max_length=args.max_length)
    examples = examples[: args.samples]
    batches = [
        data.collate_sft(examples[i : i + args.batch_size], tokenizer)
        for i in range(0, len(examples), args.batch_size)
    ]
    ctx.status.set_phase(
        WorkerPhase.PROBING,
        f"{args.mask.value} vs causal and counterfactual on {len(examples)} samples",
    )
    autocast = loaded.device.type == "cuda" and loaded.dtype == torch.float32
    pool = replacement_ids(tokenizer, model)
    result = probe(model, batches, args.mask, args.leak_ratio, pool, autocast=autocast)
    ctx.status.update(extra={"probe": result.as_dict()}, leak_flag=result.leak)
    ctx.status.event("probe", result.describe(), **result.as_dict())
    return {
        "model": args.model,
        "data": args.data.model_dump(),
        "samples": len(examples),
        **result.as_dict(),
    }
