"""Unit tests of the launch pieces: the wrapper script (run for real with sh, no tmux), command
quoting, secrets files, bootstrap's lock hash and install plan, input resolution, pull
verification and the stages table."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.spec import InputRef, StageSpec
from orchestrator import bootstrap, launch, wrapper
from orchestrator.commands import stages as stages_cmd
from orchestrator.context import Context
from orchestrator.pull import excludes_for, verify_local
from state import names
from state.errors import ConfigError, StageError, VerifyError
from state.models import RunRecord, RunSpec, WorkerTask
from state.phases import Phase
from state.protocol import atomic_write_json, build_manifest

WRAPPER = Path(wrapper.__file__).with_name(wrapper.WRAPPER_RESOURCE)


def run_wrapper(run_dir: Path, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(WRAPPER), str(run_dir), "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def exit_code(run_dir: Path) -> str:
    return (run_dir / names.EXIT_CODE).read_text().strip()


# -- the wrapper script ---------------------------------------------------------------------------
def test_wrapper_records_exit_code_pid_and_output(tmp_path):
    rd = tmp_path / "run"
    res = run_wrapper(
        rd, sys.executable, "-c", "import os; print('out', os.getpid()); import sys; sys.exit(3)"
    )
    assert res.returncode == 3
    assert exit_code(rd) == "3"
    log = (rd / names.STDOUT).read_text()
    pid = int((rd / names.PID).read_text())
    assert log.strip() == f"out {pid}"  # the pid file names the command itself, not the wrapper
    # Appended, not truncated: a second run adds to the same log.
    run_wrapper(rd, sys.executable, "-c", "print('again')")
    assert exit_code(rd) == "0"
    assert (rd / names.STDOUT).read_text().splitlines() == [f"out {pid}", "again"]
    assert not list(rd.glob("*.tmp.*"))  # atomic writes leave no temp files


def test_wrapper_records_128_plus_signal_when_the_command_is_killed(tmp_path):
    rd = tmp_path / "run"
    res = run_wrapper(
        rd, sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert res.returncode == 137
    assert exit_code(rd) == "137"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_wrapper_signalled_stops_the_command_and_records_exit_code(tmp_path, sig):
    rd = tmp_path / "run"
    proc = subprocess.Popen(
        ["sh", str(WRAPPER), str(rd), "--", sys.executable, "-c", "import time; time.sleep(60)"]
    )
    deadline = time.monotonic() + 20
    while not (rd / names.PID).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int((rd / names.PID).read_text())
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 128 + sig
    assert exit_code(rd) == str(128 + sig)
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # the child is reaped by now or within moments
            os.kill(child, 0)
            time.sleep(0.05)


def test_wrapper_sources_secrets_then_deletes_them(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    tricky = 'it\'s a $SECRET `with` "quotes"\nand a newline; rm -rf /'
    (rd / wrapper.SECRETS_FILE).write_text(wrapper.secrets_env_text({"MY_TOKEN": tricky}))
    os.chmod(rd / wrapper.SECRETS_FILE, 0o600)
    code = "import os, sys; sys.stdout.write(os.environ['MY_TOKEN'])"
    assert run_wrapper(rd, sys.executable, "-c", code).returncode == 0
    assert (rd / names.STDOUT).read_text() == tricky
    assert not (rd / wrapper.SECRETS_FILE).exists()


def test_wrapper_missing_program_still_writes_exit_code(tmp_path):
    rd = tmp_path / "run"
    run_wrapper(rd, "/nonexistent/python", "-m", "worker")
    assert exit_code(rd) == "127"


# -- command building -----------------------------------------------------------------------------
_env_names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True)
_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)


@given(
    env=st.dictionaries(_env_names, _text, max_size=4),
    argv=st.lists(_text, min_size=1, max_size=5),
    path=_text,
)
def test_wrapper_command_splits_back_to_the_same_argv(env, argv, path):
    cmd = wrapper.wrapper_command(wrapper_path="/w/run.sh", run_dir_abs=path, argv=argv, env=env)
    expected = ["env", *(f"{k}={v}" for k, v in env.items()), "sh", "/w/run.sh", path, "--", *argv]
    assert shlex.split(cmd) == expected


def test_run_env_puts_orch_variables_last_and_rejects_bad_names():
    spec = RunSpec(
        run_id="20260101-000000",
        stage="s",
        stage_dir="d",
        task=WorkerTask(command="exec", args={"argv": ["true"]}),
    )
    env = wrapper.run_env(
        code_dir="/w/code",
        run_dir_abs="/w/runs/d/r",
        spec=spec,
        extra={"PYTHONPATH": "/evil", "A": "1"},
    )
    assert (
        env["PYTHONPATH"] == "/w/code" and env["A"] == "1" and env["ORCH_RUN_DIR"] == "/w/runs/d/r"
    )
    for bad in ("A;B", "1A", "A B", "", "A=B"):
        with pytest.raises(ConfigError, match="environment variable"):
            wrapper.check_env_name(bad)


def test_worker_argv_uses_torchrun_for_several_processes():
    assert wrapper.worker_argv("/py", "/rd") == ["/py", "-m", "worker", "run", "--run-dir", "/rd"]
    argv = wrapper.worker_argv("/py", "/rd", nproc_per_node=4)
    assert argv[:3] == ["/py", "-m", "torch.distributed.run"] and "--nproc_per_node=4" in argv
    assert argv[-5:] == ["-m", "worker", "run", "--run-dir", "/rd"]


def test_tmux_names_are_exact_and_validated():
    assert wrapper.tmux_exact("orch-a-1") == "=orch-a-1"
    with pytest.raises(ConfigError):
        wrapper.tmux_new_session_argv("a;b", "/", "true")
    assert launch.tmux_session_for("stage.x", "20260101-000000") == "orch-stage_x-20260101-000000"


def test_wrapper_path_is_content_addressed():
    p = wrapper.wrapper_remote_path("/w/")
    assert p.startswith("/w/bin/run_wrapper-") and p.endswith(".sh")
    assert wrapper.wrapper_script().startswith(b"#!/bin/sh")


def test_secret_values_reports_missing_names():
    found, missing = launch.secret_values(["HF_TOKEN", "WANDB_API_KEY"], {"HF_TOKEN": "x"})
    assert found == {"HF_TOKEN": "x"} and missing == ["WANDB_API_KEY"]
    with pytest.raises(ConfigError, match="environment variable"):
        launch.secret_values(["HF_TOKEN", "BAD;NAME"], {"HF_TOKEN": "x"})


# -- bootstrap ------------------------------------------------------------------------------------
def test_lock_hash_changes_with_deps_and_python_only():
    a = bootstrap.lock_hash(["torch==2.13.0", "pydantic>=2"], "3.11.7")
    assert a == bootstrap.lock_hash(["pydantic>=2", "torch==2.13.0"], "3.11.7")  # order-free
    assert a != bootstrap.lock_hash(["torch==2.13.0", "pydantic>=2.1"], "3.11.7")
    assert a != bootstrap.lock_hash(["torch==2.13.0", "pydantic>=2"], "3.12.1")


def test_install_plan_keeps_the_images_torch():
    reqs = ["pydantic>=2", "Torch==2.13.0", "transformers>=4.56"]
    assert bootstrap.install_plan(reqs, None) == (reqs, [])
    kept, constraints = bootstrap.install_plan(reqs, "2.5.1+cu124")
    assert kept == ["pydantic>=2", "transformers>=4.56"]
    assert constraints == ["torch==2.5.1+cu124"]
    assert bootstrap.requirement_name("tomli>=2.0; python_version < '3.11'") == "tomli"
    assert bootstrap.requirement_name("Foo_Bar.baz[x]>=1") == "foo-bar-baz"


def test_worker_requirements_reads_base_and_worker_extra(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname="x"\ndependencies=["pydantic>=2"]\n[project.optional-dependencies]\nworker=["torch==2.13.0"]\ndev=["pytest"]\n'
    )
    assert bootstrap.worker_requirements(tmp_path / "pyproject.toml") == [
        "pydantic>=2",
        "torch==2.13.0",
    ]
    with pytest.raises(ConfigError, match="not found"):
        bootstrap.worker_requirements(tmp_path / "missing.toml")


# -- inputs ---------------------------------------------------------------------------------------
def _rec(stage: str, run_id: str, phase: Phase, target: str = "local", age_s: int = 0) -> RunRecord:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=age_s)
    return RunRecord(
        run_id=run_id, stage=stage, stage_dir=f"{stage}_dir", target=target, phase=phase,
        session=f"orch-{stage}-{run_id}", run_dir=f"runs/{stage}_dir/{run_id}", created_at=t, updated_at=t,
    )  # fmt: skip


def test_resolve_inputs_picks_latest_succeeded_run_on_the_same_target(tmp_path):
    ctx = Context(cwd=tmp_path)
    try:
        ctx.store.insert_run(_rec("up", "20260101-000001", Phase.SUCCEEDED, age_s=1))
        ctx.store.insert_run(_rec("up", "20260101-000002", Phase.SUCCEEDED, age_s=2))
        ctx.store.insert_run(_rec("up", "20260101-000003", Phase.FAILED, age_s=3))
        ctx.store.insert_run(_rec("up", "20260101-000004", Phase.SUCCEEDED, target="box", age_s=4))
        stage = StageSpec(
            name="down", stage_dir="down_dir", task=WorkerTask(command="eval"),
            inputs=[InputRef(stage="up", artifact="checkpoints/final", arg="model")],
        )  # fmt: skip
        assert launch.resolve_inputs(ctx, stage, "local") == {
            "model": "runs/up_dir/20260101-000002/checkpoints/final"
        }
        with pytest.raises(StageError, match="needs a succeeded run of up on target 'other'"):
            launch.resolve_inputs(ctx, stage, "other")
        bad = stage.model_copy(
            update={"inputs": [InputRef(stage="up", artifact="../../etc/passwd")]}
        )
        with pytest.raises(StageError, match="invalid artifact path"):
            launch.resolve_inputs(ctx, bad, "local")
    finally:
        ctx.close()


def test_merge_inputs_writes_absolute_paths_and_validates():
    task = WorkerTask(command="eval", args={"model": "input:stage3b/checkpoints/final"})
    merged = launch.merge_inputs(task, {"model": "runs/s3/r/checkpoints/final"}, "/w")
    assert merged.args["model"] == "/w/runs/s3/r/checkpoints/final"
    assert task.args["model"].startswith("input:")  # the stage's own spec is not mutated
    with pytest.raises(StageError, match="no_such"):
        launch.merge_inputs(WorkerTask(command="eval", args={"no_such": 1}), {}, "/w")


def test_new_run_ids_never_collide(tmp_path):
    ctx = Context(cwd=tmp_path)
    try:
        first = launch.new_unique_run_id(ctx, "d")
        ctx.store.insert_run(_rec("d", first, Phase.RUNNING).model_copy(update={"stage_dir": "d"}))
        second = launch.new_unique_run_id(ctx, "d")
        assert second != first and names.is_run_id(second)
    finally:
        ctx.close()


# -- pull verification ---------------------------------------------------------------------------
def test_verify_local_names_the_tampered_file(tmp_path):
    rd = tmp_path / "run"
    (rd / "checkpoints").mkdir(parents=True)
    (rd / "metrics.json").write_text('{"acc": 0.5}')
    (rd / "checkpoints" / "w.bin").write_bytes(b"\0" * 100)
    atomic_write_json(rd / names.MANIFEST, build_manifest(rd, "r"))
    assert verify_local(rd, checkpoints=True, must=True) == 2
    (rd / "checkpoints" / "w.bin").unlink()
    assert verify_local(rd, checkpoints=False, must=True) == 1  # not pulled: not checked
    with pytest.raises(VerifyError, match="w.bin.*missing"):
        verify_local(rd, checkpoints=True, must=True)
    (rd / "metrics.json").write_text('{"acc": 0.9}')
    with pytest.raises(VerifyError, match="metrics.json"):
        verify_local(rd, checkpoints=False, must=True)


def test_verify_local_without_manifest(tmp_path):
    assert verify_local(tmp_path, checkpoints=False, must=False) is None
    with pytest.raises(VerifyError, match="manifest.json: missing"):
        verify_local(tmp_path, checkpoints=False, must=True)
    (tmp_path / names.MANIFEST).write_text('{"run_id": "r", "files": [')  # torn
    with pytest.raises(VerifyError, match="unreadable"):
        verify_local(tmp_path, checkpoints=False, must=False)


def test_pull_excludes():
    assert excludes_for(False) == ["/.secrets.env", "/checkpoints/"]
    assert excludes_for(True) == ["/.secrets.env"]


# -- stages table ---------------------------------------------------------------------------------
def test_stage_row():
    s = StageSpec(
        name="stage4", stage_dir="stage4_post_ft_ablation_eval",
        task=WorkerTask(command="eval", args={"mask": "prefix"}),
        inputs=[InputRef(stage="stage3b")], timeout_s=9 * 3600,
    )  # fmt: skip
    assert stages_cmd.stage_row(s) == [
        "stage4",
        "stage4_post_ft_ablation_eval",
        "eval",
        "prefix",
        "stage3b",
        "9h",
    ]
    assert stages_cmd.format_timeout(90) == "1.5m" and stages_cmd.format_timeout(5) == "5s"


@pytest.mark.parametrize("profile", ["tiny", "ministral-3b"])
def test_stages_at_80_columns_never_break_a_name(profile):
    """Stage names, run dirs, masks and inputs stay whole (the rest wraps between words)."""
    import io

    from rich.console import Console

    from jobs.stages import list_stages

    stages = list_stages(profile)
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(stages_cmd.stages_table(stages, profile, 80))
    text = console.export_text()
    assert all(len(ln) <= 80 for ln in text.splitlines())
    lines = text.splitlines()
    for s in stages:
        row = stages_cmd.stage_row(s)
        [at] = [i for i, ln in enumerate(lines) if ln.startswith(f"│ {s.name} ")]
        assert f" {row[1]} " in lines[at]  # the run dir, whole, on the stage's own line
        block = [lines[at]]
        for ln in lines[at + 1 :]:
            if not ln.startswith("│ ") or ln[2:].split("│", 1)[0].strip():
                break
            block.append(ln)
        for name in (row[3], *row[4].split(", ")):  # the mask and the inputs, never cut
            if name != "-":
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", "\n".join(block))
    # a wide terminal gets one column per field
    wide = Console(width=200, file=io.StringIO(), record=True)
    wide.print(stages_cmd.stages_table(stages, profile, 200))
    assert re.search(r"┃ mask +┃ inputs +┃ timeout +┃", wide.export_text())


def test_logs_stop_pull_help_lists_every_run_form(capsys):
    from orchestrator.cli import main

    for command in ("logs", "stop", "pull", "launch"):  # launch: --resume RUN
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for form in ("run id", "stage_dir/run_id", "STAGE:latest", "latest"):
            assert form in text, (command, form)


def test_every_run_form_in_the_help_resolves(tmp_path):
    """The forms the help lists are the ones `resolve_run` takes."""
    from state.store import RUN_FORMS

    ctx = Context(cwd=tmp_path)
    try:
        stage = StageSpec(
            name="s", stage_dir="s_dir", task=WorkerTask(command="exec", args={"argv": ["true"]})
        )
        rec = launch._insert_new_run(ctx, stage, "local", "20260101-000000", fixed=True)
        for ref in ("20260101-000000", "s_dir/20260101-000000", "s:latest", "latest"):
            assert ctx.store.resolve_run(ref).key == rec.key
        assert all(f in RUN_FORMS for f in ("stage_dir/run_id", "STAGE:latest", "latest"))
    finally:
        ctx.close()


def test_a_missing_identity_file_stops_the_launch_before_any_run_is_recorded(
    tmp_path, monkeypatch, capsys
):
    from orchestrator.cli import main

    key = tmp_path / "no-such-key"
    (tmp_path / "orch.toml").write_text(
        f'[targets.box]\nkind = "ssh"\nhost = "127.0.0.1"\nport = 9\nidentity_file = "{key}"\n'
    )
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "stage1", "--target", "box"]) != 0
    err = capsys.readouterr().err.strip()
    assert str(key) in err and "identity_file" in err and len(err.splitlines()) == 1
    ctx = Context()
    try:
        assert ctx.store.list_runs() == []  # no `failed` row left behind
    finally:
        ctx.close()
    assert main(["status", "--no-refresh"]) == 0
    assert "stage1" not in capsys.readouterr().out


def test_an_unreadable_identity_file_or_empty_host_is_found_before_connecting(tmp_path):
    from orchestrator.targets.ssh import SshTarget

    bad = tmp_path / "not-a-key"
    bad.write_text("hello")
    box = SshTarget("box", host="127.0.0.1", identity_file=bad, known_hosts=tmp_path / "kh")
    with pytest.raises(ConfigError, match=f"cannot read identity_file {bad}"):
        box.preflight()
    nohost = SshTarget("box", host=" ", identity_file=bad, known_hosts=tmp_path / "kh")
    with pytest.raises(ConfigError, match="host is empty"):
        nohost.preflight()


def test_lock_file_probe_program_is_valid_python(tmp_path):
    """The probe bootstrap sends to the box runs and reads a lock file it finds."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / bootstrap.LOCK_FILE).write_text(json.dumps({"hash": "abc", "python": "3.11.7"}))
    out = subprocess.run(
        [sys.executable, "-c", bootstrap._PROBE, str(venv)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    raw = json.loads(out.stdout)
    assert raw["lock"]["hash"] == "abc" and raw["venv_python"] is False
    assert raw["version"] == ".".join(str(v) for v in sys.version_info[:3])


def test_insert_new_run_survives_a_same_second_clash(tmp_path):
    """Two launches of one stage in one second (run-all's threads) get distinct rows."""
    ctx = Context(cwd=tmp_path)
    try:
        stage = StageSpec(
            name="s", stage_dir="s_dir", task=WorkerTask(command="exec", args={"argv": ["true"]})
        )
        a = launch._insert_new_run(ctx, stage, "local", "20260101-000000", fixed=False)
        b = launch._insert_new_run(ctx, stage, "local", "20260101-000000", fixed=False)
        assert a.run_id == "20260101-000000" and b.run_id != a.run_id and names.is_run_id(b.run_id)
        assert b.session == f"orch-s-{b.run_id}" and b.run_dir == f"runs/s_dir/{b.run_id}"
        from state.errors import LaunchError

        with pytest.raises(LaunchError, match="already exists"):
            launch._insert_new_run(ctx, stage, "local", "20260101-000000", fixed=True)
    finally:
        ctx.close()
