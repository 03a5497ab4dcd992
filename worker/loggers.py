"""Metric loggers behind one Protocol: TensorBoard event files in the run dir, Weights & Biases
when the researcher turns it on, and a null logger otherwise (nanochat/torchtune style).

Weights & Biases is imported only when asked for; its key comes from the environment
(`WANDB_API_KEY`), never from args or the run dir.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from state import names
from state.errors import WorkerError


@runtime_checkable
class MetricLogger(Protocol):
    """Where scalar metrics go: `log({"train/loss": 1.2}, step=10)`, `close()` at the end."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (wandb off, or a non-zero DDP rank)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard event files under `<run_dir>/tb` (pulled with the run, in its manifest)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        # lazy, for start-up time: pulls in torch, tensorboard
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / names.TENSORBOARD
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            if value is not None:
                self._writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbLogger:
    """Weights & Biases, imported lazily; a missing package is a WorkerError saying what to do."""

    def __init__(self, project: str | None, run_name: str, config: Mapping[str, Any]) -> None:
        try:
            # lazy, for start-up time: pulls in wandb
            import wandb
        except ImportError as exc:
            raise WorkerError(
                "wandb=true but the wandb package is not installed",
                hint="pip install wandb on the box, or set wandb=false",
            ) from exc
        self._wandb = wandb
        self._run = wandb.init(project=project or "orch", name=run_name, config=dict(config))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class MultiLogger:
    """Fans out to several loggers; closing closes all of them."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def make_logger(
    run_dir: str | os.PathLike[str],
    *,
    main: bool,
    wandb: bool = False,
    wandb_project: str | None = None,
    run_name: str = "",
    config: Mapping[str, Any] | None = None,
) -> MetricLogger:
    """TensorBoard (+ wandb when asked) on the main rank, a NullLogger elsewhere."""
    if not main:
        return NullLogger()
    loggers: list[MetricLogger] = [TensorBoardLogger(run_dir)]
    if wandb:
        loggers.append(WandbLogger(wandb_project, run_name, config or {}))
    return MultiLogger(loggers)
