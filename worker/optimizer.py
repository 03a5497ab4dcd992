"""The optimizer and LR schedule of a training run: AdamW with linear warmup, then cosine,
linear or constant, stepped once per optimizer step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from state.worker_config import TrainArgs


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based): linear warmup, then
    cosine/linear decay to 0 at `total`, or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, args: TrainArgs
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `model`'s parameters and its `lr_factor` schedule, from `args`."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=(0.9, 0.999),
        foreach=False,  # the same kernel every run: resume must be bit-exact
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup=args.warmup_steps, total=args.max_steps, kind=args.lr_schedule
        ),
    )
    return optimizer, scheduler
