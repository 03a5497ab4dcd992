"""`orch dashboard` for real, inside tmux: the screen shows the store's runs and `q` exits cleanly.

The store is filled through the Store API in a temp state dir (ORCH_STATE_DIR). The first two
tests run it with `--no-monitor`: those runs exist only in the store, and polling the local target
for them would (rightly) change their phases under the test. The last one launches a real run and
lets the dashboard run the monitor itself.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from state.models import GpuStat, RunRecord, RunStatus, TargetObservation
from state.phases import Phase
from state.store import Store
from tests.conftest import REPO, require_tools

pytestmark = pytest.mark.integration

PHASES = [Phase.RUNNING, Phase.HUNG, Phase.PENDING, Phase.SUCCEEDED, Phase.FAILED, Phase.CRASHED]


def fill_store(state_dir: Path) -> list[RunRecord]:
    now = datetime.now(timezone.utc)
    store = Store(state_dir / "state.db")
    recs = []
    for i, phase in enumerate(PHASES):
        rid = f"20261125-1900{i:02d}"
        status = RunStatus(
            run_id=rid,
            stage="stage3b",
            seq=3,
            step=25 * i,
            total_steps=200,
            losses=[2.0 - 0.05 * k for k in range(15)],
            steps_per_s=1.5,
            tokens_per_s=3000.0,
        )
        rec = RunRecord(
            run_id=rid,
            stage="stage3b",
            stage_dir="stage3b_prefix",
            target="local",
            phase=phase,
            session=f"orch-stage3b-{rid}",
            run_dir=f"runs/stage3b_prefix/{rid}",
            created_at=now - timedelta(minutes=20 - i),
            updated_at=now - timedelta(minutes=1),
            last_seq=3,
            last_seq_change_at=now - timedelta(seconds=5 + 60 * i),
            step=25 * i,
            total_steps=200,
            loss=1.5,
            exit_code={Phase.FAILED: 3, Phase.SUCCEEDED: 0}.get(phase),
            reason="leakage guard stopped the run" if phase is Phase.FAILED else "",
            spec_json=json.dumps({"stale_after_s": 300}),
            status_json=status.model_dump_json(),
        )
        store.insert_run(rec)
        recs.append(rec)
    obs = TargetObservation(
        disk_free_bytes=12 * 2**30,
        gpus=[GpuStat(index=0, name="RTX 4090", util_pct=77, mem_used_mb=8192, mem_total_mb=24576)],
    )
    store.upsert_target("local", "local", reachable=True, last_obs_json=obs.model_dump_json())
    store.add_alert(
        "a1",
        kind="failed",
        title="stage3b 20261125-190004 failed",
        body="exit 3",
        run_id="20261125-190004",
    )
    store.close()
    return recs


class Tmux:
    """A private tmux server (its own socket) so the test never touches the user's sessions."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def __call__(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-S", str(self.sock), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return out.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "dash")

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared on the screen:\n{screen}")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    require_tools("tmux")
    d = Path(tempfile.mkdtemp(prefix="orchdash"))  # short path: tmux sockets have a length limit
    t = Tmux(d / "sock")
    try:
        yield t
    finally:
        t("kill-server")
        shutil.rmtree(d, ignore_errors=True)


def start_dashboard(
    tmux: Tmux, tmp_path: Path, state_dir: Path, width: int, height: int, *, monitor: bool = False
) -> Path:
    rc_file = tmp_path / "rc"
    stty_file = tmp_path / "stty"
    env = {
        "HOME": os.environ["HOME"],
        "ORCH_STATE_DIR": str(state_dir),
        "PYTHONPATH": str(REPO),
        "PATH": os.environ.get("PATH", ""),
        "TERM": "xterm-256color",
    }
    dash = [sys.executable, "-m", "orchestrator", "dashboard", "--fps", "4"]
    if not monitor:
        dash.append("--no-monitor")
    script = (
        f"cd {shlex.quote(str(tmp_path))}; "
        f"env -i {' '.join(shlex.quote(f'{k}={v}') for k, v in env.items())} {shlex.join(dash)}; "
        f"rc=$?; stty -a > {shlex.quote(str(stty_file))}; echo $rc > {shlex.quote(str(rc_file))}"
    )
    tmux("new-session", "-d", "-s", "dash", "-x", str(width), "-y", str(height), "sh", "-c", script)
    return rc_file


def quit_and_wait(tmux: Tmux, rc_file: Path) -> str:
    tmux("send-keys", "-t", "dash", "q")
    deadline = time.monotonic() + 20
    while not rc_file.exists() or not rc_file.read_text().strip():
        assert time.monotonic() < deadline, f"q did not exit the dashboard:\n{tmux.screen()}"
        time.sleep(0.1)
    return rc_file.read_text().strip()


