"""Fault campaign: the box's disk fills up under a real tiny training run (a small tmpfs as the
run dir's filesystem, mounted here as root), and the laptop sleeps (`orch watch` SIGSTOPped
past every limit while a run crashes), on a real sshd, tmux and webhook."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.launch import kill_session as kill_named_session
from orchestrator.targets.factory import make_target
from state import names
from state.phases import Phase
from tests.faults.campaign import Scenario
from tests.faults.test_resume_faults import SETTINGS, launched, orch, train_project
from tests.faults.test_worker_faults import _seq, _stop, _watch
from tests.integration.monitor_harness import (
    Webhook,
    kill_session,
    signal_pid,
    start_run,
    wait_until,
    worker_pid,
)
from tests.integration.test_monitor import _project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

TMPFS = "1m"


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def test_disk_full_on_the_box(
    tmp_path: Path,
    sshd_server: SshServer,
    hook: Webhook,
    small_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    sc = Scenario(
        name="disk full on the box",
        injected=f"the run dir on a {TMPFS} tmpfs; a real tiny training run (stage3b) runs out of "
        "room at its first checkpoint (step 10)",
        report="`failed` with the worker's disk reason (its check before each save: `not "
        "enough disk for checkpoint ...`, else ENOSPC's `disk full: ...`), in one alert",
        within_s=120,
        survives="the store and this machine's files; the run's failure record and events on "
        "the box (readable by `orch logs`)",
    )
    ctx, box = train_project(
        tmp_path, sshd_server, hook, tmp_path_factory.getbasetemp() / "orch-cache"
    )
    root = ctx.project_root
    mnt = box / names.RUNS_DIR / "stage3_finetune_prefill_bidir"
    mnt.mkdir(parents=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"cannot mount a tmpfs (this scenario needs root): {res.stderr}"
    watcher = _watch(root, tmp_path / "watch.log")
    rec = None
    try:
        sets = ["--set", f"model={small_model}"]
        for kv in [*SETTINGS, "max_steps=200", "save_every=10"]:
            sets += ["--set", kv]
        sc.start()
        orch(root, "launch", "stage3b", "--no-sync", *sets)
        rec = launched(ctx, "stage3b", set())
        [alert] = hook.wait_for("FAILED", rec.run_id, timeout=sc.within_s)
        sc.detected()
        msg = str(alert["message"])
        assert _disk_reason(msg), msg
        final = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert final is not None and final.phase is Phase.FAILED
        assert _disk_reason(final.reason), final.reason
        failed = json.loads((box / rec.run_dir / names.RUN_FAILED).read_text())
        assert final.reason.startswith(failed["reason"])
        assert orch(root, "logs", rec.key).stdout.strip()
        time.sleep(1.0)
        assert len(hook.posts) == 1, hook.titles()
        assert (root / "orch.toml").is_file() and ctx.store.get_run(rec.stage_dir, rec.run_id)
        sc.note("reason: " + final.reason[:90])
    finally:
        _stop(watcher)
        if rec is not None:
            target = make_target(ctx, "box")
            kill_named_session(target, rec.session)
            target.close()
        ctx.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    sc.record()


def _disk_reason(text: str) -> bool:
    return "disk full" in text or ("not enough disk" in text and "free" in text)


def test_laptop_sleep(tmp_path: Path, sshd_server: SshServer, hook: Webhook) -> None:
    sc = Scenario(
        name="laptop sleep",
        injected="`orch watch` SIGSTOPped 10 s (past the 2 s unreachable and 3 s stale limits) "
        "while the run's worker is killed; then SIGCONT",
        report="exactly one alert on waking: `crashed` (no `unreachable`, no `hung`)",
        within_s=60,
        survives="the watcher (carries on), the crash (not missed)",
    )
    ctx, target = _project(tmp_path, sshd_server, hook)
    run = start_run(ctx, target, stale_after_s=3.0)
    watcher = _watch(ctx.project_root, tmp_path / "watch.log")
    try:
        wait_until(lambda: _seq(ctx, run.stage_dir, run.run_id), 30, what="first poll")
        watcher.send_signal(signal.SIGSTOP)
        signal_pid(worker_pid(target, run), signal.SIGKILL)
        time.sleep(10.0)
        assert hook.posts == []
        sc.start()
        watcher.send_signal(signal.SIGCONT)
        hook.wait_for("CRASHED", run.run_id, timeout=sc.within_s)
        sc.detected()
        time.sleep(3.0)  # more polls and delivery rounds
        assert len(hook.posts) == 1, hook.titles()
        assert ctx.store.get_run(run.stage_dir, run.run_id).phase is Phase.CRASHED  # type: ignore[union-attr]
        assert watcher.poll() is None
    finally:
        watcher.send_signal(signal.SIGCONT)
        _stop(watcher)
        kill_session(target, run)
        target.close()
        ctx.close()
    sc.record()
