"""The pure pieces of array jobs (one task per seed): task ids, `--array` specs, squeue's array
lines (per task, and a pending array collapsed into one record), `aftercorr` options, the job
script's task switch, and array tasks in the state machine (no cluster needed)."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.monitor.statemachine import Limits, RunState, transition
from orchestrator.slurm import jobscript
from state.models import RunObservation, RunSpec, SlurmJob, WorkerTask
from state.phases import Phase
from state.slurm import (
    after_comment,
    array_spec,
    failed_upstream,
    group_tasks,
    parse_array_tasks,
    parse_squeue,
    split_job_id,
    squeue_argv,
    task_job_id,
)
from tests.slurm.test_slurm_unit import cfg

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
LIM = Limits(stale_after_s=60, timeout_s=600, unreachable_alert_after_s=120, exit_grace_s=6)
RUN_DIR = "runs/s4/20260101-120000-t1"


def test_task_ids_and_array_specs():
    assert task_job_id("12", 1) == "12_1"
    assert split_job_id("12_1") == ("12", 1) and split_job_id("12") == ("12", None)
    for bad in ("12_", "12_*", "a_1", "12_1_2"):
        with pytest.raises(ValueError):
            split_job_id(bad)
    with pytest.raises(ValueError):
        task_job_id("1;x", 0)
    assert array_spec([0, 1, 2]) == "0-2"
    assert array_spec([2, 0, 3, 5, 6, 7]) == "0,2-3,5-7"
    assert array_spec([4]) == "4"
    for bad in ([], [-1]):
        with pytest.raises(ValueError):
            array_spec(bad)


@pytest.mark.parametrize(
    ("text", "tasks"),
    [
        ("3", [3]),
        ("0-2", [0, 1, 2]),
        ("0,2-4", [0, 2, 3, 4]),
        ("[0-6:2]%2", [0, 2, 4, 6]),
        ("[1,3]", [1, 3]),
        ("N/A", None),
        ("", None),
        ("4-2", None),
        ("0-99999999", None),
    ],
)
def test_squeue_array_task_ranges(text, tasks):
    assert parse_array_tasks(text) == tasks


def test_squeue_argv_lists_every_task():
    argv = squeue_argv(["12_0", "12_1"])
    assert argv[3:6] == ["--jobs", "12_0,12_1", "--array"]
    assert "ArrayJobID:|,ArrayTaskID:|,Comment:|" in argv[-1]


def test_squeue_lines_of_array_tasks_pending_collapsed_and_plain_jobs():
    # what Slurm 22.05 printed on the test cluster (JobID is the task's own id once scheduled)
    out = (
        "1|COMPLETED|None|0|0|(null)|1|N/A|(null)|\n"
        "4|PENDING|None|0|0|aftercorr:2_*(unfulfilled)|4|0-3|orch-after 2_0=s/r-t0|\n"
        "9|FAILED|NonZeroExitCode|768|0|(null)|2|1|(null)|\n"
        "2|RUNNING|None|0|0|(null)|2|2|(null)|\n"
        "6|CANCELLED|DependencyNeverSatisfied|0|0|aftercorr:2_*(failed)|5|1|(null)|\n"
        "3|PENDING|None|0|0|(null)|3|[0,2]%1|(null)|\n"
        "14|RUNNING|None|0|0|afterok:11(failed)|orch-after 11=s/r1|\n"  # older: no array fields
    )
    jobs = parse_squeue(out)
    assert jobs["1"].state == "COMPLETED"
    assert {f"4_{i}" for i in range(4)} <= set(jobs)
    assert jobs["4_3"].state == "PENDING" and jobs["4_3"].comment == "orch-after 2_0=s/r-t0"
    assert jobs["2_1"] == SlurmJob(
        job_id="2_1", state="FAILED", reason="NonZeroExitCode", exit_code=3
    )
    assert jobs["2_2"].state == "RUNNING" and "2" not in jobs and "9" not in jobs
    assert jobs["5_1"].dependency == "aftercorr:2_*(failed)"
    assert {"3_0", "3_2"} <= set(jobs) and "3_1" not in jobs
    assert jobs["14"].comment == "orch-after 11=s/r1"


def test_tasks_are_grouped_by_the_arrays_they_wait_on():
    assert group_tasks({0: ["11"], 1: ["11"], 2: ["11"]}) == [(("11",), [0, 1, 2])]
    assert group_tasks({0: [], 1: []}) == [((), [0, 1])]
    # --resume: seed 0's upstream already succeeded, 1 and 2 wait on a fresh upstream array
    assert group_tasks({2: ["12", "11"], 0: [], 1: ["11", "12"]}) == [
        ((), [0]),
        (("11", "12"), [1, 2]),
    ]


def test_the_failed_upstream_of_an_array_task_is_the_task_of_its_index():
    comment = after_comment({"11_0": "s3/r-t0", "11_1": "s3/r-t1", "11_2": "s3/r-t2"})
    job = SlurmJob(
        job_id="12_1",
        state="CANCELLED",
        reason="DependencyNeverSatisfied",
        dependency="aftercorr:11_*(failed)",
        comment=comment,
    )
    assert failed_upstream(job) == ["s3/r-t1 (Slurm job 11_1)"]
    cleared = job.model_copy(update={"dependency": ""})
    assert failed_upstream(cleared) == ["s3/r-t1 (Slurm job 11_1)"]


def spec() -> RunSpec:
    return RunSpec(
        run_id="20260101-120000-t0",
        stage="stage4",
        stage_dir="s4",
        profile="tiny",
        task=WorkerTask(command="eval", args={"seed": 0}),
        timeout_s=600,
    )


def test_array_options_wait_with_aftercorr():
    after = {"11_0": "s3/r-t0", "11_1": "s3/r-t1"}
    opts = jobscript.sbatch_options(
        cfg(), spec(), job_name="j", run_dir_abs="/w/runs/s4/r-t%a", code_dir="/c",
        after=after, array="0-1",
    )  # fmt: skip
    assert "--array=0-1" in opts and "--output=/w/runs/s4/r-t%a/stdout.log" in opts
    assert "--dependency=aftercorr:11" in opts and "--kill-on-invalid-dep=yes" in opts
    assert "--comment=orch-after 11_0=s3/r-t0 11_1=s3/r-t1" in opts
    assert jobscript.dependency_option(["11_0", "12_0", "11_1"]) == "--dependency=aftercorr:11:12"
    assert jobscript.dependency_option(["3", "4"]) == "--dependency=afterok:3:4"
    with pytest.raises(ValueError):
        jobscript.dependency_option(["3", "4_0"])


def test_the_array_job_script_runs_the_task_of_its_index(tmp_path):
    dirs = {i: tmp_path / f"r t{i}" for i in (0, 1)}
    for d in dirs.values():
        d.mkdir()
    tasks = {
        i: jobscript.ArrayTask(
            seed=10 + i,
            run_dir_abs=str(d),
            command=f"sh -c 'echo ran {i} >\"$0/out\"; echo 7 >\"$0/exit_code\"' '{d}'",
        )
        for i, d in dirs.items()
    }
    script = tmp_path / "job.sh"
    script.write_text(jobscript.array_job_script(tasks, submit_line="sbatch --array=0-1 job.sh"))

    def run(task: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": task, "SLURM_JOB_ID": "5"}
        return subprocess.run(
            ["sh", str(script)], capture_output=True, text=True, env=env, timeout=20
        )

    res = run("1")
    assert res.returncode == 0, res.stderr
    assert f"orch: array task 1 (seed 11): {dirs[1]}" in res.stdout
    assert (dirs[1] / "out").read_text() == "ran 1\n" and not (dirs[0] / "out").exists()
    bad = run("7")
    assert bad.returncode == 2 and "array task 7 is not one of this job's" in bad.stderr


def state(**kw: object) -> RunState:
    from dataclasses import replace

    base = RunState(
        stage_dir="s4",
        run_id="20260101-120000-t1",
        stage="stage4",
        target="cluster",
        phase=Phase.QUEUED,
        started_at=T0,
        run_dir=RUN_DIR,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_a_cancelled_array_task_names_its_own_upstream_task():
    job = SlurmJob(
        job_id="12_1",
        state="CANCELLED",
        reason="DependencyNeverSatisfied",
        dependency="aftercorr:11_*(failed)",
        comment=after_comment({"11_0": "s3/r-t0", "11_1": "s3/r-t1"}),
    )
    new, alerts = transition(state(), RunObservation(run_dir=RUN_DIR, slurm=job), T0, LIM)
    assert new.phase == Phase.CANCELLED and not alerts
    assert new.reason == "never ran: upstream s3/r-t1 (Slurm job 11_1) did not succeed"


def test_a_queued_task_that_left_squeue_with_an_empty_run_dir_never_ran():
    """Slurm drops a pending array task cancelled with `scancel 12_1` from squeue at once."""
    gone = RunObservation(run_dir=RUN_DIR, slurm=SlurmJob(job_id="12_1", known=False))
    s1, a1 = transition(state(), gone, T0 + timedelta(seconds=1), LIM)
    assert s1.phase == Phase.QUEUED and not a1
    s2, a2 = transition(s1, gone, T0 + timedelta(seconds=10), LIM)
    assert s2.phase == Phase.CANCELLED and not a2 and "never ran" in s2.reason
    # something in the run dir: it ran, and the run dir is the witness (as for any job)
    ran = gone.model_copy(update={"exit_code": 0, "complete": True, "manifest_present": True})
    s3, _ = transition(state(), ran, T0 + timedelta(seconds=10), LIM)
    assert s3.phase == Phase.SUCCEEDED


def test_tasks_that_left_slurms_memory_are_not_listed(tmp_path, monkeypatch):
    """squeue asked about one id Slurm forgot exits 1 ("Invalid job id specified"): that job is
    `known=False` (judged by its run dir), not "Slurm cannot tell"."""
    from state.slurm import query_jobs

    fake = tmp_path / "squeue"
    fake.write_text(
        '#!/bin/sh\necho "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert query_jobs(["12_1"]) == {"12_1": SlurmJob(job_id="12_1", known=False)}
    fake.write_text('#!/bin/sh\necho "slurm_load_jobs error: Unable to contact" >&2\nexit 1\n')
    assert all(j.error for j in query_jobs(["12_0"]).values())