def test_dashboard_in_tmux_shows_runs_and_quits_cleanly(tmux: Tmux, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    recs = fill_store(state_dir)
    rc_file = start_dashboard(tmux, tmp_path, state_dir, 160, 50)
    screen = tmux.wait_for("Runs")
    screen = tmux.wait_for(recs[-1].run_id)
    for rec in recs:
        line = next(ln for ln in screen.splitlines() if rec.run_id in ln)
        assert rec.phase.value in line, line
    assert "exit 3 · leakage guard" in screen
    assert "RTX 4090" in screen and "0:77% 8/24G" in screen and "12.0G" in screen
    assert "Alerts" in screen and "stage3b 20261125-190004 failed" in screen
    assert "q quit" in screen and "monitor: off" in screen
    # The cursor starts on the first run listed and follows the arrow keys.
    order = [ln for ln in screen.splitlines() if "20261125-1900" in ln and "│" in ln]
    assert "›" in order[0] and not any("›" in ln for ln in order[1:])
    second_id = next(r.run_id for r in recs if r.run_id in order[1])
    tmux("send-keys", "-t", "dash", "Down")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = next(ln for ln in tmux.screen().splitlines() if second_id in ln and "│" in ln)
        if "›" in line:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the cursor did not move:\n{tmux.screen()}")

    assert quit_and_wait(tmux, rc_file) == "0"
    stty = (tmp_path / "stty").read_text()
    # cbreak mode was undone: line editing and echo are back.
    assert " icanon" in f" {stty}" and "-icanon" not in stty and "-echo " not in stty


def test_dashboard_in_a_narrow_tmux_drops_columns_instead_of_wrapping(
    tmux: Tmux, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    recs = fill_store(state_dir)
    rc_file = start_dashboard(tmux, tmp_path, state_dir, 80, 24)
    screen = tmux.wait_for(recs[0].run_id)
    lines = screen.splitlines()
    assert len(lines) <= 24 and all(len(ln) <= 80 for ln in lines)
    # Each visible run is one line with its phase; the rest are counted, not wrapped.
    shown = [r for r in recs if r.run_id in screen]
    assert shown and all(r.phase.value in next(ln for ln in lines if r.run_id in ln) for r in shown)
    assert "recent loss" not in screen
    assert quit_and_wait(tmux, rc_file) == "0"


# -- with a real run: the dashboard runs the monitor itself ----------------------------------
def make_project(root: Path) -> Path:
    """The repo's code (what codesync sends) + pyproject.toml + an orch.toml, in a temp dir."""
    root.mkdir(parents=True)
    for pkg in ("state", "worker", "jobs", "orchestrator"):
        shutil.copytree(
            REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "orch.toml").write_text(
        '[targets.local]\nkind = "local"\n[monitor]\ninterval_s = 1.0\n'
    )
    return root


def test_dashboard_runs_the_monitor_itself_and_sees_a_real_run_finish(
    tmux: Tmux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `orch watch`: the dashboard polls the local target and shows the run succeed."""
    require_tools("tmux", "rsync")
    from jobs.spec import StageSpec
    from orchestrator.context import Context
    from orchestrator.launch import launch_stage
    from orchestrator.monitor.lock import watcher_running
    from state.models import WorkerTask

    project = make_project(tmp_path / "proj")
    state_dir = tmp_path / "state"
    monkeypatch.chdir(project)
    monkeypatch.setenv("ORCH_STATE_DIR", str(state_dir))
    ctx = Context()
    stage = StageSpec(
        name="dashdemo",
        stage_dir="dashdemo_dir",
        task=WorkerTask(
            command="exec", args={"argv": [sys.executable, "-c", "import time; time.sleep(4)"]}
        ),
        timeout_s=300,
    )
    rec = launch_stage(ctx, stage, "local")
    assert rec.phase is Phase.RUNNING
    try:
        rc_file = start_dashboard(tmux, project, state_dir, 160, 40, monitor=True)
        screen = tmux.wait_for(rec.run_id)
        assert "monitor: in-process" in tmux.wait_for("monitor: in-process")
        assert watcher_running(ctx)  # it holds the watcher lock while it polls
        screen = tmux.wait_for("succeeded", timeout=90)
        line = next(ln for ln in screen.splitlines() if rec.run_id in ln)
        assert "succeeded" in line and "exit 0" in line
        assert quit_and_wait(tmux, rc_file) == "0"
        assert not watcher_running(ctx)  # and lets go of it on exit
        final = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert final is not None and final.phase is Phase.SUCCEEDED
    finally:
        ctx.close()
