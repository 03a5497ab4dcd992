"""An auto-pull is never given up silently (issue 13, defect 2), against a real sshd that stops
accepting connections as a run ends, a real rsync and a real webhook. The watcher's clock is
injected, so the schedule is checked exactly without waiting for it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.monitor import ledger
from orchestrator.monitor.actions import Actions, pull_delay_s
from orchestrator.monitor.refresh import Poller
from orchestrator.monitor.watch import actions_left
from state import names
from state.errors import UnreachableError, VerifyError
from state.models import RunComplete, RunRecord
from state.phases import Phase
from state.protocol import atomic_write_json, build_manifest
from state.store import parse_time
from tests.integration.test_launch import make_project
from tests.sshd import SshServer
from tests.webhook import Webhook

pytestmark = pytest.mark.integration

RID = "20260101-000000"
RUN_DIR = f"runs/s1/{RID}"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def _project(tmp_path: Path, server: SshServer, hook: Webhook, monkeypatch) -> Context:
    toml = 'default_target = "box"\n' + server.toml("box", workdir=tmp_path / "remote")
    toml += (
        "\n[monitor]\nconnect_timeout_s = 2\ncommand_timeout_s = 2\n"
        "pull_retry_s = 1\npull_backoff_cap_s = 8\npull_stuck_alert_after_s = 30\n"
        f'\n[alerts]\nurls = ["{hook.url}"]\n'
    )
    root = make_project(tmp_path / "proj", toml)
    monkeypatch.chdir(root)
    return Context()


def _box_run(tmp_path: Path, ctx: Context) -> RunRecord:
    rd = tmp_path / "remote" / RUN_DIR
    rd.mkdir(parents=True)
    (rd / "metrics.json").write_text('{"acc": 0.5}')
    atomic_write_json(rd / names.MANIFEST, build_manifest(rd, RID))
    atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=RID))
    rec = RunRecord(
        run_id=RID, stage="stage1", stage_dir="s1", target="box", phase=Phase.SUCCEEDED,
        session="", run_dir=RUN_DIR, created_at=T0, updated_at=T0,
    )  # fmt: skip
    ctx.store.insert_run(rec)
    return rec


def test_pull_delay_backs_off_only_while_the_box_is_silent() -> None:
    silent = UnreachableError("x")
    assert [pull_delay_s(n, silent, 60, 600) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]
    assert pull_delay_s(5, VerifyError("x"), 60, 600) == 60


def test_a_pull_retries_while_the_results_are_on_the_box_and_alerts_once(
    tmp_path: Path, fresh_sshd: SshServer, hook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: sshd refuses new connections from the moment the run has ended. Must report:
    pull retries past the old limit of 3, backing off 1, 2, 4, 8, 8 s (cap) while refused;
    ONE `pull_stuck` alert once no pull has worked for 30 s, with the manual command; no
    second one. Survives: the results, pulled and verified as soon as the box answers."""
    ctx = _project(tmp_path, fresh_sshd, hook, monkeypatch)
    now = [T0]
    actions = Actions(ctx, clock=lambda: now[0])
    try:
        rec = _box_run(tmp_path, ctx)
        fresh_sshd.stop()
        delays = []
        for tries in range(1, 9):
            actions.on_final(rec)
            row = ledger.monitor_row(ctx.store, "s1", RID)
            assert row["action_attempts"] == tries and not row["action_gave_up"]
            due = parse_time(row["action_next_try"])
            assert due is not None
            delays.append((due - now[0]).total_seconds())
            actions.on_final(rec)  # not due yet: not tried
            assert ledger.monitor_row(ctx.store, "s1", RID)["action_attempts"] == tries
            assert (now[0] - T0).total_seconds() >= 30 or not ctx.store.query(
                "SELECT 1 FROM alerts WHERE kind = 'pull_stuck'"
            )
            if (now[0] - T0).total_seconds() < 30:
                assert actions_left(ctx, [("s1", RID)], now=now[0])  # `--watch` waits
            Poller(ctx).deliver_alerts()
            now[0] = due
        assert delays == [1, 2, 4, 8, 8, 8, 8, 8]
        [stuck] = hook.wait_for("results NOT PULLED", timeout=10)
        assert stuck["title"] == "orch: stage1 results NOT PULLED on box"
        assert f"orch pull s1/{RID}" in stuck["message"] and "only on the box" in stuck["message"]
        assert not actions_left(ctx, [("s1", RID)], now=now[0])  # told: `--watch` may end

        fresh_sshd.start()
        now[0] += timedelta(seconds=8)
        actions.on_final(rec)
        assert "pull" in ledger.actions_done(ctx.store, "s1", RID)
        local = ctx.runs_dir / "s1" / RID
        assert (local / "metrics.json").read_text() == '{"acc": 0.5}'
        assert ctx.store.get_run("s1", RID).pulled_at is not None  # type: ignore[union-attr]
        Poller(ctx).deliver_alerts()
        assert len(hook.matching("results NOT PULLED")) == 1
    finally:
        ctx.close()


def test_a_pull_that_cannot_match_its_manifest_is_given_up_with_one_alert(
    tmp_path: Path, fresh_sshd: SshServer, hook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _project(tmp_path, fresh_sshd, hook, monkeypatch)
    now = [T0]
    actions = Actions(ctx, clock=lambda: now[0])
    try:
        rec = _box_run(tmp_path, ctx)
        (tmp_path / "remote" / RUN_DIR / "metrics.json").write_text('{"acc": 0.9}')
        for _ in range(3):
            actions.on_final(rec)
            now[0] += timedelta(seconds=2)
        row = ledger.monitor_row(ctx.store, "s1", RID)
        assert row["action_gave_up"] == 1 and "sha256 differs" in row["action_error"]
        actions.on_final(rec)
        assert ledger.monitor_row(ctx.store, "s1", RID)["action_attempts"] == 3
        Poller(ctx).deliver_alerts()
        [alert] = hook.wait_for("results NOT PULLED", timeout=10)
        assert "gave up" in alert["message"] and "metrics.json" in alert["message"]
    finally:
        ctx.close()
