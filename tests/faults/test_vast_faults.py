"""Fault campaign: a Vast interruptible box is outbid (the Vast test server's preemption) while
a real tiny training run trains on it, under a real `orch watch` with checkpoint mirroring on,
alerts going to a real webhook. The run must be marked `lost` with one alert, and the
checkpoints mirrored before the preemption must be complete on this machine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.spec import StageSpec
from orchestrator import launch as launch_mod
from orchestrator.context import Context
from state.phases import Phase
from tests.faults.campaign import Scenario
from tests.faults.test_worker_faults import _stop
from tests.integration.monitor_harness import Webhook, wait_until
from tests.integration.test_vast_e2e import (  # noqa: F401 - `env` is a fixture
    Env,
    _signal_run,
    env,
    live_row,
    small_train_task,
    toml,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def _complete(ckdir: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in ckdir.glob("step-*") if (p / "meta.json").is_file()
    )


def test_preemption_while_training(env: Env, hook: Webhook, small_model: str) -> None:  # noqa: F811
    sc = Scenario(
        name="Vast preemption while training",
        injected="the Vast test server outbids the interruptible instance while a real tiny "
        "training run trains (its processes and sshd go with it)",
        report="the run `lost` (outbid) with one alert; nothing else paged for the run",
        within_s=60,
        survives="the checkpoints mirrored to this machine before it (complete step-N dirs, "
        "meta.json last, none half-copied), which an auto-relaunch resumes from",
    )
    conf = toml(env.server, env.sshd, env.remote, interruptible="true")
    conf = conf.replace("provider_check_s = 60", "provider_check_s = 1")
    conf += (
        "pull_checkpoints_every_s = 0.5\ninterval_s = 0.3\njitter_s = 0.1\n"
        "unreachable_alert_after_s = 2\n"
        f'[alerts]\nurls = ["{hook.url}"]\n'
    )
    (env.root / "orch.toml").write_text(conf)
    env.server.add_offer(min_bid=0.15)
    assert env.cli("up").returncode == 0
    ctx = Context()
    watcher = None
    try:
        iid = int(live_row(ctx)["instance_id"])
        task = small_train_task(
            small_model, max_steps=100000, save_every=20, eval_every=100000, probe_every=100000
        )
        spec = StageSpec(name="vt-sft", stage_dir="vt-sft", task=task)
        rec = launch_mod.launch_stage(ctx, spec, "gpu")
        watcher = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "watch"],
            cwd=env.root,
            stdout=open(env.root / "watch.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        local_ck = env.root / "runs" / rec.stage_dir / rec.run_id / "checkpoints"
        wait_until(lambda: len(_complete(local_ck)) >= 1, 240, what="a mirrored checkpoint")
        wait_until(
            lambda: _complete(local_ck)[-1] >= 40 or len(_complete(local_ck)) >= 2,
            240,
            what="a second mirrored checkpoint",
        )
        sc.start()
        env.server.preempt(iid)
        _signal_run(rec.session, signal.SIGKILL)
        subprocess.run(["tmux", "kill-session", "-t", rec.session], capture_output=True)
        env.sshd.stop()
        [alert] = hook.wait_for("LOST", rec.run_id, timeout=sc.within_s)
        sc.detected()
        assert "outbid" in str(alert["message"]), alert
        final = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert final is not None and final.phase is Phase.LOST and "outbid" in final.reason
        time.sleep(2.0)
        assert len(hook.matching(rec.run_id)) == 1, hook.titles()
        assert hook.matching("CRASHED") == []
        steps = _complete(local_ck)
        assert steps, "no checkpoint mirrored"
        assert not list(local_ck.glob(".*")), "a half-copied checkpoint under runs/"
        for s in steps:
            meta = json.loads((local_ck / f"step-{s}" / "meta.json").read_text())
            assert int(meta["step"]) == s
        sc.note(f"mirrored here: {', '.join(f'step-{s}' for s in steps)}")
    finally:
        if watcher is not None:
            _stop(watcher)
        ctx.close()
    sc.record()
