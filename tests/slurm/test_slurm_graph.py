"""`orch run-all --target CLUSTER` on the Slurm test cluster: the whole tiny study submitted at
once as the cluster's own `afterok` graph, watched (the watcher killed and restarted halfway),
pulled and reported; and a graph whose first stages fail: Slurm cancels their dependents, which
orch records as `cancelled` naming the failed upstream run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from state.phases import Phase
from tests.integration.test_launch import make_project
from tests.slurm.cluster import SlurmCluster
from tests.slurm.conftest import slurm_toml
from tests.webhook import Webhook

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY = {"stage1", "stage2", "stage3a", "stage3b", "stage3b-leaky", "stage4", "stage4a"}
SMALL = [
    "max_steps=12",
    "eval_every=6",
    "probe_every=6",
    "save_every=12",
    "log_every=3",
    "eval_batches=1",
    "batch_size=4",
    "probe_batch_size=2",
    "tasks.0.limit=16",
    "tasks.1.limit=16",
    "tasks.2.limit=16",
]


def study_project(
    tmp_path: Path, server, monkeypatch, hook_url: str, extra_env: dict[str, str] | None = None
) -> Path:
    cache = os.environ.get("ORCH_CACHE_DIR") or str(tmp_path / "cache")
    env = {"ORCH_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(extra_env or {})
    toml = slurm_toml(server, tmp_path / "remote", env=env)
    toml += "[targets.cluster.monitor]\ninterval_s = 1\n"
    toml += f'\n[alerts]\nurls = ["{hook_url}"]\n\n[experiment]\nprofile = "tiny"\n'
    root = make_project(tmp_path / "proj", toml)
    monkeypatch.chdir(root)
    return root


def run_all_args(small_model: str, *extra: str) -> list[str]:
    args = ["run-all", "--target", "cluster", "--set", f"model={small_model}"]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return args


class Watcher:
    """`orch watch` as a real process of its own, killed (SIGKILL) and restarted at will."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        log = open(self.root / f"watch{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "watch"],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(self.root)},
        )
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def terminal_count(root: Path) -> int:
    ctx = Context(cwd=root)
    try:
        return sum(1 for r in ctx.store.list_runs() if r.phase.is_terminal)
    finally:
        ctx.close()


def test_the_tiny_study_as_one_graph_watched_pulled_and_reported(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch, small_model, capsys
):
    pytest.importorskip("torch")
    hook = Webhook()
    root = study_project(tmp_path, slurm_login, monkeypatch, hook.url)
    watcher = Watcher(root)
    restarted = threading.Event()
    stop = threading.Event()

    def kill_and_restart_halfway() -> None:
        while not stop.is_set() and terminal_count(root) < 3:
            time.sleep(0.5)
        if stop.is_set():
            return
        watcher.kill()
        time.sleep(3)  # runs end while nobody watches: run-all's own wait polls meanwhile
        watcher.start()
        restarted.set()

    watcher.start()
    helper = threading.Thread(target=kill_and_restart_halfway, daemon=True)
    helper.start()
    try:
        rc = main(run_all_args(small_model))
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "submitted at once" in out and "after stage3b (job" in out, out
        ctx = Context()
        try:
            runs = {r.stage: r for r in ctx.store.list_runs()}
            assert set(runs) == STUDY
            assert all(r.phase == Phase.SUCCEEDED for r in runs.values()), runs
            assert all(r.pulled_at is not None for r in runs.values())
            for stage, upstream in (("stage4", "stage3b"), ("stage4a", "stage3a")):
                spec = json.loads(runs[stage].spec_json)
                assert spec["task"]["args"]["model"].endswith(
                    f"{runs[upstream].run_dir}/checkpoints/final"
                )
                job = slurm_cluster.client(
                    ["scontrol", "-o", "show", "job", runs[stage].job_id]
                ).stdout
                # (Slurm clears a met dependency; the comment keeps the edge)
                up = runs[upstream]
                assert f"Comment=orch-after {up.job_id}={up.key}" in job, job
                assert "KillOInInvalidDependent=Yes" in job, job
            assert (root / "reports" / "RESULTS.md").is_file()
        finally:
            ctx.close()
        stop.set()
        helper.join(30)
        assert restarted.is_set() and watcher.starts == 2
        # every stage alerted once, across the watcher's death and run-all's own polling
        hook.wait_for(count=len(STUDY), timeout=60)
        time.sleep(3)
        ctx = Context()
        try:
            rows = list(ctx.store.query("SELECT stage_dir, kind, delivered_at FROM alerts"))
        finally:
            ctx.close()
        stage_dirs = sorted(r["stage_dir"] for r in rows)
        assert stage_dirs == sorted(r.stage_dir for r in runs.values()), rows
        assert all(r["kind"] == "succeeded" and r["delivered_at"] for r in rows), rows
        assert len(hook.posts) == len(STUDY), hook.titles()
    finally:
        stop.set()
        watcher.kill()
        hook.close()


def test_a_failed_upstream_cancels_its_dependents_and_says_so(
    slurm_login, slurm_cluster: SlurmCluster, tmp_path, monkeypatch, small_model, capsys
):
    hook = Webhook()
    root = study_project(tmp_path, slurm_login, monkeypatch, hook.url)
    try:
        # no such model: every first stage fails at load, fast
        rc = main(run_all_args(str(root / "no-such-model")))
        assert rc != 0
        ctx = Context()
        try:
            runs = {r.stage: r for r in ctx.store.list_runs()}
            assert set(runs) == STUDY
            for stage in STUDY - {"stage4", "stage4a"}:
                assert runs[stage].phase == Phase.FAILED, runs[stage]
            for stage, upstream in (("stage4", "stage3b"), ("stage4a", "stage3a")):
                rec = runs[stage]
                assert rec.phase == Phase.CANCELLED, rec
                up = runs[upstream]
                assert f"upstream {up.key} (Slurm job {up.job_id}) did not succeed" in rec.reason
                job = slurm_cluster.client(["scontrol", "-o", "show", "job", rec.job_id]).stdout
                assert "JobState=CANCELLED" in job and "DependencyNeverSatisfied" in job, job
        finally:
            ctx.close()
        err = capsys.readouterr()
        assert "graph stopped" in err.err + err.out
    finally:
        hook.close()
