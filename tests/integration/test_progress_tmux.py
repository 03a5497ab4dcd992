"""`orch launch stage3b --wait` for real, in a tmux pane: the live line moves while it trains.

The real worker fine-tunes the small tiny model (built offline, CPU) for a few hundred steps on
the local target; the pane is captured until two different `step N/M` have been seen on the
run's live line, then the run ends, is pulled, and the pane says where the results are.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tools
from tests.integration.test_dashboard_tmux import Tmux

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PACKAGES = ("state", "worker", "jobs", "orchestrator")
# Enough steps that training outlasts several of `--wait`'s 2 s polls on a fast machine: the
# small tiny model trains at ~100 steps/s on one fast core, so 150 steps (1.5 s) let a CI box
# see only one step (the failure this number fixes); 3000 take 30 s there, ~90 s on a slow one.
STEPS = 3000
SETTINGS = [
    f"max_steps={STEPS}",
    "batch_size=4",
    "warmup_steps=0",
    f"eval_every={STEPS}",
    "eval_batches=1",
    f"save_every={STEPS}",
    "log_every=5",
    f"probe_every={STEPS}",
    "probe_batch_size=2",
]


@pytest.fixture
def pane() -> Iterator[Tmux]:
    require_tools("tmux", "rsync")
    d = Path(tempfile.mkdtemp(prefix="orchprog"))  # short path: tmux sockets have a length limit
    t = Tmux(d / "sock")
    try:
        yield t
    finally:
        t("kill-server")
        shutil.rmtree(d, ignore_errors=True)


def make_project(root: Path, cache: Path) -> Path:
    root.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "orch.toml").write_text(
        "[targets.local]\n"
        'kind = "local"\n'
        f'python = "{sys.executable}"\n'
        f'env = {{ ORCH_CACHE_DIR = "{cache}", HF_HUB_OFFLINE = "1", HF_DATASETS_OFFLINE = "1" }}\n'
        "[experiment]\n"
        'profile = "tiny"\n'
    )
    return root


def test_launch_wait_in_tmux_shows_the_step_moving(
    pane: Tmux, tmp_path: Path, small_model: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("torch")
    project = make_project(tmp_path / "proj", tmp_path_factory.getbasetemp() / "orch-cache")
    state_dir = tmp_path / "state"
    rc_file = tmp_path / "rc"
    env = {
        "HOME": os.environ["HOME"],
        "ORCH_STATE_DIR": str(state_dir),
        "PYTHONPATH": str(project),
        "PATH": os.environ.get("PATH", ""),
        "TERM": "xterm-256color",
    }
    argv = [sys.executable, "-m", "orchestrator", "launch", "stage3b", "--wait"]
    for kv in [f"model={small_model}", *SETTINGS]:
        argv += ["--set", kv]
    script = (
        f"cd {shlex.quote(str(project))}; "
        f"env -i {' '.join(shlex.quote(f'{k}={v}') for k, v in env.items())} {shlex.join(argv)}; "
        f"echo $? > {shlex.quote(str(rc_file))}; sleep 600"
    )
    pane("new-session", "-d", "-s", "dash", "-x", "180", "-y", "50", "sh", "-c", script)
    try:
        line_re = re.compile(rf"stage3b \S+ +running \(training\) +step (\d+)/{STEPS}")
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 300
        screen = ""
        while len(seen) < 2 and not rc_file.exists():
            assert time.monotonic() < deadline, f"the step never moved:\n{screen}"
            screen = pane.screen()
            for ln in screen.splitlines():
                m = line_re.search(ln)
                if m:
                    seen.setdefault(int(m.group(1)), ln)
            time.sleep(0.3)
        assert len(seen) >= 2, f"saw only {sorted(seen)} before the run ended:\n{screen}"
        first, second = sorted(seen)[:2]
        assert first < second
        assert "heartbeat" in seen[second] and "loss " in seen[second], seen[second]

        while not rc_file.exists():
            assert time.monotonic() < deadline, f"launch --wait never returned:\n{pane.screen()}"
            time.sleep(0.3)
        screen = pane.screen()
        assert rc_file.read_text().strip() == "0", screen
        assert f"step {STEPS}/{STEPS}" in screen and "succeeded" in screen
        m = re.search(r"results  (runs/stage3_finetune_prefill_bidir/\S+)", screen)
        assert m, screen
        assert (project / m.group(1) / "summary.json").is_file()
    finally:
        _stop_runs(project, state_dir)


def _stop_runs(project: Path, state_dir: Path) -> None:
    """Nothing may outlive the test in tmux (the run's session is on the default server)."""
    from orchestrator.context import Context
    from orchestrator.launch import kill_session
    from orchestrator.targets.factory import make_target

    ctx = Context(cwd=project, state_dir=str(state_dir))
    try:
        for rec in ctx.store.list_runs(active_only=True):
            target = make_target(ctx, rec.target)
            kill_session(target, rec.session)
            target.close()
    finally:
        ctx.close()
