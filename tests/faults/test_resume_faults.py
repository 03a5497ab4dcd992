"""Fault campaign: kill -9 of the real worker (`python -m worker train`, stage3b of the tiny
profile on the small tiny model) after it saved a checkpoint, under a real `orch watch`, over a
real sshd; then `orch launch stage3b --resume RUN`, which relaunches the run with its recorded
task from its newest checkpoint (hard-linked from the old run dir on the box). The resumed run
must end with the loss of an uninterrupted run of the same settings (exact resume,
worker/train.py), and say where it resumed from."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.targets.factory import make_target
from state import names
from state.models import RunRecord
from state.phases import Phase
from tests.faults.campaign import Scenario
from tests.faults.test_worker_faults import _stop, _watch
from tests.integration.monitor_harness import (
    Webhook,
    orch_argv,
    prepare_target,
    signal_pid,
    wait_until,
    write_project,
)
from tests.integration.test_monitor import FAST
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

STEPS = 400
SAVE = 20
SETTINGS = [
    f"max_steps={STEPS}",
    "batch_size=4",
    "warmup_steps=0",
    f"eval_every={STEPS}",
    "eval_batches=1",
    f"save_every={SAVE}",
    "keep_checkpoints=2",
    "log_every=1",
    f"probe_every={STEPS}",
    "probe_batch_size=2",
    "heartbeat_s=0.5",
]


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def train_project(
    tmp_path: Path, server: SshServer, hook: Webhook, cache: Path
) -> tuple[Context, Path]:
    """A project whose box (the real sshd) runs this checkout's worker (code dir linked here)."""
    env = (
        f'env = {{ ORCH_CACHE_DIR = "{cache}", HF_HUB_OFFLINE = "1", HF_DATASETS_OFFLINE = "1" }}\n'
    )
    root = write_project(
        tmp_path / "project",
        server.toml("box", workdir=tmp_path / "box-work") + env,
        hook_url=hook.url,
        monitor=FAST,
        extra='\n[experiment]\nprofile = "tiny"\n',
    )
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    try:
        prepare_target(target, sync=False)
    finally:
        target.close()
    return ctx, Path(tmp_path / "box-work")


def orch(root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        orch_argv(*args), cwd=root, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"orch {' '.join(args)}: {res.stdout}\n{res.stderr}"
    return res


def launched(ctx: Context, stage: str, before: set[str]) -> RunRecord:
    [rec] = [r for r in ctx.store.list_runs(stage=stage) if r.key not in before]
    return rec


def phase(ctx: Context, rec: RunRecord) -> Phase:
    got = ctx.store.get_run(rec.stage_dir, rec.run_id)
    assert got is not None
    return got.phase


def test_worker_sigkill_then_launch_resume(
    tmp_path: Path,
    sshd_server: SshServer,
    hook: Webhook,
    small_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    sc = Scenario(
        name="real worker SIGKILL, then `orch launch --resume`",
        injected=f"kill -9 of a real tiny training run (stage3b, {STEPS} steps) after its "
        f"step-{SAVE} checkpoint; then `orch launch stage3b --resume RUN`",
        report="one `crashed` alert (SIGKILL); the resumed run succeeds from the newest "
        "checkpoint with the final loss of an uninterrupted run (1e-6)",
        within_s=60,
        survives="the checkpoints (hard-linked into the new run dir), the training's exact "
        "state (loss, data position, RNG)",
    )
    ctx, box = train_project(
        tmp_path, sshd_server, hook, tmp_path_factory.getbasetemp() / "orch-cache"
    )
    root = ctx.project_root
    sets = [a for kv in [f"model={small_model}", *SETTINGS] for a in ("--set", kv)]
    watcher = _watch(root, tmp_path / "watch.log")
    runs: list[RunRecord] = []
    try:
        orch(root, "launch", "stage3b", "--no-sync", *sets)
        ref = launched(ctx, "stage3b", set())
        orch(root, "launch", "stage3b", "--no-sync", *sets)
        victim = launched(ctx, "stage3b", {ref.key})
        runs += [ref, victim]
        ck = box / victim.run_dir / names.CHECKPOINTS / f"step-{SAVE}" / "meta.json"
        wait_until(ck.exists, 240, every=0.02, what="the victim's first checkpoint")
        pid = int((box / victim.run_dir / names.PID).read_text())
        sc.start()
        signal_pid(pid, signal.SIGKILL)
        [alert] = hook.wait_for("CRASHED", victim.run_id, timeout=sc.within_s)
        sc.detected()
        assert "SIGKILL" in str(alert["message"])
        assert not (box / victim.run_dir / names.SUMMARY).exists(), "finished before the kill"
        saved = sorted(
            int(p.name.split("-")[1])
            for p in (box / victim.run_dir / names.CHECKPOINTS).glob("step-*")
            if (p / "meta.json").exists()
        )
        assert saved and saved[-1] < STEPS

        out = orch(root, "launch", "stage3b", "--resume", victim.key, "--no-sync").stdout
        resumed = launched(ctx, "stage3b", {ref.key, victim.key})
        runs.append(resumed)
        assert f"step-{saved[-1]} (on the box's surviving disk)" in " ".join(out.split()), out
        for rec in (ref, resumed):
            hook.wait_for("succeeded", rec.run_id, timeout=300)
        local = [
            wait_until(
                lambda r=r: (g := ctx.store.get_run(r.stage_dir, r.run_id)) and g.pulled_at,
                120,
                what=f"{r.key} pulled",
            )
            and root / names.RUNS_DIR / r.stage_dir / r.run_id
            for r in (ref, resumed)
        ]
        want, got = (json.loads((d / names.SUMMARY).read_text()) for d in local)
        assert got["resumed_from"] == f"step-{saved[-1]}" and want["resumed_from"] is None
        assert got["steps"] == want["steps"] == STEPS
        for key in ("train_loss", "eval_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        spec = json.loads((local[1] / names.SPEC).read_text())
        assert spec["relaunch_of"] == victim.key and spec["relaunch_count"] == 1
        assert phase(ctx, victim) is Phase.CRASHED and phase(ctx, resumed) is Phase.SUCCEEDED
        assert len(hook.matching("CRASHED")) == 1
        sc.note(
            f"resumed from step-{saved[-1]} of {STEPS}; train_loss {got['train_loss']:.6f} vs "
            f"{want['train_loss']:.6f} uninterrupted (|d| "
            f"{abs(got['train_loss'] - want['train_loss']):.1e}), eval_loss |d| "
            f"{abs(got['eval_loss'] - want['eval_loss']):.1e}"
        )
    finally:
        _stop(watcher)
        from orchestrator.launch import kill_session

        target = make_target(ctx, "box")
        for rec in runs:
            kill_session(target, rec.session)
        target.close()
        ctx.close()
    sc.record()


def test_resume_refuses_a_run_that_cannot_resume(tmp_path: Path) -> None:
    """`--resume` with --set is one clear error (the recorded settings are the checkpoint's)."""
    (tmp_path / "orch.toml").write_text('[targets.local]\nkind = "local"\n')
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "launch",
            "stage3b",
            "--resume",
            "x",
            "--set",
            "a=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "recorded settings" in res.stderr, res.stderr
