"""The DDP process group of a training run, and the few collectives the trainer needs.

Under `torchrun --nproc_per_node N` (env RANK/WORLD_SIZE/LOCAL_RANK) `Dist.setup` starts the
process group (nccl on CUDA, gloo on CPU); with one process every method is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from worker.context import RunContext


@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank (its CUDA device)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: bool = False

    @classmethod
    def setup(cls, ctx: RunContext, device_kind: str) -> Dist:
        """Join the process group when the world has more than one rank (`close` leaves it)."""
        d = cls(ctx.rank, ctx.world_size, int(os.environ.get("LOCAL_RANK", "0")))
        if d.world > 1 and not dist.is_initialized():
            if device_kind == "cuda":
                torch.cuda.set_device(d.local_rank)
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
            d.started = True
        return d

    def _tensor(self, value: float | int, dtype: torch.dtype) -> torch.Tensor:
        # nccl reduces CUDA tensors only; gloo CPU ones.
        dev = (
            torch.device("cuda", self.local_rank)
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        return torch.tensor([value], dtype=dtype, device=dev)

    def mean(self, value: float) -> float:
        """The mean of `value` over all ranks."""
        if self.world == 1:
            return value
        t = self._tensor(value, torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def total(self, value: int) -> int:
        """The sum of `value` over all ranks."""
        if self.world == 1:
            return value
        t = self._tensor(value, torch.int64)
        dist.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        """Wait for every rank (rank 0 saves while the others wait)."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if `setup` started it."""
        if self.started and dist.is_initialized():
            dist.destroy_process_group()
