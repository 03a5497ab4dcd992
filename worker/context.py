"""What every task of a run shares, below the lifecycle that makes it: the run's context and the
two exceptions a task raises to end a run in a particular way. In a module of its own so that the
lifecycle (which calls the tasks) and the tasks (train, probe, distributed) import it from below,
rather than each other."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

from state.errors import WorkerError
from state.models import RunSpec
from worker.loggers import MetricLogger, NullLogger
from worker.status import StatusWriter


class LeakageError(WorkerError):
    """The leakage guard stopped the run: the training mask lets labels be seen."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP arrived (orch stop, tmux kill): leave a reason, exit 130."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class SaveRequest:
    """Slurm's time-limit warning: `--signal=B:USR1@N` reaches the job script, which leaves
    `.checkpoint_request` in the run dir and forwards USR1 to the worker; the lifecycle's
    handler (or its look for that file at start, should the signal have come first) sets this,
    and the trainer saves a step checkpoint at its next step boundary, then trains on."""

    def __init__(self) -> None:
        self.requested = False
        self.signals = 0

    def set(self) -> None:
        self.requested = True
        self.signals += 1

    def take(self) -> bool:
        """True once per request (the flag is cleared)."""
        got, self.requested = self.requested, False
        return got


@dataclass
class RunContext:
    """What a task gets from the lifecycle: where to write and whom to tell."""

    run_dir: Path
    run_id: str
    stage: str
    status: StatusWriter
    rank: int = 0
    world_size: int = 1
    spec: RunSpec | None = None
    logger: MetricLogger = field(default_factory=NullLogger)
    save_request: SaveRequest = field(default_factory=SaveRequest)

    @property
    def is_main(self) -> bool:
        return self.rank == 0
