"""`orch launch` end to end on the local target and over a real OpenSSH sshd: real tmux, real
rsync, the real worker (`python -m worker run` with an `exec` task), the real store.

Each test builds a small project (the repo's packages + pyproject.toml + an orch.toml) in a temp
dir, launches a short command, waits for the wrapper's `exit_code`, and checks what the store,
the run dir and tmux say. Bad input must give one clear error, a non-zero exit, no tmux session
left behind and no run row stuck in `launching`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.spec import InputRef, StageSpec
from orchestrator import launch as launch_mod
from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.pull import pull_run
from orchestrator.targets.factory import make_target
from state import names
from state.errors import ConfigError, LaunchError, StageError, VerifyError
from state.models import Manifest, RunRecord, WorkerTask
from state.phases import Phase
from tests.conftest import REPO, require_tools
from tests.sshd import SshServer, free_port

pytestmark = pytest.mark.integration

PACKAGES = ("state", "worker", "jobs", "orchestrator")

# Test data, not a stage of the study: a tiny command that writes one artifact into its run dir.
WRITE_ARTIFACT = (
    "import os, pathlib, sys;"
    "d = pathlib.Path(os.environ['ORCH_RUN_DIR']);"
    "(d / 'result.txt').write_text('answer=42\\n');"
    "(d / 'checkpoints').mkdir(exist_ok=True);"
    "(d / 'checkpoints' / 'weights.bin').write_bytes(os.urandom(2048));"
    "print('secret:', os.environ.get('ORCH_TEST_SECRET', '<unset>'));"
    "print('hello from the run', flush=True)"
)


def make_project(root: Path, toml: str = "") -> Path:
    """A project: the repo's code (what codesync sends) + pyproject.toml + orch.toml."""
    root.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "orch.toml").write_text(toml)
    return root


def exec_stage(name: str, *argv: str, inputs: list[InputRef] | None = None) -> StageSpec:
    return StageSpec(
        name=name,
        stage_dir=f"{name}_dir",
        task=WorkerTask(command="exec", args={"argv": list(argv)}),
        inputs=inputs or [],
        timeout_s=300,
    )


def tmux_sessions() -> set[str]:
    out = subprocess.run(
        ["tmux", "list-sessions", "-F", "#{session_name}"], capture_output=True, text=True
    )
    return set(out.stdout.split()) if out.returncode == 0 else set()


def wait_exit(ctx: Context, rec: RunRecord, timeout: float = 90.0) -> int:
    """Poll the run's exit_code through its target (what the wrapper writes, whatever happens)."""
    target = make_target(ctx, rec.target)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = launch_mod.read_remote_exit_code(target, rec)
            if code is not None:
                return code
            time.sleep(0.2)
    finally:
        target.close()
    raise AssertionError(f"{rec.key}: no exit_code after {timeout}s")


def settle(ctx: Context, rec: RunRecord) -> RunRecord:
    """Wait for the wrapper's exit_code, then let the monitor judge the run (one refresh)."""
    from orchestrator.monitor.refresh import refresh_once

    wait_exit(ctx, rec)
    refresh_once(ctx, [rec.target])
    final = ctx.store.get_run(rec.stage_dir, rec.run_id)
    assert final is not None
    return final


def no_leftovers(ctx: Context, stage: str) -> None:
    """No run of `stage` left in a pre-running phase, and none of their tmux sessions alive."""
    live = tmux_sessions()
    for r in ctx.store.list_runs(stage=stage):
        assert r.phase not in (Phase.PENDING, Phase.SYNCING, Phase.LAUNCHING), r
        assert r.session not in live, r


@pytest.fixture
def local_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    require_tools("tmux", "rsync")
    root = make_project(
        tmp_path / "proj", '[targets.local]\nkind = "local"\nforward_env = ["ORCH_TEST_SECRET"]\n'
    )
    monkeypatch.chdir(root)
    return root


