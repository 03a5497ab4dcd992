"""`orch run-all --target CLUSTER --seeds N` on the Slurm test cluster: one array job per stage
(`sbatch --array=0-(N-1)`, task i running seed i), each downstream array after its upstream
arrays with `aftercorr`, every task a run of its own; a seed whose upstream fails has only its
own dependents cancelled (submitted with `--detach`, followed with `orch status`; `--resume`
refused while it runs); `orch stop` of one seed's run cancels that task alone.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.launch import run_seed, stop_run
from state.models import RunRecord
from state.phases import Phase
from state.slurm import split_job_id
from tests.integration.test_launch import exec_stage
from tests.slurm.cluster import SlurmCluster
from tests.slurm.test_slurm_graph import STUDY, run_all_args, study_project
from tests.webhook import Webhook
from worker.lifecycle import TEST_FAIL_SEED_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def runs_by_stage(ctx: Context) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = defaultdict(list)
    for r in ctx.store.list_runs():
        out[r.stage].append(r)
    return out


def by_seed(recs: list[RunRecord]) -> dict[int | None, RunRecord]:
    return {run_seed(r): r for r in recs}


def show_job(cluster: SlurmCluster, job_id: str) -> str:
    return cluster.client(["scontrol", "-o", "show", "job", job_id]).stdout


def test_three_seeds_one_array_job_per_stage(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch, small_model, capsys
):
    pytest.importorskip("torch")
    hook = Webhook()
    root = study_project(tmp_path, slurm_login, monkeypatch, hook.url)
    try:
        rc = main([*run_all_args(small_model), "--seeds", "3"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "one array job per stage" in out and "(aftercorr)" in out, out
        ctx = Context()
        try:
            runs = runs_by_stage(ctx)
            assert set(runs) == STUDY
            arrays = set()
            for stage, recs in runs.items():
                assert len(recs) == 3, (stage, recs)
                assert {run_seed(r) for r in recs} == {0, 1, 2}, recs
                assert len({r.run_dir for r in recs}) == 3
                # one sbatch per stage: the three runs are tasks 0-2 of one array job
                ids = {split_job_id(r.job_id) for r in recs}
                bases = {b for b, _ in ids}
                assert len(bases) == 1 and {t for _, t in ids} == {0, 1, 2}, ids
                arrays |= bases
                for r in recs:  # task i runs seed i, in its own run dir
                    assert r.run_id.endswith(f"-t{split_job_id(r.job_id)[1]}")
                    assert split_job_id(r.job_id)[1] == run_seed(r)
                assert all(r.phase == Phase.SUCCEEDED for r in recs), recs
                assert all(r.pulled_at is not None for r in recs), recs
            assert len(arrays) == len(STUDY)
            for stage, upstream in (("stage4", "stage3b"), ("stage4a", "stage3a")):
                down, up = by_seed(runs[stage]), by_seed(runs[upstream])
                up_array = split_job_id(up[0].job_id)[0]
                for seed in (0, 1, 2):
                    spec = json.loads(down[seed].spec_json)
                    assert spec["task"]["args"]["seed"] == seed
                    # seed S's stage 4 evaluates seed S's checkpoint
                    assert spec["task"]["args"]["model"].endswith(
                        f"{up[seed].run_dir}/checkpoints/final"
                    )
                    script = (tmp_path / "remote" / down[seed].run_dir / "job.sh").read_text()
                    assert f"--dependency=aftercorr:{up_array}" in script, script
                    assert "--array=0-2" in script and "--kill-on-invalid-dep=yes" in script
                    assert 'case "${SLURM_ARRAY_TASK_ID:-}" in' in script
                    job = show_job(slurm_cluster, down[seed].job_id)
                    assert f"ArrayTaskId={seed} " in job, job
                    assert f"{up[seed].job_id}={up[seed].key}" in job, job  # the comment
                    assert "KillOInInvalidDependent=Yes" in job, job
                    log = (tmp_path / "remote" / down[seed].run_dir / "stdout.log").read_text()
                    assert f"orch: array task {seed} (seed {seed})" in log, log
        finally:
            ctx.close()
        assert "seeds    0, 1, 2:" in out, out
        report = (root / "reports" / "RESULTS.md").read_text()
        assert "3 seeds (0, 1, 2)" in report
    finally:
        hook.close()


def test_a_failed_seed_cancels_only_its_own_dependents(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch, small_model, capsys
):
    pytest.importorskip("torch")
    hook = Webhook()
    study_project(tmp_path, slurm_login, monkeypatch, hook.url, extra_env={TEST_FAIL_SEED_ENV: "1"})
    try:
        # --detach: submitted, and the command returns at once (the laptop may close).
        rc = main([*run_all_args(small_model), "--seeds", "2", "--detach"])
        out = capsys.readouterr()
        assert rc == 0 and "submitted" in out.out, out
        # --resume while that graph is queued or running would submit its stages twice.
        rc = main([*run_all_args(small_model), "--seeds", "2", "--resume"])
        err = capsys.readouterr()
        assert rc != 0 and "still queued or running" in err.err + err.out, err
        # Nobody waits: `orch status` (which refreshes when no watcher runs) sees it through.
        deadline = time.monotonic() + 300
        while True:
            assert main(["status", "--json"]) == 0
            capsys.readouterr()
            ctx = Context()
            try:
                active = ctx.store.list_runs(active_only=True)
            finally:
                ctx.close()
            if not active:
                break
            assert time.monotonic() < deadline, active
            time.sleep(2)
        ctx = Context()
        try:
            runs = {stage: by_seed(recs) for stage, recs in runs_by_stage(ctx).items()}
            assert set(runs) == STUDY
            for stage in STUDY:  # seed 0 is untouched by seed 1's failure
                assert runs[stage][0].phase == Phase.SUCCEEDED, runs[stage][0]
            for stage in STUDY - {"stage4", "stage4a"}:
                rec = runs[stage][1]
                assert rec.phase == Phase.FAILED and TEST_FAIL_SEED_ENV in rec.reason, rec
            for stage, upstream in (("stage4", "stage3b"), ("stage4a", "stage3a")):
                rec, up = runs[stage][1], runs[upstream][1]
                assert rec.phase == Phase.CANCELLED, rec
                assert f"upstream {up.key} (Slurm job {up.job_id}) did not succeed" in rec.reason
                job = show_job(slurm_cluster, rec.job_id)
                assert "JobState=CANCELLED" in job and "DependencyNeverSatisfied" in job, job
                assert f"aftercorr:{split_job_id(up.job_id)[0]}_*(failed)" in job, job
                ok = show_job(slurm_cluster, runs[stage][0].job_id)
                assert "JobState=COMPLETED" in ok, ok
        finally:
            ctx.close()
    finally:
        hook.close()


def test_stop_of_one_seed_cancels_that_array_task_only(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch
):
    from orchestrator.graph_runner import _submit_array

    study_project(tmp_path, slurm_login, monkeypatch, "http://127.0.0.1:9/")
    spec = exec_stage("sleeper", "sleep", "120")
    seeds = [0, 1, 2]
    ctx = Context()
    try:
        recs = _submit_array(
            ctx, "cluster", "sleeper", {s: {"sleeper": spec} for s in seeds}, seeds,
            {s: i for i, s in enumerate(seeds)}, {s: {} for s in seeds}, "tiny", True,
        )  # fmt: skip
        base = split_job_id(recs[0].job_id)[0]
        assert [r.job_id for r in recs] == [f"{base}_{i}" for i in range(3)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = slurm_cluster.client(
                ["squeue", "-h", "-r", "-j", base, "-o", "%i %T"]
            ).stdout.split("\n")
            if sum("RUNNING" in s for s in states) == 3:
                break
            time.sleep(0.5)
        assert sum("RUNNING" in s for s in states) == 3, states
        stopped = stop_run(ctx, recs[1])
        assert stopped.phase == Phase.CANCELLED and f"scancel {base}_1" in stopped.reason
        rows = dict(
            line.split()
            for line in slurm_cluster.client(
                ["squeue", "-h", "-r", "-t", "all", "-j", base, "-o", "%i %T"]
            ).stdout.splitlines()
        )
        assert rows[f"{base}_1"] == "CANCELLED", rows
        assert rows[f"{base}_0"] == "RUNNING" and rows[f"{base}_2"] == "RUNNING", rows
    finally:
        slurm_cluster.client(["scancel", "--full", "--partition", "debug"])
        ctx.close()
