"""The run wrapper and the tmux command that starts it: pure builders, no I/O beyond reading
the packaged script.

The wrapper (`run_wrapper.sh`, POSIX sh, shipped as package data) is copied to the target under
a content-addressed name (`<workdir>/bin/run_wrapper-<sha8>.sh`), so runs started by different
orch versions never rewrite each other's script. tmux gets ONE shell-command string built with
`shlex.join` from validated names and paths; the environment goes through `env NAME=VALUE`
because a tmux server started earlier would otherwise hand the session its own old environment.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources

from state import names
from state.errors import ConfigError
from state.models import RunSpec

WRAPPER_RESOURCE = "run_wrapper.sh"
SECRETS_FILE = ".secrets.env"
BIN_DIR = "bin"

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
# Plain characters and `$NAME` / `${NAME}` references only: no quote, backslash, backquote,
# `$(`, space or glob, so double quotes leave nothing but the variables to the shell.
_EXPANDED_RE = re.compile(
    r"^(?:[A-Za-z0-9_=:.,/+@%-]|\$[A-Za-z_][A-Za-z0-9_]*|\$\{[A-Za-z_][A-Za-z0-9_]*\})+\Z"
)


class Expanded(str):
    """An argv item whose `$NAME` references the job script's own shell expands where the job
    runs (a compute node's `$SLURM_JOB_ID`, a variable the script set), never on the laptop:
    written in double quotes where every other item is single-quoted. ValueError for anything
    but plain characters and variable references."""

    __slots__ = ()

    def __new__(cls, text: str) -> Expanded:
        if not _EXPANDED_RE.match(text):
            raise ValueError(f"not a plain word with $NAME references: {text!r}")
        return super().__new__(cls, text)


def quote_item(item: str) -> str:
    """One argv item for a POSIX shell: `"..."` for an `Expanded`, else `shlex.quote`."""
    return f'"{item}"' if isinstance(item, Expanded) else shlex.quote(item)


@lru_cache(maxsize=1)
def wrapper_script() -> bytes:
    """The wrapper script's bytes (package data of `orchestrator`)."""
    return resources.files("orchestrator").joinpath(WRAPPER_RESOURCE).read_bytes()


def wrapper_remote_path(workdir: str) -> str:
    """Where the wrapper lives on the target: named by its content hash."""
    digest = hashlib.sha256(wrapper_script()).hexdigest()[:8]
    return f"{workdir.rstrip('/')}/{BIN_DIR}/run_wrapper-{digest}.sh"


def check_env_name(name: str) -> str:
    """An environment variable name safe to write into `NAME=value` (else ConfigError)."""
    if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
        raise ConfigError(
            f"invalid environment variable name {name!r}: use letters, digits and '_' (not first)"
        )
    return name


def worker_argv(python: str, run_dir_abs: str, nproc_per_node: int = 1) -> list[str]:
    """The command the wrapper runs: `python -m worker run`, under torchrun for N > 1 processes."""
    if nproc_per_node > 1:
        return [
            python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={int(nproc_per_node)}",
            "-m", "worker", "run", "--run-dir", run_dir_abs,
        ]  # fmt: skip
    return [python, "-m", "worker", "run", "--run-dir", run_dir_abs]


def run_env(
    *,
    code_dir: str,
    run_dir_abs: str,
    spec: RunSpec,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Non-secret environment of a run: the target's `env` first, then orch's own variables."""
    env: dict[str, str] = {}
    for key, value in (extra or {}).items():
        env[check_env_name(key)] = str(value)
    env.update(
        {
            "PYTHONPATH": code_dir,
            "PYTHONUNBUFFERED": "1",
            "ORCH_CODE_DIR": code_dir,
            "ORCH_RUN_DIR": run_dir_abs,
            "ORCH_RUN_ID": spec.run_id,
            "ORCH_STAGE": spec.stage,
        }
    )
    return env


def wrapper_command(
    *,
    wrapper_path: str,
    run_dir_abs: str,
    argv: list[str],
    env: Mapping[str, str],
) -> str:
    """The one shell-command string tmux runs: `env K=V ... sh WRAPPER RUN_DIR -- ARGV...`.
    An `Expanded` item of `argv` (a Slurm job script's) is left to that shell's expansion."""
    parts = ["env", *(f"{check_env_name(k)}={v}" for k, v in env.items())]
    parts += ["sh", wrapper_path, run_dir_abs, "--"]
    return " ".join([*map(shlex.quote, parts), *map(quote_item, argv)])


def tmux_new_session_argv(session: str, cwd: str, command: str) -> list[str]:
    """`tmux new-session -d` for a validated session name (tmux also treats ':' and '.' specially,
    which `check_name` allows only as '.', harmless in a session name)."""
    names.check_name(session, "tmux session")
    return ["tmux", "new-session", "-d", "-s", session, "-c", cwd, command]


def tmux_exact(session: str) -> str:
    """A `-t` target that matches exactly this session (tmux otherwise matches prefixes)."""
    return "=" + names.check_name(session, "tmux session")


def secrets_env_text(values: Mapping[str, str]) -> str:
    """`.secrets.env` content: one `NAME='value'` per line, quoted for POSIX sh."""
    lines = [f"{check_env_name(k)}={shlex.quote(v)}" for k, v in values.items()]
    return "".join(line + "\n" for line in lines)
