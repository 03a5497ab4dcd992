"""The pure pieces of the Slurm target: squeue parsing, the sbatch options and job script, the
config keys, and Slurm's word in the state machine (no cluster needed)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator import wrapper
from orchestrator.config import parse_config
from orchestrator.monitor.statemachine import Limits, RunState, transition
from orchestrator.slurm import jobscript
from state import names
from state.errors import ConfigError
from state.models import RunFailed, RunObservation, RunSpec, SlurmJob, WorkerTask
from state.phases import Phase
from state.slurm import (
    after_comment,
    check_job_id,
    failed_upstream,
    parse_after,
    parse_squeue,
    squeue_argv,
    wait_status_exit,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
LIM = Limits(stale_after_s=60, timeout_s=600, unreachable_alert_after_s=120, exit_grace_s=6)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def cfg(**kw: object):
    data = {"kind": "slurm", "host": "login.example", **kw}
    return parse_config({"targets": {"c": data}}).targets["c"]


# -- squeue ------------------------------------------------------------------------------------
def test_parse_squeue_and_exit_codes():
    out = "1|FAILED|NonZeroExitCode|768|0|\n2|PENDING|Dependency|0|1|\n3|CANCELLED by 0|None|15|0|\nbad\n"
    jobs = parse_squeue(out)
    assert jobs["1"] == SlurmJob(job_id="1", state="FAILED", reason="NonZeroExitCode", exit_code=3)
    assert jobs["2"].state == "PENDING" and jobs["2"].restarts == 1 and jobs["2"].exit_code == 0
    assert jobs["3"].state == "CANCELLED" and jobs["3"].reason == "" and jobs["3"].exit_code == 143
    assert set(jobs) == {"1", "2", "3"}
    assert wait_status_exit("9") == 137 and wait_status_exit("x") is None


def test_squeue_argv_and_job_ids():
    argv = squeue_argv(["12", "13_2"])
    assert argv[:4] == ["squeue", "--noheader", "--states=all", "--jobs"]
    assert argv[4] == "12,13_2" and argv[-1].startswith("JobID:|,State:|")
    for bad in ("", "1;rm -rf /", "-1", "12 13"):
        with pytest.raises(ValueError):
            check_job_id(bad)


# -- config and job script ---------------------------------------------------------------------
def test_config_keys_are_checked():
    c = cfg(partition="gpu", account="lab", qos="normal", mem="32G", cpus_per_task=8)
    assert c.kind == "slurm" and c.host == "login.example" and c.requeue is False
    for bad in ({"partition": "a b"}, {"mem": "lots"}, {"sbatch_args": ["-x"]}, {"partiton": "x"}):
        with pytest.raises(ConfigError):
            cfg(**bad)


def spec(**kw: object) -> RunSpec:
    base = {
        "run_id": "20260101-120000",
        "stage": "train",
        "stage_dir": "train_dir",
        "task": WorkerTask(command="exec", args={"argv": ["true"]}),
        "timeout_s": 3600,
    }
    return RunSpec.model_validate({**base, **kw})


def test_sbatch_options_from_the_stage_and_the_target():
    c = cfg(
        partition="gpu",
        account="lab",
        qos="high",
        cpus_per_task=8,
        mem="64G",
        gpu_type="a100",
        requeue=True,
        signal_before_s=120,
        sbatch_args=["--constraint=ib"],
    )
    opts = jobscript.sbatch_options(
        c,
        spec(resources={"gpus": 2}),
        job_name="orch-train-20260101-120000",
        run_dir_abs="/scratch/w/runs/train_dir/20260101-120000",
        code_dir="/scratch/w/code",
    )
    assert "--output=/scratch/w/runs/train_dir/20260101-120000/stdout.log" in opts
    assert "--open-mode=append" in opts and "--chdir=/scratch/w/code" in opts
    assert "--time=61" in opts  # 3600 s + the default 60 s margin, whole minutes
    assert {"--partition=gpu", "--account=lab", "--qos=high", "--requeue"} <= set(opts)
    assert {"--cpus-per-task=8", "--mem=64G", "--gres=gpu:a100:2"} <= set(opts)
    assert "--signal=B:USR1@120" in opts and opts[-1] == "--constraint=ib"

    plain = jobscript.sbatch_options(
        cfg(), spec(timeout_s=10), job_name="j", run_dir_abs="/r", code_dir="/c"
    )
    assert "--no-requeue" in plain and "--time=2" in plain
    assert not [o for o in plain if o.startswith(("--gres", "--partition", "--mem"))]
    assert jobscript.time_limit_minutes(0) == 1
    assert jobscript.parse_job_id("123;cluster\n") == "123" and jobscript.parse_job_id("") is None


def test_job_script_is_valid_sh_and_runs_the_command(tmp_path):
    rd = tmp_path / "run dir"
    rd.mkdir()
    cmd = shlex.join(["sh", "-c", 'echo "ran in $0"; exit 7', "x"])
    text = jobscript.job_script(str(rd), cmd, submit_line="sbatch --parsable job.sh")
    assert text.startswith("#!/bin/sh\n") and "#   sbatch --parsable job.sh" in text
    (rd / "exit_code").write_text("9\n")
    script = tmp_path / "job.sh"
    script.write_text(text)
    res = subprocess.run(
        ["sh", str(script)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"},
        timeout=20,
    )
    assert res.returncode == 7 and "ran in x" in res.stdout, res
    assert "restarted (restart 1)" in res.stdout
    assert not (rd / "exit_code").exists()  # a rerun's exit code is its own


# -- the state machine -------------------------------------------------------------------------
def state(**kw: object) -> RunState:
    base = RunState(
        stage_dir="s1",
        run_id="20260101-120000",
        stage="stage1",
        target="cluster",
        phase=Phase.QUEUED,
        started_at=T0,
        run_dir="runs/s1/20260101-120000",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def sobs(st: str = "", *, reason: str = "", known: bool = True, error: str = "", **kw: object):
    job = SlurmJob(job_id="7", state=st, reason=reason, known=known, error=error)
    if "restarts" in kw:
        job.restarts = int(kw.pop("restarts"))  # type: ignore[call-overload]
    return RunObservation(run_dir="runs/s1/20260101-120000", slurm=job, **kw)  # type: ignore[arg-type]


DONE = {"complete": True, "manifest_present": True, "exit_code": 0}

CASES = [
    ("pending: queued with the reason", state(), sobs("PENDING", reason="Resources"), 5,
     Phase.QUEUED, [], "Resources"),
    ("pending for hours: no timeout, no hang", state(), sobs("PENDING", reason="Priority"), 9999,
     Phase.QUEUED, [], "Priority"),
    ("requeued after a node failure: not a crash", state(phase=Phase.RUNNING),
     sobs("PENDING", reason="BeginTime", restarts=1), 5, Phase.QUEUED, [], "requeued 1"),
    ("running", state(), sobs("RUNNING"), 5, Phase.RUNNING, [], ""),
    ("running past the laptop timeout: Slurm enforces --time", state(phase=Phase.RUNNING),
     sobs("RUNNING"), 9999, Phase.RUNNING, [], ""),
    ("running, wrapper saw SIGTERM: wait for Slurm's word", state(phase=Phase.RUNNING),
     sobs("COMPLETING", exit_code=143), 5, Phase.RUNNING, [], ""),
    ("completed with markers: succeeded", state(phase=Phase.RUNNING), sobs("COMPLETED", **DONE),
     5, Phase.SUCCEEDED, ["succeeded"], ""),
    ("completed, exit 0, no marker: failed", state(phase=Phase.RUNNING),
     sobs("COMPLETED", exit_code=0), 5, Phase.FAILED, ["failed"], "not a success"),
    ("failed with .run_failed", state(phase=Phase.RUNNING),
     sobs("FAILED", exit_code=1, failed_marker=True, failed=RunFailed(run_id="20260101-120000", reason="boom")), 5,
     Phase.FAILED, ["failed"], "boom"),
    ("failed before the wrapper ran", state(phase=Phase.RUNNING),
     sobs("FAILED", reason="JobLaunchFailure"), 5, Phase.FAILED, ["failed"], "JobLaunchFailure"),
    ("out of memory", state(phase=Phase.RUNNING), sobs("OUT_OF_MEMORY", exit_code=137), 5,
     Phase.FAILED, ["failed"], "out of memory"),
    ("cancelled outside orch", state(phase=Phase.RUNNING), sobs("CANCELLED", exit_code=143), 5,
     Phase.CANCELLED, [], "scancel"),
    ("cancelled by orch stop", state(cancel_requested=True), sobs("PENDING"), 5,
     Phase.CANCELLED, [], "stopped by the user"),
    ("timeout", state(phase=Phase.RUNNING), sobs("TIMEOUT", exit_code=143), 5,
     Phase.TIMED_OUT, ["timed_out"], "time limit"),
    ("node failure: lost", state(phase=Phase.RUNNING), sobs("NODE_FAIL"), 5, Phase.LOST,
     ["lost"], "NODE_FAIL"),
    ("preempted: lost", state(phase=Phase.RUNNING), sobs("PREEMPTED"), 5, Phase.LOST, ["lost"],
     "preempted"),
    ("timeout, but the run finished: succeeded", state(phase=Phase.RUNNING),
     sobs("TIMEOUT", **DONE), 5, Phase.SUCCEEDED, ["succeeded"], ""),
    ("forgotten by Slurm, run dir complete: succeeded", state(phase=Phase.RUNNING),
     sobs(known=False, **DONE), 5, Phase.SUCCEEDED, ["succeeded"], ""),
    ("Slurm cannot be asked: unchanged", state(phase=Phase.RUNNING),
     sobs(error="squeue failed: slurm_load_jobs error"), 5, Phase.RUNNING, [], "cannot tell"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "prev", "observation", "t", "phase", "kinds", "reason"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_slurm_word_in_the_state_machine(name, prev, observation, t, phase, kinds, reason):
    new, alerts = transition(prev, observation, at(t), LIM)
    assert new.phase == phase, (name, new)
    assert [a.kind for a in alerts] == kinds, (name, alerts)
    assert reason in new.reason, (name, new.reason)


def test_forgotten_job_with_nothing_in_its_run_dir_crashes_after_the_grace():
    prev = state(phase=Phase.RUNNING)
    s1, a1 = transition(prev, sobs(known=False), at(5), LIM)
    assert s1.phase == Phase.RUNNING and not a1
    s2, a2 = transition(s1, sobs(known=False), at(20), LIM)
    assert s2.phase == Phase.CRASHED and [a.kind for a in a2] == ["crashed"]


def test_queued_time_does_not_count_as_a_hang():
    s1, _ = transition(state(), sobs("PENDING", reason="Priority"), at(500), LIM)
    s2, alerts = transition(s1, sobs("RUNNING"), at(530), LIM)
    assert s2.phase == Phase.RUNNING and not alerts  # stale clock started at 500, not at launch


def test_job_script_forwards_usr1_to_the_worker_and_leaves_the_request(tmp_path):
    """USR1 to the batch shell: `.checkpoint_request` in the run dir, USR1 to the pid file's
    process (which started with USR1 ignored, so an early one cannot kill it), and the job
    goes on waiting for the wrapper."""
    rd = tmp_path / "rd"
    rd.mkdir()
    worker = (
        "import os, signal, sys, time\n"
        "assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
        f"open({str(rd / 'pid')!r}, 'w').write(str(os.getpid()))\n"
        "deadline = time.time() + 15\n"
        "while not got and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print('worker got', len(got), flush=True)\n"
        "sys.exit(0 if got else 5)\n"
    )
    cmd = shlex.join([sys.executable, "-c", worker])
    script = tmp_path / "job.sh"
    script.write_text(jobscript.job_script(str(rd), cmd))
    proc = subprocess.Popen(
        ["sh", str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5"},
    )
    deadline = time.monotonic() + 15
    while not (rd / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "worker got 1" in out and "time limit is near (USR1)" in out, out
    assert (rd / names.CHECKPOINT_REQUEST).exists()


def test_an_early_request_file_is_taken_by_the_lifecycle(tmp_path):
    """A warning that came before the worker's handler: the file sets the request at start."""
    from worker.context import SaveRequest
    from worker.lifecycle import _signals_raise

    (tmp_path / names.CHECKPOINT_REQUEST).write_text("")
    req = SaveRequest()
    with _signals_raise(tmp_path, req):
        assert req.take() and not req.take()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert req.take()
    assert not (tmp_path / names.CHECKPOINT_REQUEST).exists()


