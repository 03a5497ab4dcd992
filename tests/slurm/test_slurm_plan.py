"""`orch plan all --target <slurm>` against the real test cluster (tests/slurm/cluster.py): the
partition's limits read from the login node (a real sshd) in one round trip, one row per limit
per stage, and a non-zero exit naming the numbers when a stage's job does not fit.

The fixture's partition `short` has `MaxTime=1` (one minute) and the node two fake GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.integration.test_launch import make_project
from tests.slurm.conftest import slurm_toml

pytestmark = pytest.mark.integration


def test_plan_reads_the_partition_and_refuses_what_does_not_fit(
    slurm_login, slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    toml = slurm_toml(
        slurm_login, tmp_path / "remote", partition="short", time_margin_s=0, cpus_per_task=1,
        mem="200M",
    )  # fmt: skip
    root = make_project(tmp_path / "proj", toml)
    monkeypatch.chdir(root)
    # every stage 60 s (--time=1, as MaxTime); stage3a 10 min, stage2 three GPUs a node
    argv = ["plan", "all", "--target", "cluster", "--profile", "tiny"]
    argv += ["--set", "timeout_s=60", "--set", "stage3a.timeout_s=600"]
    argv += ["--set", "stage2.resources.gpus=3", "--set", "stage1.resources.gpus=1"]
    assert main([*argv, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    rows = {(r["stage"], r["what"]): r for r in out["checks"]}
    assert out["capacity"]["kind"] == "slurm" and out["capacity"]["gpu_count"] == 2
    assert "slurm partition short: 1/1 node(s) up, gpu:2" in out["capacity"]["where"]
    assert "MaxTime 00:01:00" in out["capacity"]["where"]
    assert rows[("target", "partition state")]["ok"] is True
    assert rows[("target", "nodes up")]["ok"] is True

    # a fitting stage: one GPU of two, --time=1 under MaxTime 1, 200 MB of 4000, 1 CPU of 4
    for what in ("GPUs a node", "time limit", "memory a node", "CPUs a node"):
        assert rows[("stage1", what)]["ok"] is True, rows[("stage1", what)]
    assert rows[("stage1", "GPUs a node")]["have"] == "2 a node (gpu:2)"
    assert rows[("stage1", "memory a node")]["need"] == "200 MB (--mem)"
    assert rows[("stage1", "memory a node")]["have"].startswith("RealMemory 4000 MB")

    # over MaxTime: the job script would ask --time=10, the partition allows one minute
    t = rows[("stage3a", "time limit")]
    assert t["ok"] is False and t["need"] == "--time=10 (00:10:00)"
    assert t["have"] == "MaxTime 00:01:00" and "stage3a.timeout_s" in t["fix"]
    # more GPUs than the node has
    g = rows[("stage2", "GPUs a node")]
    assert g["ok"] is False and g["need"] == "3 (gpu)" and g["have"] == "2 a node (gpu:2)"
    assert not out["fits"] and out["verdict"].startswith("does not fit cluster: stage2 needs 3")

    # the login node's env: the runtime contract, as on an ssh box
    assert rows[("box", "python")]["ok"] is True

    # the same plan as a table: the rows, the numbers and the verdict a person reads
    assert main([*argv, "--set", "stage2.resources.gpus=2"]) == 1
    table = capsys.readouterr().out
    assert "MaxTime 00:01:00" in table and "--time=10 (00:10:00)" in table
    assert "does not fit cluster: stage3a needs --time=10" in table


def test_plan_names_the_partitions_when_the_target_s_does_not_exist(
    slurm_login, slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root = make_project(
        tmp_path / "proj", slurm_toml(slurm_login, tmp_path / "remote", partition="gpu")
    )
    monkeypatch.chdir(root)
    assert main(["plan", "all", "--profile", "tiny", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == (
        "cannot run on cluster: partition 'gpu' does not exist on target 'cluster'; its "
        "partitions: debug*, short (* = default)"
    )
