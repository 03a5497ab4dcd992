"""Enumerations both sides share: run phases (controller), worker phases, mask modes."""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
    """The controller's view of a run, in lifecycle order.

    `unreachable` is not a phase: it is an overlay (`runs.unreachable_since` in the store) kept
    while the box does not answer, because not hearing from a box is never proof of a crash.
    """

    PENDING = "pending"  # recorded, nothing done yet
    SYNCING = "syncing"  # code going to the target
    LAUNCHING = "launching"  # bootstrap + spec + tmux start
    QUEUED = "queued"  # submitted to a batch scheduler (Slurm), waiting for its turn
    RUNNING = "running"  # tmux session started; heartbeat expected
    HUNG = "hung"  # process alive but `seq` has not moved for the stale limit (can recover)
    SUCCEEDED = "succeeded"  # .run_complete + manifest + exit code 0
    FAILED = "failed"  # .run_failed or a non-zero exit code (reason carried)
    CRASHED = "crashed"  # process and session gone, no marker written
    TIMED_OUT = "timed_out"  # ran past the stage's timeout
    LOST = "lost"  # the provider says the instance is gone or was preempted
    CANCELLED = "cancelled"  # stopped by the user (`orch stop`)

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_PHASES

    @property
    def is_active(self) -> bool:
        return not self.is_terminal

    @property
    def is_bad(self) -> bool:
        """A phase a researcher must look at."""
        return self in BAD_PHASES


TERMINAL_PHASES = frozenset(
    {Phase.SUCCEEDED, Phase.FAILED, Phase.CRASHED, Phase.TIMED_OUT, Phase.LOST, Phase.CANCELLED}
)
BAD_PHASES = frozenset({Phase.FAILED, Phase.CRASHED, Phase.HUNG, Phase.TIMED_OUT, Phase.LOST})


class WorkerPhase(str, Enum):
    """What the worker says it is doing, in `status.json`."""

    STARTING = "starting"
    LOADING = "loading"
    PROBING = "probing"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"
    RUNNING = "running"  # an `exec` stage's child process is running
    DONE = "done"
    FAILED = "failed"


class MaskMode(str, Enum):
    """Attention mask modes of the study."""

    CAUSAL = "causal"  # every token sees itself and earlier tokens
    PREFIX = "prefix"  # prompt tokens see the whole prompt; everything after is causal
    FULL_BIDIR = "full_bidir"  # every token sees every token: the leaky objective, for detection


class WorkerExit(int, Enum):
    """Exit codes of `python -m worker` (the wrapper records them in `exit_code`)."""

    OK = 0
    ERROR = 1  # unexpected exception
    BAD_INPUT = 2  # WorkerError: the input is unusable (message says what to do)
    LEAKAGE = 3  # the leakage guard stopped the run
    INTERRUPTED = 130