# -- the study as the cluster's graph --------------------------------------------------------
def test_graph_options_and_the_after_comment():
    opts = jobscript.sbatch_options(
        cfg(), spec(), job_name="j", run_dir_abs="/r", code_dir="/c",
        after={"11": "s3/20260101-120000", "12": "s3a/20260101-120001"},
    )  # fmt: skip
    assert "--dependency=afterok:11:12" in opts and "--kill-on-invalid-dep=yes" in opts
    comment = next(o for o in opts if o.startswith("--comment="))
    assert parse_after(comment.split("=", 1)[1]) == {
        "11": "s3/20260101-120000",
        "12": "s3a/20260101-120001",
    }
    with pytest.raises(ValueError):
        after_comment({"1;rm": "x"})
    plain = jobscript.sbatch_options(cfg(), spec(), job_name="j", run_dir_abs="/r", code_dir="/c")
    assert not [o for o in plain if o.startswith(("--dependency", "--comment"))]


def test_squeue_reads_the_dependency_and_the_comment():
    out = (
        "12|CANCELLED|DependencyNeverSatisfied|0|0|afterok:11(failed)|orch-after 11=s/r1|\n"
        "13|PENDING|None|0|0|(null)|(null)|\n"
        "14|RUNNING|None|0|0|\n"  # an older five-field reading
    )
    jobs = parse_squeue(out)
    assert jobs["12"].dependency == "afterok:11(failed)"
    assert jobs["12"].comment == "orch-after 11=s/r1"
    assert failed_upstream(jobs["12"]) == ["s/r1 (Slurm job 11)"]
    assert jobs["13"].dependency == "" and jobs["13"].comment == ""
    assert jobs["14"].state == "RUNNING"