def ssh_project(
    tmp_path: Path,
    server: SshServer,
    monkeypatch: pytest.MonkeyPatch,
    *,
    python: str | None = sys.executable,
) -> Path:
    toml = 'default_target = "box"\n' + server.toml("box", workdir=tmp_path / "remote")
    toml += 'forward_env = ["ORCH_TEST_SECRET"]\n'
    if python:
        toml += f'python = "{python}"\n'
    root = make_project(tmp_path / "proj", toml)
    monkeypatch.chdir(root)
    return root


# -- the whole flow ------------------------------------------------------------------------------
def _launch_run_pull(
    ctx: Context, capsys: pytest.CaptureFixture[str], stage_name: str, *, full: bool = True
) -> None:
    stage = exec_stage(stage_name, sys.executable, "-c", WRITE_ARTIFACT)
    stage = stage.model_copy(update={"poll_interval_s": 2.5})
    rec = launch_mod.launch_stage(ctx, stage)
    assert json.loads(rec.spec_json)["poll_interval_s"] == 2.5  # the watcher's pace for it
    assert rec.phase == Phase.RUNNING
    assert rec.session == f"orch-{stage_name}-{rec.run_id}"
    history = [p for p, _, _ in ctx.store.phase_history(rec.stage_dir, rec.run_id)]
    assert history == ["pending", "syncing", "launching", "running"]

    final = settle(ctx, rec)
    assert final.phase == Phase.SUCCEEDED, final
    target = make_target(ctx, rec.target)
    try:
        rd = f"{target.workdir}/{rec.run_dir}"
        # The secret reached the run through the 0600 file, which the wrapper then deleted.
        assert not target.run(["test", "-e", f"{rd}/.secrets.env"], timeout=10).ok
        spec = target.run(["cat", f"{rd}/spec.json"], timeout=10).stdout
        assert "s3cr3t-value" not in spec and f'"run_id": "{rec.run_id}"' in spec
        assert target.run(["cat", f"{rd}/exit_code"], timeout=10).stdout.strip() == "0"
        assert int(target.run(["cat", f"{rd}/pid"], timeout=10).stdout.strip()) > 0
        # The code went over: the worker that ran is the synced one.
        assert target.run(["test", "-f", f"{target.workdir}/code/worker/cli.py"], timeout=10).ok
    finally:
        target.close()

    # orch status shows it (the dashboard engineer's command, fed by what launch recorded).
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    status = capsys.readouterr().out
    assert rec.run_id in status and "succeeded" in status

    # orch logs shows the run's own output.
    assert main(["logs", rec.run_id]) == 0
    out = capsys.readouterr().out
    assert "hello from the run" in out and "secret: s3cr3t-value" in out

    # orch pull: copied and verified; checkpoints stay on the box unless asked for.
    assert main(["pull", rec.run_id]) == 0
    local = ctx.runs_dir / rec.stage_dir / rec.run_id
    assert (local / "result.txt").read_text() == "answer=42\n"
    assert not (local / "checkpoints").exists()
    assert ctx.store.get_run(rec.stage_dir, rec.run_id).pulled_at is not None
    if not full:
        return

    res = pull_run(ctx, ctx.store.get_run(rec.stage_dir, rec.run_id), checkpoints=True)
    listed = {
        f.path for f in Manifest.model_validate_json((local / "manifest.json").read_text()).files
    }
    assert {"spec.json", "result.txt", "checkpoints/weights.bin"} <= listed
    assert res.verified == len(listed)
    assert (local / "checkpoints" / "weights.bin").stat().st_size == 2048

    # A tampered local file is an error naming it; rsync would otherwise keep it (same size+mtime).
    (local / "result.txt").write_text("answer=43\n")
    os.utime(local / "result.txt", (0, 0))
    with pytest.raises(VerifyError, match="result.txt"):
        from orchestrator.pull import verify_local

        verify_local(local, checkpoints=True, must=True)
    capsys.readouterr()
    assert main(["pull", rec.run_id]) == 0  # rsync repairs it (mtime differs), then verifies
    assert (local / "result.txt").read_text() == "answer=42\n"


