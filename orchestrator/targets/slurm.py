"""The `slurm` target: a cluster's login node, reached exactly as an `ssh` target.

Code sync, bootstrap (into `workdir`, which must be on the filesystem the compute nodes share),
the poll agent, host-key pinning: all inherited from `SshTarget`. What differs:
- runs start with `sbatch` (orchestrator/slurm/submit.py), not tmux; the job runs the same
  wrapper, so the run-dir protocol is unchanged;
- the poll agent also asks `squeue` about the runs' jobs in the same round trip (state/slurm.py);
- the target's `env` reaches every login-node command too (`env K=V ARGV...`), so a cluster
  whose config is not in /etc/slurm works with `env = { SLURM_CONF = "..." }`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.targets.base import CommandResult
from orchestrator.targets.ssh import SshTarget
from orchestrator.wrapper import check_env_name

if TYPE_CHECKING:
    from orchestrator.config import SlurmTarget as SlurmConfig


class SlurmTarget(SshTarget):
    """A Slurm login node. `config` is the target's orch.toml section (partition, defaults)."""

    kind = "slurm"

    def __init__(self, name: str, *, config: SlurmConfig, **kwargs: Any) -> None:
        super().__init__(name, kind="slurm", **kwargs)
        self.config = config

    def __repr__(self) -> str:
        return f"SlurmTarget({self.name!r}, {self.user}@{self.host}:{self.port})"

    def _env_prefix(self) -> list[str]:
        return [f"{check_env_name(k)}={v}" for k, v in self.env.items()]

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        cwd: str | None = None,
        check: bool = False,
    ) -> CommandResult:
        prefix = self._env_prefix()
        full = ["env", *prefix, *argv] if prefix and argv else argv
        res = super().run(full, timeout=timeout, stdin=stdin, cwd=cwd, check=check)
        return CommandResult(tuple(argv), res.returncode, res.stdout, res.stderr)

    def agent_argv(self) -> list[str]:
        argv = super().agent_argv()
        assert argv[0] == "env"
        return [argv[0], *self._env_prefix(), *argv[1:]]
