"""`orch instances`, the idle policy and the provider check against the local Vast stand-in
(a real HTTP server on 127.0.0.1; no ssh needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.vast.cost import apply_idle_policy
from orchestrator.vast.provider import check_instance
from tests.vast_server import VastServer

KEY = "vk-cmd-55aa66bb77cc88dd"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[VastServer]:
    with VastServer(api_key=KEY) as srv:
        monkeypatch.setenv("VAST_API_KEY", KEY)
        (tmp_path / "orch.toml").write_text(
            'default_target = "gpu"\n[targets.gpu]\nkind = "vast"\n'
            f'api_url = "{srv.url}"\nidle_minutes = 10\nidle_action = "destroy"\n'
        )
        monkeypatch.chdir(tmp_path)
        yield srv


def test_instances_lists_marks_foreign_and_reconciles(
    server: VastServer, capsys: pytest.CaptureFixture[str]
) -> None:
    start = (datetime.now(timezone.utc) - timedelta(hours=2)).timestamp()
    ours = server.add_instance(label="orch-gpu", dph_total=0.5, start_date=start)
    theirs = server.add_instance(label="console", dph_total=0.25, start_date=start)
    ctx = Context()
    try:
        ctx.store.upsert_instance("vast", str(ours), "gpu", state="running", dph=0.5)
        ctx.store.upsert_instance("vast", "424242", "gpu", state="running", dph=0.5)  # gone at Vast
    finally:
        ctx.close()
    capsys.readouterr()
    assert main(["instances", "--json"]) == 0
    lines = {d["id"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(lines) == {ours, theirs}
    assert lines[ours]["target"] == "gpu" and lines[theirs]["target"] == ""
    assert lines[ours]["uptime_h"] == pytest.approx(2.0, abs=0.01)
    assert lines[ours]["spend"] == pytest.approx(1.0, abs=0.01)
    ctx = Context()
    try:
        gone = [r for r in ctx.store.list_instances() if r["instance_id"] == "424242"][0]
        assert gone["destroyed_at"] is not None and gone["state"] == "gone"
    finally:
        ctx.close()
    assert main(["instances"]) == 0
    out = capsys.readouterr().out
    assert "not orch's" in out and KEY not in out


def test_idle_policy_alerts_once_and_destroys(server: VastServer) -> None:
    iid = server.add_instance(label="orch-gpu")
    ctx = Context()
    try:
        long_ago = (datetime.now(timezone.utc) - timedelta(minutes=15)).isoformat()
        ctx.store.upsert_instance(
            "vast", str(iid), "gpu", state="running", dph=0.4, running_since=long_ago
        )
        v = apply_idle_policy(ctx, "gpu")
        assert v.idle and v.action == "destroy" and v.idle_s >= 15 * 60
        assert iid not in server.instances  # destroyed through the API
        assert ctx.store.live_instance_for("gpu") is None
        idle = [a for a in ctx.store.recent_alerts() if a["kind"] == "idle"]
        assert len(idle) == 1 and "idle for 15 min" in idle[0]["title"]
        assert not apply_idle_policy(ctx, "gpu").idle  # nothing left to judge
    finally:
        ctx.close()


def test_check_instance_gone_and_api_errors(server: VastServer) -> None:
    iid = server.add_instance(label="orch-gpu")
    ctx = Context()
    try:
        ctx.store.upsert_instance("vast", str(iid), "gpu", state="running")
        assert check_instance(ctx, "gpu").lost is False
        # Vast down: never taken as a lost instance.
        ctx.store.upsert_instance("vast", str(iid), "gpu", last_checked_at=None)
        server.inject(500, body={"success": False, "error": "boom", "msg": "database timeout"})
        v = check_instance(ctx, "gpu")
        assert not v.lost and v.state == "error" and "database timeout" in v.reason
        # Destroyed behind orch's back: {"instances": null} -> lost, gone.
        del server.instances[iid]
        ctx.store.upsert_instance("vast", str(iid), "gpu", last_checked_at=None)
        v = check_instance(ctx, "gpu")
        assert v.lost and v.state == "gone"
        assert ctx.store.live_instance_for("gpu") is None
    finally:
        ctx.close()


def test_wait_running_tolerates_a_late_instance_and_keeps_its_deadline(tmp_path: Path) -> None:
    import time

    from orchestrator.vast.client import ApiKey, VastClient
    from orchestrator.vast.provision import ProvisionFailed, wait_running
    from tests.vast_server import Box

    box = Box(host="127.0.0.1", port=1, home=tmp_path / "home")
    with VastServer(api_key=KEY, box=box, boot_polls=1, unseen_polls=2) as srv:
        ok, never = srv.add_offer(), srv.add_offer(boot="never")
        with VastClient(srv.url, ApiKey(KEY, "t"), backoff_s=0.001) as c:
            iid = c.create_instance(ok, image="i", disk_gb=10, label="l", onstart="")
            seen: list[str | None] = []
            inst = wait_running(
                c, iid, deadline=time.monotonic() + 30, poll_s=0.01, interruptible=False,
                on_status=lambda i: seen.append(i.actual_status),
            )  # fmt: skip
            assert inst.actual_status == "running" and seen == ["created", "running"]
            stuck = c.create_instance(never, image="i", disk_gb=10, label="l", onstart="")
            with pytest.raises(ProvisionFailed, match="still loading after the deadline"):
                wait_running(
                    c, stuck, deadline=time.monotonic() + 0.5, poll_s=0.01, interruptible=False
                )
