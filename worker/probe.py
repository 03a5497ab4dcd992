"""The numeric leakage probe: loss under a training mask vs causal loss, same weights, same samples.

A mask that lets a position see the token it must predict turns next-token prediction into
copying: once the weights have learned to exploit it, the loss under that mask collapses far
below the causal loss on the same weights (the seed measured 0.070 vs 1.023). On the starting
weights it shows nothing (a model never trained with the leak cannot use it), which is why the
trainer runs this probe periodically, on a fixed held-out batch, and again at the end.

`python -m worker probe` runs it on given weights and samples and writes `metrics.json`; a leak
found there is a measurement (reported, exit 0), not a failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from state.phases import MaskMode, WorkerPhase
from worker import masks

if TYPE_CHECKING:
    from state.worker_config import ProbeArgs
    from worker.lifecycle import RunContext

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ProbeResult:
    """Mean response-token loss under `mask` and under causal attention, and the verdict."""

    mask: str
    loss_mask: float
    loss_causal: float
    leak_ratio: float
    tokens: int

    @property
    def ratio(self) -> float:
        return self.loss_mask / self.loss_causal if self.loss_causal > 0 else float("inf")

    @property
    def leak(self) -> bool:
        return self.loss_mask < self.leak_ratio * self.loss_causal

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "leak": self.leak}

    def describe(self) -> str:
        return (
            f"loss under the {self.mask} mask {self.loss_mask:.4f} vs causal loss "
            f"{self.loss_causal:.4f} on the same weights and samples (ratio {self.ratio:.3f}, "
            f"threshold {self.leak_ratio})"
        )


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


def batch_loss(
    model: torch.nn.Module, batch: Batch, mode: MaskMode | str, *, autocast: bool = False
) -> tuple[torch.Tensor, int]:
    """(summed loss, response tokens) of one batch under `mode`, through the checked mask path."""
    device = next(masks.unwrap(model).parameters()).device
    ids = batch["input_ids"].to(device)
    am = batch["attention_mask"].to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = masks.forward(model, ids, am, batch["prompt_lens"].to(device), mode)
    return token_loss_sum(logits, batch["labels"].to(device))


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


def probe(
    model: torch.nn.Module,
    batches: list[Batch],
    mode: MaskMode | str,
    leak_ratio: float,
    *,
    autocast: bool = False,
) -> ProbeResult:
    """Loss under `mode` and under causal on the same weights and batches."""
    mode = MaskMode(mode)
    loss_mask, n = mean_loss(model, batches, mode, autocast=autocast)
    if mode is MaskMode.CAUSAL:
        loss_causal = loss_mask  # the same forward: no second pass
    else:
        loss_causal, _ = mean_loss(model, batches, MaskMode.CAUSAL, autocast=autocast)
    return ProbeResult(mode.value, loss_mask, loss_causal, leak_ratio, n)


def run_probe(args: ProbeArgs, ctx: RunContext) -> dict[str, Any]:
    """`python -m worker probe`: both losses on `args.samples` SFT samples -> metrics.json."""
    from worker import data, modeling

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
        WorkerPhase.PROBING, f"{args.mask.value} vs causal on {len(examples)} samples"
    )
    autocast = loaded.device.type == "cuda" and loaded.dtype == torch.float32
    result = probe(model, batches, args.mask, args.leak_ratio, autocast=autocast)
    ctx.status.update(extra={"probe": result.as_dict()}, leak_flag=result.leak)
    ctx.status.event("probe", result.describe(), **result.as_dict())
    return {
        "model": args.model,
        "data": args.data.model_dump(),
        "samples": len(examples),
        **result.as_dict(),
    }