def test_a_dependency_never_satisfied_is_cancelled_naming_the_upstream():
    job = SlurmJob(
        job_id="12",
        state="CANCELLED",
        reason="DependencyNeverSatisfied",
        dependency="afterok:11(failed),afterok:10",
        comment=after_comment({"10": "a/r0", "11": "b/r1"}),
    )
    obs = RunObservation(run_dir="runs/s1/20260101-120000", slurm=job)
    new, alerts = transition(state(), obs, at(5), LIM)
    assert new.phase == Phase.CANCELLED and not alerts
    assert new.reason == "never ran: upstream b/r1 (Slurm job 11) did not succeed", new.reason
    pending = job.model_copy(update={"state": "PENDING"})
    obs = RunObservation(run_dir="runs/s1/20260101-120000", slurm=pending)
    new, _ = transition(state(), obs, at(5), LIM)
    assert new.phase == Phase.QUEUED and "upstream b/r1" in new.reason


# -- several nodes: srun, one torchrun agent a task ---------------------------------------------
def test_nodes_and_tasks_per_node_are_checked_spec_keys():
    from jobs.stages import get_stage

    st = get_stage("stage3b", "tiny", {"stage3b.nodes": "2", "resources.gpus": 4})
    assert (st.nodes, st.tasks_per_node, st.tasks, st.resources.gpus) == (2, 1, 2, 4)
    assert get_stage("stage3b", "tiny").tasks == 1
    for bad in (0, -1, 2.5, True, "two", None):
        with pytest.raises(ConfigError, match="nodes must be a whole number >= 1"):
            get_stage("stage3b", "tiny", {"nodes": bad})
    with pytest.raises(ConfigError, match="tasks_per_node must be a whole number"):
        get_stage("stage3b", "tiny", {"tasks_per_node": 0})
    with pytest.raises(ConfigError, match="for training stages only"):
        get_stage("stage4", "tiny", {"nodes": 2})


