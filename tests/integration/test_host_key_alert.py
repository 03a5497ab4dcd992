"""A changed host key is its own alert (issue 13, defect 4), against a real sshd whose host key
is rotated under a watched run, and a real webhook: the researcher is told the box's identity
changed and how to fix it, at once, once; not that the box is silent; the run is never judged
crashed meanwhile and is watched again once the pin is fixed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.monitor.refresh import Poller
from orchestrator.targets.ssh import SshTarget
from state.phases import Phase
from tests.integration.monitor_harness import Webhook, kill_session, start_run, wait_until
from tests.integration.test_monitor import _project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def test_changed_host_key_pages_once_with_the_fix_never_as_unreachable(
    tmp_path: Path, fresh_sshd: SshServer, hook: Webhook
) -> None:
    """Injected: the box's host key changes while a run is watched (sshd restarted with a new
    key). Must report: one `host_key` alert naming the target and the `ssh-keygen -R` fix,
    within a couple of polls; no `unreachable` page although the outage outlasts
    `unreachable_alert_after_s` (2 s); the run stays running. Survives: the run, which is
    judged again (seq moving) once the old pin is dropped."""
    ctx, target = _project(tmp_path, fresh_sshd, hook)
    assert isinstance(target, SshTarget)
    run = start_run(ctx, target)
    poller = Poller(ctx)
    try:
        poller.poll_target("box")
        seq0 = wait_until(
            lambda: (r := ctx.store.get_run(run.stage_dir, run.run_id)) and r.last_seq, 15
        )
        fresh_sshd.rotate_host_key()
        poller.close()  # the next poll connects anew and meets the new key

        def paged() -> list[dict[str, object]]:
            poller.poll_target("box")
            return hook.matching("HOST KEY CHANGED")

        wait_until(paged, 60, every=0.3, what="host key alert")
        deadline = time.monotonic() + 4.0  # past unreachable_alert_after_s, still refused
        while time.monotonic() < deadline:
            poller.poll_target("box")
            time.sleep(0.3)
        [alert] = hook.matching("HOST KEY CHANGED")
        assert alert["title"] == "orch: target box HOST KEY CHANGED"
        assert alert["type"] == "failure"
        msg = str(alert["message"])
        assert "changed: pinned" in msg and "ssh-keygen -R" in msg and run.key in msg
        assert not any("unreachable" in t for t in hook.titles()), hook.titles()
        rec = ctx.store.get_run(run.stage_dir, run.run_id)
        assert rec is not None and rec.phase is Phase.RUNNING and rec.unreachable_since

        # The researcher checks the box and drops the old pin: watched again, silently.
        assert target.forget_host_key() == 1
        poller.close()
        wait_until(
            lambda: (
                poller.poll_target("box")
                and (r := ctx.store.get_run(run.stage_dir, run.run_id))
                and r.unreachable_since is None
                and r.last_seq != seq0
            ),
            60,
            every=0.3,
            what="watched again",
        )
        assert len(hook.matching("HOST KEY CHANGED")) == 1
        assert ctx.store.get_run(run.stage_dir, run.run_id).phase is Phase.RUNNING  # type: ignore[union-attr]
    finally:
        poller.close()
        kill_session(target, run)
        target.close()
        ctx.close()
