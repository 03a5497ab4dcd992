"""File names of the run-directory protocol and validation of names that become paths.

Every name that ends up in a path, a tmux session or a remote command goes through
`check_name` first: a name is 1-64 characters of letters, digits, `_`, `.` and `-`.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from state.errors import ConfigError

SPEC = "spec.json"
STATUS = "status.json"
EVENTS = "events.jsonl"
STDOUT = "stdout.log"
EXIT_CODE = "exit_code"
METRICS = "metrics.json"
SUMMARY = "summary.json"
MANIFEST = "manifest.json"
RUN_COMPLETE = ".run_complete"
RUN_FAILED = ".run_failed"
CHECKPOINTS = "checkpoints"
PID = "pid"
#: Left by a Slurm job script on the time-limit warning (USR1): save a checkpoint now.
CHECKPOINT_REQUEST = ".checkpoint_request"
TENSORBOARD = "tb"

#: Local and remote layout under a target's workdir / the project root.
RUNS_DIR = "runs"
CODE_DIR = "code"
ORCH_DIR = ".orch"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_RUN_ID_RE = re.compile(r"^\d{8}-\d{6}(-[0-9a-z]{1,8})?\Z")


def is_valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and name not in {".", ".."}


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as a path component / tmux name, else raise ConfigError."""
    if not isinstance(name, str) or not is_valid_name(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return name


def is_run_id(text: str) -> bool:
    return bool(_RUN_ID_RE.match(text))


def new_run_id(now: datetime | None = None, suffix: str | None = None) -> str:
    """`YYYYmmdd-HHMMSS` (UTC), as the seed's runs are named; optional suffix breaks ties."""
    now = now or datetime.now(timezone.utc)
    rid = now.strftime("%Y%m%d-%H%M%S")
    return f"{rid}-{suffix}" if suffix else rid


def session_name(stage: str, run_id: str) -> str:
    """The tmux session of a run: `orch-<stage>-<run_id>` (validated)."""
    return check_name(
        f"orch-{check_name(stage, 'stage')}-{check_name(run_id, 'run id')}", "tmux session"
    )