def test_nodes_above_one_need_a_slurm_target():
    from jobs.stages import get_stage
    from orchestrator.launch import check_layout

    st = get_stage("stage3b", "tiny", {"nodes": 2})
    with pytest.raises(ConfigError) as err:
        check_layout(st, "box", "ssh")
    assert "stage3b: nodes=2 tasks_per_node=1 needs a slurm target" in str(err.value)
    assert "'box' is a ssh target" in str(err.value) and "\n" not in str(err.value)
    check_layout(st, "cluster", "slurm")
    check_layout(get_stage("stage3b", "tiny"), "box", "ssh")


def test_multi_task_sbatch_options_and_the_agents_argv():
    from orchestrator.slurm.submit import worker_argv

    c = cfg(cpus_per_task=8, gpu_type="h100")
    two = spec(nodes=2, resources={"gpus": 4})
    opts = jobscript.sbatch_options(c, two, job_name="j", run_dir_abs="/r", code_dir="/c")
    assert "--nodes=2" in opts and "--ntasks-per-node=1" in opts and "--ntasks=1" not in opts
    assert "--gres=gpu:h100:4" in opts and "--cpus-per-task=8" in opts  # both per node/task
    one = jobscript.sbatch_options(c, spec(), job_name="j", run_dir_abs="/r", code_dir="/c")
    assert "--nodes=1" in one and "--ntasks=1" in one
    test_layout = spec(tasks_per_node=2)
    assert jobscript.task_count(test_layout) == 2
    assert "--ntasks-per-node=2" in jobscript.sbatch_options(
        c, test_layout, job_name="j", run_dir_abs="/r", code_dir="/c"
    )

    argv = worker_argv(c, two, "/v/bin/python", "/w/runs/s/r 1", 4)
    assert argv[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=8"]
    assert argv[argv.index("torch.distributed.run") + 1 :] == [
        "--nnodes=$SLURM_NTASKS",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=$rdzv_head:$rdzv_port",
        "--rdzv_id=$SLURM_JOB_ID",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        "-m", "worker", "run", "--run-dir", "/w/runs/s/r 1",
    ]  # fmt: skip
    assert worker_argv(c, spec(), "/py", "/rd", 1) == wrapper.worker_argv("/py", "/rd", 1)
    line = wrapper.wrapper_command(
        wrapper_path="/w/bin/wr.sh", run_dir_abs="/w/runs/s/r 1", argv=argv, env={"K": "a b"}
    )
    # Slurm's variables stay for the job script's shell (double quotes); the rest single-quoted.
    assert '"--rdzv_endpoint=$rdzv_head:$rdzv_port" "--rdzv_id=$SLURM_JOB_ID"' in line
    assert "'K=a b'" in line and "'/w/runs/s/r 1'" in line
    assert 'sh -c \'trap "" USR1; exec "$@"\' orch-agent /v/bin/python' in line
    for bad in ("$(id)", "a b", '"x', "`id`", "${X:-y}", "a\\b", "*", ""):
        with pytest.raises(ValueError):
            wrapper.Expanded(bad)


def test_multi_task_job_script_finds_the_rendezvous_in_slurms_environment(tmp_path):
    """The batch shell reads the first host of the node list (scontrol) and the port from the
    job id, then runs the command with both expanded; without scontrol it is its own host
    (the batch shell runs on the allocation's first node)."""
    rd = tmp_path / "rd"
    rd.mkdir()
    argv = [
        sys.executable, "-c", "import sys; print('argv', sys.argv[1:])",
        wrapper.Expanded("--rdzv_endpoint=$rdzv_head:$rdzv_port"),
        wrapper.Expanded("--nnodes=$SLURM_NTASKS"),
    ]  # fmt: skip
    cmd = " ".join(map(wrapper.quote_item, argv))
    text = jobscript.job_script(str(rd), cmd, nproc=4, tasks=2)
    assert "pkill" not in text  # the pid is srun's: it signals its step itself
    script = tmp_path / "job.sh"
    script.write_text(text)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n'
    )
    (fake / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "123457", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2"}
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu[07-08]", **slurm}
    res = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=20)
    assert res.returncode == 0, res
    port = jobscript.RDZV_PORT_BASE + 123457 % jobscript.RDZV_PORT_SPAN
    assert port == 23457
    assert (
        f"orch: rendezvous c10d at gpu07:{port} (id 123457): 2 torchrun agent(s) on 2" in res.stdout
    )
    assert f"argv ['--rdzv_endpoint=gpu07:{port}', '--nnodes=2']" in res.stdout, res.stdout

    (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    res = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=20)
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert f"argv ['--rdzv_endpoint={host}:{port}'" in res.stdout, res.stdout


def test_multi_task_array_job_script_has_the_rendezvous():
    task = jobscript.ArrayTask(seed=0, run_dir_abs="/r/t0", command="true")
    text = jobscript.array_job_script({0: task}, nproc=2, agents=2)
    assert "rdzv_port=$((20000 + SLURM_JOB_ID % 10000))" in text and "pkill" not in text
    assert "rdzv_head" not in jobscript.array_job_script({0: task}, nproc=2)


def test_run_stages_refuses_nodes_on_a_box_before_anything_starts(tmp_path, monkeypatch):
    from orchestrator.context import Context
    from orchestrator.pipeline_runner import run_stages

    (tmp_path / "orch.toml").write_text('default_target = "box"\n[targets.box]\nkind = "local"\n')
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    ctx = Context()
    try:
        with pytest.raises(ConfigError, match="stage3b: nodes=2 .* needs a slurm target"):
            run_stages(ctx, ["stage3b"], overrides={"stage3b.nodes": 2})
        assert ctx.store.list_runs() == []
    finally:
        ctx.close()
