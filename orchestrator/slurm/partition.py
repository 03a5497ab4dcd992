"""Read a partition's limits from the login node of a `slurm` target, in one round trip.

    part = read_partition(target, cfg.partition)   # jobs.slurm_limits.Partition

One fixed command (`jobs.slurm_limits.ANSWER_SCRIPT` under `sh -c`, no user text in it):
`scontrol` lists every partition, `sinfo` every node of every partition; the partition is picked
(and a missing one named, with those that exist) by the pure parser. `orch plan` uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.slurm_limits import ANSWER_SCRIPT, Partition, partition_from

if TYPE_CHECKING:
    from orchestrator.targets.base import Target

READ_TIMEOUT_S = 30.0


def read_partition(target: Target, partition: str | None) -> Partition:
    """The partition `partition` (None: the cluster's default) as the login node sees it.
    TargetError when Slurm does not answer or the partition does not exist."""
    res = target.run(["sh", "-c", ANSWER_SCRIPT], timeout=READ_TIMEOUT_S)
    return partition_from(res.stdout, partition, where=f"target {target.name!r}")
