"""Fault campaign: the watcher itself dies (kill -9), including while an alert POST is in
flight, on a real sshd + tmux with a real webhook receiver that can hold a request open."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.monitor.alerts import ID_HEADER, REDELIVERY_HEADER
from state.phases import Phase
from tests.faults.campaign import Scenario
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


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def test_watcher_killed_mid_delivery(tmp_path: Path, sshd_server: SshServer, hook: Webhook) -> None:
    sc = Scenario(
        name="watcher killed mid-delivery",
        injected="kill -9 of `orch watch` while its `crashed` POST is in flight (receiver holds it)",
        report="after restart, the same alert once more with the same X-Orch-Alert-Id and "
        "X-Orch-Alert-Redelivery: 1, then nothing",
        within_s=60,
        survives="the alert (delivered, marked in the store); no other alert repeated",
    )
    ctx, target = _project(tmp_path, sshd_server, hook)
    run = start_run(ctx, target)
    log = tmp_path / "watch.log"
    watcher = _watch(ctx.project_root, log)
    try:
        wait_until(lambda: _seq(ctx, run.stage_dir, run.run_id), 30, what="first poll")
        hook.hold.clear()
        signal_pid(worker_pid(target, run), signal.SIGKILL)
        [first] = hook.wait_for_requests(1, timeout=60)
        watcher.send_signal(signal.SIGKILL)
        watcher.wait(10)
        hook.hold.set()
        sc.start()
        watcher = _watch(ctx.project_root, log)
        again = hook.wait_for_requests(2, timeout=sc.within_s)[1]
        sc.detected()
        assert again[ID_HEADER] == first[ID_HEADER]
        assert again.get(REDELIVERY_HEADER) == "1" and REDELIVERY_HEADER not in first
        wait_until(
            lambda: all(a["delivered_at"] for a in ctx.store.recent_alerts(10)),
            30,
            what="delivered in the store",
        )
        time.sleep(2.0)  # more polls and delivery rounds: nothing more
        assert len(hook.headers) == 2
        assert {p["alert_id"] for p in hook.matching("CRASHED", run.run_id)} == {first[ID_HEADER]}
        assert ctx.store.get_run(run.stage_dir, run.run_id).phase is Phase.CRASHED  # type: ignore[union-attr]
    finally:
        hook.hold.set()
        _stop(watcher)
        kill_session(target, run)
        target.close()
        ctx.close()
    sc.record()


def test_watcher_killed_at_random_points(
    tmp_path: Path, sshd_server: SshServer, hook: Webhook
) -> None:
    sc = Scenario(
        name="watcher killed at random points, 20 times",
        injected="kill -9 of `orch watch` 20 times at random instants (0-1.5 s after each start) "
        "while 4 runs crash, fail, succeed and hang",
        report="every run's final alert exactly once per id (a redelivery only when flagged); "
        "nothing missed",
        within_s=180,
        survives="every state change and alert (store and receiver agree); the succeeded "
        "run's pull",
    )
    ctx, target = _project(tmp_path, sshd_server, hook)
    rng = random.Random(13)
    crash = start_run(ctx, target)
    fail = start_run(ctx, target, outcome="fail", seconds=4.0)
    ok = start_run(ctx, target, outcome="succeed", seconds=6.0)
    hang = start_run(ctx, target, stale_after_s=3.0)
    log = tmp_path / "watch.log"
    kill_at = {5: lambda: signal_pid(worker_pid(target, crash), signal.SIGKILL)}
    hpid = worker_pid(target, hang)
    signal_pid(hpid, signal.SIGSTOP)
    watcher: subprocess.Popen[bytes] | None = None
    sc.start()  # measured: from the first watcher start to every final alert received
    try:
        for i in range(20):
            if i in kill_at:
                kill_at[i]()
            watcher = _watch(ctx.project_root, log)
            time.sleep(rng.uniform(0.0, 1.5))
            watcher.send_signal(signal.SIGKILL)
            watcher.wait(10)
        sc.note(f"the 20 kills took {time.monotonic() - sc._t0:.0f} s")
        watcher = _watch(ctx.project_root, log)
        expect = {crash.run_id: "CRASHED", fail.run_id: "FAILED", ok.run_id: "succeeded"}
        expect[hang.run_id] = "HUNG"
        for run_id, word in expect.items():
            hook.wait_for(word, run_id, timeout=sc.within_s)
        sc.detected()
        wait_until(
            lambda: all(a["delivered_at"] for a in ctx.store.recent_alerts(50)),
            60,
            what="every alert delivered",
        )
        time.sleep(2.0)
        for run_id, word in expect.items():
            got = hook.matching(word, run_id)
            assert len({p["alert_id"] for p in got}) == 1, (word, got)
            firsts = [p for p in got if p.get("redelivery") != "true"]
            assert len(firsts) == 1, (word, got)  # any second copy is a flagged redelivery
        stored = {a["dedup_key"] for a in ctx.store.recent_alerts(50)}
        assert len(stored) == len(ctx.store.recent_alerts(50))
        ids = [body.get("alert_id") for _, body in hook.posts]
        dups = len(ids) - len(set(ids))
        wait_until(
            lambda: ctx.store.get_run(ok.stage_dir, ok.run_id).pulled_at,  # type: ignore[union-attr]
            60,
            what="the succeeded run pulled despite the kills",
        )
        sc.note(f"{len(hook.posts)} POSTs for {len(stored)} alerts ({dups} flagged redeliveries)")
    finally:
        signal_pid(hpid, signal.SIGCONT)
        if watcher is not None:
            _stop(watcher)
        for rec in (crash, fail, ok, hang):
            kill_session(target, rec)
        target.close()
        ctx.close()
    sc.record()