def test_local_launch_succeeds_pulls_and_verifies(local_project, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_TEST_SECRET", "s3cr3t-value")
    ctx = Context()
    try:
        _launch_run_pull(ctx, capsys, "t-local")
    finally:
        ctx.close()


def test_ssh_launch_succeeds_pulls_and_verifies(sshd_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ORCH_TEST_SECRET", "s3cr3t-value")
    ssh_project(tmp_path, sshd_server, monkeypatch)
    ctx = Context()
    try:
        _launch_run_pull(ctx, capsys, "t-ssh", full=False)  # the rest of pull: test_pull.py
        rec = ctx.store.list_runs(stage="t-ssh")[0]
        assert rec.target == "box"
        assert (tmp_path / "remote" / rec.run_dir / "result.txt").is_file()

        # orch stop over ssh: the remote session ends, the wrapper records 128+N, row cancelled.
        sleeper = launch_mod.launch_stage(
            ctx,
            exec_stage("t-ssh-stop", sys.executable, "-c", "import time; time.sleep(120)"),
            sync=False,
        )
        assert sleeper.session in tmux_sessions()  # the box is this machine
        assert main(["stop", sleeper.run_id]) == 0
        final = ctx.store.get_run(sleeper.stage_dir, sleeper.run_id)
        assert (
            final.phase == Phase.CANCELLED and final.exit_code is not None and final.exit_code > 128
        )
        assert sleeper.session not in tmux_sessions()
    finally:
        ctx.close()


# -- failures, stop, inputs ----------------------------------------------------------------------
def test_wait_exits_zero_only_on_success(local_project, capsys):
    from orchestrator.commands.launch import wait_and_report

    ctx = Context()
    try:
        bad = launch_mod.launch_stage(
            ctx, exec_stage("t-fail", sys.executable, "-c", "import sys; sys.exit(3)")
        )
        good = launch_mod.launch_stage(
            ctx, exec_stage("t-ok", sys.executable, "-c", "print('fine')")
        )
        assert wait_and_report(ctx, bad) == 1
        final = ctx.store.get_run(bad.stage_dir, bad.run_id)
        assert final.phase == Phase.FAILED and final.exit_code not in (None, 0)
        target = make_target(ctx, "local")
        assert (Path(target.workdir) / bad.run_dir / names.RUN_FAILED).is_file()
        assert wait_and_report(ctx, good) == 0
        assert ctx.store.get_run(good.stage_dir, good.run_id).phase == Phase.SUCCEEDED
        out = capsys.readouterr().out
        assert "t-fail_dir" in out and "failed" in out and "succeeded" in out
    finally:
        ctx.close()


def test_wait_says_where_the_run_is_and_pulls_unless_no_pull(local_project, capsys, monkeypatch):
    """`orch launch STAGE --wait`: the real run dir (not a `runs/` path that does not exist
    yet), a line per step, then the results pulled into runs/ by default; `--no-pull` not."""
    import jobs.stages

    stage = exec_stage("t-pull", sys.executable, "-c", WRITE_ARTIFACT)
    monkeypatch.setattr(jobs.stages, "get_stage", lambda *a, **k: stage)
    ctx = Context()
    try:
        assert main(["launch", "t-pull", "--wait"]) == 0
        out = capsys.readouterr().out
        [rec] = ctx.store.list_runs(stage="t-pull")
        workdir = make_target(ctx, "local").workdir
        assert f"run dir  {workdir}/{rec.run_dir}\n" in out  # where it really is
        assert (Path(workdir) / rec.run_dir / "result.txt").is_file()  # and it is there
        assert "syncing code (" in out and "synced code:" in out and "bootstrap: " in out
        assert "pulling " in out and "verified " in out
        local = local_project / "runs" / rec.stage_dir / rec.run_id
        assert f"results  runs/{rec.stage_dir}/{rec.run_id}\n" in out
        assert (local / "result.txt").read_text() == "answer=42\n"
        assert ctx.store.get_run(rec.stage_dir, rec.run_id).pulled_at is not None

        assert main(["launch", "t-pull", "--wait", "--no-pull"]) == 0
        out = capsys.readouterr().out
        second = next(r for r in ctx.store.list_runs(stage="t-pull") if r.run_id != rec.run_id)
        assert second.phase == Phase.SUCCEEDED and second.pulled_at is None
        assert not (local_project / "runs" / second.stage_dir / second.run_id).exists()
        assert "not pulled (--no-pull)" in out and "pulling " not in out
    finally:
        ctx.close()


def test_stop_kills_session_and_records_cancelled(local_project, capsys):
    ctx = Context()
    try:
        rec = launch_mod.launch_stage(
            ctx, exec_stage("t-stop", sys.executable, "-c", "import time; time.sleep(120)")
        )
        assert rec.session in tmux_sessions()
        target = make_target(ctx, "local")
        pid_file = Path(target.workdir) / rec.run_dir / names.PID
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker_pid = int(pid_file.read_text())
        assert main(["stop", rec.run_id]) == 0
        final = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert final.phase == Phase.CANCELLED
        assert final.exit_code is not None and final.exit_code > 128  # 128 + SIGHUP/SIGTERM
        assert rec.session not in tmux_sessions()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the worker outlived its stopped session")
        assert main(["stop", rec.run_id]) == 0  # already ended: a no-op
        assert "already ended" in capsys.readouterr().out

        # Stopped at once, maybe before the wrapper could even set its traps: still an exit code.
        quick = launch_mod.launch_stage(
            ctx, exec_stage("t-stop", sys.executable, "-c", "import time; time.sleep(120)")
        )
        final = launch_mod.stop_run(ctx, quick)
        assert (
            final.phase == Phase.CANCELLED and final.exit_code is not None and final.exit_code > 128
        )
        assert quick.session not in tmux_sessions()
    finally:
        ctx.close()


def test_logs_follow_prints_until_the_run_ends(local_project, capsys):
    ctx = Context()
    try:
        code = "import time\nfor i in range(4):\n    print('line', i, flush=True); time.sleep(0.4)\nprint('last words', end='')"
        rec = launch_mod.launch_stage(ctx, exec_stage("t-logs", sys.executable, "-c", code))
        capsys.readouterr()
        assert main(["logs", "-f", "--interval", "0.2", rec.run_id]) == 0  # returns: the run ended
        out = capsys.readouterr().out
        for i in range(4):
            assert f"line {i}\n" in out
        assert out.count("line 0\n") == 1  # nothing printed twice
        assert "last words" in out
        assert main(["logs", "-n", "1", rec.run_id]) == 0
        assert len(capsys.readouterr().out.strip().splitlines()) == 1
    finally:
        ctx.close()


def test_input_resolves_to_latest_succeeded_upstream_run(local_project):
    ctx = Context()
    try:
        downstream = exec_stage(
            "t-down",
            sys.executable,
            "-c",
            "print('x')",
            inputs=[InputRef(stage="t-up", artifact="result.txt", arg="model")],
        )
        with pytest.raises(StageError, match="t-up.*--with-deps"):
            launch_mod.launch_stage(ctx, downstream)
        assert ctx.store.list_runs(stage="t-down") == []

        up = launch_mod.launch_stage(ctx, exec_stage("t-up", sys.executable, "-c", WRITE_ARTIFACT))
        assert settle(ctx, up).phase == Phase.SUCCEEDED
        # exec's args model has no `model` field: the merge is validated before anything starts.
        with pytest.raises(StageError, match="model"):
            launch_mod.launch_stage(ctx, downstream)
        assert ctx.store.list_runs(stage="t-down") == []
        resolved = launch_mod.resolve_inputs(ctx, downstream, "local")
        assert resolved == {"model": f"{up.run_dir}/result.txt"}
    finally:
        ctx.close()


# -- bad input -------------------------------------------------------------------------------------
def test_bad_names_and_unknown_target_start_nothing(local_project):
    ctx = Context()
    try:
        with pytest.raises(ConfigError, match="invalid stage"):
            launch_mod.launch_stage(
                ctx, exec_stage("x", "true").model_copy(update={"name": "x;touch /tmp/pwned"})
            )
        with pytest.raises(ConfigError, match="invalid stage dir"):
            launch_mod.launch_stage(
                ctx, exec_stage("x", "true").model_copy(update={"stage_dir": "../../etc"})
            )
        with pytest.raises(ConfigError, match="unknown target 'nope'"):
            launch_mod.launch_stage(ctx, exec_stage("x", "true"), "nope")
        assert ctx.store.list_runs() == []
    finally:
        ctx.close()


def test_cli_bad_input_one_line_nonzero(local_project, capsys):
    assert main(["launch", "no-such-stage"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown stage 'no-such-stage'" in err and len(err.splitlines()) == 1

    assert main(["launch", "stage1", "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_key" in err and len(err.splitlines()) == 1

    assert main(["launch", "stage1", "--target", "nope"]) == 2
    assert "unknown target 'nope'" in capsys.readouterr().err

    (local_project / "orch.toml").write_text('[targets.local]\nkind = "local"\nbogus_key = 1\n')
    assert main(["launch", "stage1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "orch.toml" in err and "bogus_key" in err and len(err.splitlines()) == 1
    (local_project / "orch.toml").write_text('[targets.local]\nkind = "local"\n')
    ctx = Context()
    try:
        assert ctx.store.list_runs() == []  # every error came before anything was recorded
    finally:
        ctx.close()


def test_cli_stages_lists_the_study(local_project, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: rich shortens cells to fit 80
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for name in ("stage1", "stage3b", "stage4", "stage3_finetune_prefill_bidir", "prefix"):
        assert name in out


def test_a_refused_connection_leaves_no_run_behind(tmp_path, monkeypatch, sshd_server, capsys):
    """Nothing listens on the port: one error line, and no `failed` row lingers in the store
    or in `orch status` (the target is reached before the run is recorded)."""
    toml = (
        'default_target = "dead"\n[targets.dead]\nkind = "ssh"\nhost = "127.0.0.1"\n'
        f'port = {free_port()}\nuser = "root"\nidentity_file = "{sshd_server.client_key}"\n'
        f'workdir = "{tmp_path / "remote"}"\n[monitor]\nconnect_timeout_s = 3\n'
    )
    root = make_project(tmp_path / "proj", toml)
    monkeypatch.chdir(root)
    ctx = Context()
    try:
        with pytest.raises(
            LaunchError, match="launch of t-dead on 'dead' failed: .*cannot connect"
        ):
            launch_mod.launch_stage(ctx, exec_stage("t-dead", "true"))
        assert ctx.store.list_runs() == []
    finally:
        ctx.close()
    assert main(["launch", "stage1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "cannot connect" in err and "nothing was started or recorded" in err
    assert len(err.splitlines()) == 1
    assert main(["status", "--no-refresh"]) == 0
    assert "stage1" not in capsys.readouterr().out


def test_missing_identity_file_is_one_clear_error(tmp_path, monkeypatch, sshd_server, capsys):
    toml = 'default_target = "box"\n' + sshd_server.toml("box", workdir=tmp_path / "remote")
    toml = toml.replace(str(sshd_server.client_key), str(tmp_path / "no-such-key"))
    make_project(tmp_path / "proj", toml)
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["launch", "stage1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "no-such-key" in err and len(err.splitlines()) == 1
    ctx = Context()
    try:
        assert ctx.store.list_runs() == []  # found before the run was recorded
    finally:
        ctx.close()


def test_changed_host_key_is_refused_and_nothing_starts(fresh_sshd, tmp_path, monkeypatch):
    ssh_project(tmp_path, fresh_sshd, monkeypatch)
    ctx = Context()
    try:
        first = launch_mod.launch_stage(ctx, exec_stage("t-key", sys.executable, "-c", "print(1)"))
        assert wait_exit(ctx, first) == 0
        fresh_sshd.rotate_host_key()
        with pytest.raises(LaunchError, match="(?i)host key"):
            launch_mod.launch_stage(ctx, exec_stage("t-key", sys.executable, "-c", "print(2)"))
        runs = ctx.store.list_runs(stage="t-key")
        assert [r.key for r in runs] == [first.key]  # refused before a second run was recorded
        no_leftovers(ctx, "t-key")
    finally:
        ctx.close()


def test_failure_after_session_start_kills_it(local_project, monkeypatch):
    """A failure between starting tmux and recording `running` leaves no session behind."""
    ctx = Context()
    real_update = ctx.store.update_run

    def failing_update(stage_dir, run_id, **fields):
        if fields.get("phase") == Phase.RUNNING:
            raise OSError("disk full while recording")
        return real_update(stage_dir, run_id, **fields)

    monkeypatch.setattr(ctx.store, "update_run", failing_update)
    try:
        with pytest.raises(LaunchError, match="disk full"):
            launch_mod.launch_stage(
                ctx, exec_stage("t-half", sys.executable, "-c", "import time; time.sleep(60)")
            )
        [rec] = ctx.store.list_runs(stage="t-half")
        assert rec.phase == Phase.FAILED
        no_leftovers(ctx, "t-half")
    finally:
        ctx.close()


# -- bootstrap over ssh ----------------------------------------------------------------------------
def test_bootstrap_makes_a_venv_once_and_skips_when_the_lock_is_unchanged(
    sshd_server, tmp_path, monkeypatch
):
    import io

    from rich.console import Console

    from orchestrator.bootstrap import LOCK_FILE, ensure_env
    from orchestrator.progress import Steps

    root = ssh_project(tmp_path, sshd_server, monkeypatch, python=None)
    # Requirements already met inside a fresh venv, so pip runs for real without a network.
    pyproject = '[project]\nname = "p"\nversion = "0"\ndependencies = ["pip"]\n[project.optional-dependencies]\nworker = [%s]\n'
    (root / "pyproject.toml").write_text(pyproject % "")
    ctx = Context()
    try:
        target = make_target(ctx, "box")
        venv = tmp_path / "remote" / "venv"
        said = io.StringIO()
        steps = Steps(Console(file=said, force_terminal=False, width=200))
        py = ensure_env(ctx, target, base_python="/usr/bin/python3", report=steps)
        assert py == f"{venv}/bin/python"
        assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
        lock = json.loads((venv / LOCK_FILE).read_text())
        assert lock["requirements"] == ["pip"] and lock["python"]
        assert ctx.store.get_target("box")["python"] == py
        stamp = (venv / LOCK_FILE).stat().st_mtime_ns
        short = lock["hash"][:12]
        assert f"bootstrap: creating the venv {venv}" in said.getvalue()
        assert f"bootstrap: installing deps (hash {short}, 1 package)" in said.getvalue()

        said.truncate(0)
        assert ensure_env(ctx, target, base_python="/usr/bin/python3", report=steps) == py
        assert (venv / LOCK_FILE).stat().st_mtime_ns == stamp  # unchanged: skipped, and says so
        assert f"bootstrap: unchanged (hash {short}), skipped" in said.getvalue()
        assert "installing" not in said.getvalue()

        # Changed deps: the hash differs, so pip runs again; here it fails, which is one clear
        # LaunchError with pip's last words, and the old lock stays (the next launch retries).
        (root / "pyproject.toml").write_text(pyproject % '"orch-no-such-package-xyz==9.9"')
        with pytest.raises(
            LaunchError, match="installing the worker deps failed.*orch-no-such-package-xyz"
        ):
            ensure_env(ctx, target, base_python="/usr/bin/python3")
        assert json.loads((venv / LOCK_FILE).read_text())["requirements"] == ["pip"]
        target.close()
    finally:
        ctx.close()
