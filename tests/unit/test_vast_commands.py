"""`orch instances`, the idle policy and the provider check against the local Vast stand-in
(a real HTTP server on 127.0.0.1; no ssh needed)."""

from __future__ import annotations

import io
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
    start = (datetime.now(timezone.utc) - timedelta(hours=5)).timestamp()
    ours = server.add_instance(label="orch-gpu-0badc0de", dph_total=0.5, start_date=start)
    theirs = server.add_instance(label="console", dph_total=0.25, start_date=start, uptime_mins=90)
    bare = server.add_instance(label=None, dph_total=None, gpu_name=None, num_gpus=None)
    ctx = Context()
    try:
        # Running for 2 h by orch's record; the contract (start_date) is 5 h old.
        since = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
        ctx.store.upsert_instance(
            "vast", str(ours), "gpu", state="running", dph=0.5, running_since=since
        )
        ctx.store.upsert_instance("vast", "424242", "gpu", state="running", dph=0.5)  # gone at Vast
    finally:
        ctx.close()
    capsys.readouterr()
    assert main(["instances", "--json"]) == 0
    lines = {d["id"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(lines) == {ours, theirs, bare}
    assert lines[ours]["target"] == "gpu" and lines[theirs]["target"] == ""
    assert lines[ours]["uptime_h"] == pytest.approx(2.0, abs=0.01)  # not the contract's 5 h
    assert lines[ours]["spend"] == pytest.approx(1.0, abs=0.01)
    assert lines[ours]["age_h"] == pytest.approx(5.0, abs=0.01)
    assert lines[theirs]["uptime_h"] == pytest.approx(1.5) and lines[theirs][
        "spend"
    ] == pytest.approx(0.375)
    assert (
        lines[bare]["uptime_h"] is None
        and lines[bare]["spend"] is None
        and lines[bare]["dph"] is None
    )
    ctx = Context()
    try:
        gone = [r for r in ctx.store.list_instances() if r["instance_id"] == "424242"][0]
        assert gone["destroyed_at"] is not None and gone["state"] == "gone"
    finally:
        ctx.close()
    assert main(["instances"]) == 0
    out = capsys.readouterr().out
    assert "not orch's" in out and KEY not in out and "account credit: $25.00" in out
    assert "?" in out  # the instance with nulls


def test_unrecorded_instances_are_adopted_or_shown_as_orphans(
    server: VastServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.vast import ledger

    # A create whose answer was lost: the ledger row was written, Vast made the instance.
    lost = server.add_instance(label="orch-gpu-00000001")
    ctx = Context()
    try:
        ledger.record_request(ctx.store, "orch-gpu-00000001", "gpu", server.url, 1)
    finally:
        ctx.close()
    assert main(["instances", "--json"]) == 0
    lines = {d["id"]: d for d in json.loads(capsys.readouterr().out)}
    assert lines[lost]["target"] == "gpu" and not lines[lost]["orphan"]  # adopted: recorded
    ctx = Context()
    try:
        row = ctx.store.live_instance_for("gpu")
        assert row is not None and row["instance_id"] == str(lost)
        assert ledger.pending(ctx.store) == []
    finally:
        ctx.close()
    # Labelled as orch's with no record (the target has its box): an orphan, never adopted.
    orphan = server.add_instance(label="orch-gpu-00000002")
    mine = server.add_instance(label="orch-gpu-mine")  # not orch's pattern: the user's
    assert main(["instances", "--json"]) == 0
    lines = {d["id"]: d for d in json.loads(capsys.readouterr().out)}
    assert lines[orphan]["orphan"] and lines[orphan]["target"] == "gpu"
    assert not lines[mine]["orphan"] and lines[mine]["target"] == ""
    assert main(["instances"]) == 0
    assert "`orch down --orphans` destroys" in " ".join(capsys.readouterr().out.split())
    # Without a terminal and without --yes: one error line, nothing destroyed.
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["down", "--orphans"]) == 2
    assert "--yes" in capsys.readouterr().err and orphan in server.instances
    assert main(["down", "--orphans", "--yes"]) == 0
    assert orphan not in server.instances
    assert lost in server.instances and mine in server.instances  # alive and recorded / theirs
    ctx = Context()
    try:
        row = [r for r in ctx.store.list_instances() if r["instance_id"] == str(orphan)][0]
        assert row["destroyed_at"] and row["label"] == "orch-gpu-00000002"
        assert ctx.store.live_instance_for("gpu")["instance_id"] == str(lost)  # type: ignore[index]
    finally:
        ctx.close()
    assert main(["down", "--orphans", "--yes"]) == 0
    assert "no orphaned" in capsys.readouterr().out


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
        # A 404 (a wrong path or key) is an error, not "gone": the box is not marked destroyed.
        ctx.store.upsert_instance("vast", str(iid), "gpu", last_checked_at=None)
        server.inject(404, body={"success": False, "error": "not_found", "msg": "Not Found"})
        v = check_instance(ctx, "gpu")
        assert not v.lost and v.state == "error" and ctx.store.live_instance_for("gpu") is not None
        # Destroyed behind orch's back: {"instances": null} -> lost, gone.
        del server.instances[iid]
        ctx.store.upsert_instance("vast", str(iid), "gpu", last_checked_at=None)
        v = check_instance(ctx, "gpu")
        assert v.lost and v.state == "gone"
        assert ctx.store.live_instance_for("gpu") is None
    finally:
        ctx.close()


def test_heartbeat_loss_is_not_final_until_the_grace(server: VastServer) -> None:
    iid = server.add_instance(label="orch-gpu", actual_status="offline")
    ctx = Context()
    try:
        ctx.store.upsert_instance("vast", str(iid), "gpu", state="running")
        t0 = datetime.now(timezone.utc)
        v = check_instance(ctx, "gpu", now=t0)
        assert not v.lost and v.state == "offline"
        ctx.store.upsert_instance("vast", str(iid), "gpu", last_checked_at=None)
        v = check_instance(ctx, "gpu", now=t0 + timedelta(minutes=5))
        assert not v.lost  # heartbeat_grace_s = 600
        server.set_status(iid, actual="running")  # it came back: the clock restarts
        ctx.store.upsert_instance("vast", str(iid), "gpu", last_checked_at=None)
        assert check_instance(ctx, "gpu", now=t0 + timedelta(minutes=6)).state == "running"
        server.set_status(iid, actual="unknown")
        for minutes in (7, 18):
            ctx.store.upsert_instance("vast", str(iid), "gpu", last_checked_at=None)
            v = check_instance(ctx, "gpu", now=t0 + timedelta(minutes=minutes))
        assert v.lost and v.state == "unknown" and "giving up" in v.reason
    finally:
        ctx.close()


def test_a_box_orch_stopped_is_started_again_not_destroyed(
    server: VastServer, tmp_path: Path
) -> None:
    """idle_action = "stop" on an interruptible target: the stop sets intended_status, so it is
    not taken for an outbid: the monitor calls it stopped and `orch up` starts it again."""
    from orchestrator.vast.provision import _reuse_live, make_client, vast_config

    (tmp_path / "orch.toml").write_text(
        'default_target = "gpu"\n[targets.gpu]\nkind = "vast"\ninterruptible = true\n'
        f'api_url = "{server.url}"\nidle_minutes = 10\nidle_action = "stop"\n'
    )
    iid = server.add_instance(label="orch-gpu-00c0ffee", is_bid=True)
    ctx = Context()
    try:
        long_ago = (datetime.now(timezone.utc) - timedelta(minutes=15)).isoformat()
        ctx.store.upsert_instance(
            "vast", str(iid), "gpu", state="running", dph=0.4, running_since=long_ago
        )
        assert apply_idle_policy(ctx, "gpu").action == "stop"
        assert server.instances[iid]["intended_status"] == "stopped"
        v = check_instance(ctx, "gpu")
        assert v.state == "stopped" and "outbid" not in v.reason
        name, cfg = vast_config(ctx, "gpu")
        with make_client(cfg) as client:
            got = _reuse_live(ctx, client, name, cfg)
        assert got is not None and got[1] == "restarted"
        assert iid in server.instances and server.instances[iid]["intended_status"] == "running"
        assert server.request_count("DELETE") == 0
    finally:
        ctx.close()


def test_outbid_box_is_kept_by_a_raised_bid_within_the_ceiling(
    server: VastServer, tmp_path: Path
) -> None:
    from orchestrator.vast.provision import _reuse_live, make_client, vast_config

    (tmp_path / "orch.toml").write_text(
        'default_target = "gpu"\n[targets.gpu]\nkind = "vast"\ninterruptible = true\n'
        f'api_url = "{server.url}"\nmax_bid_dph = 0.5\n'
    )
    iid = server.add_instance(label="orch-gpu-0000beef", is_bid=True, dph_total=0.22)
    server.preempt(iid, min_bid=0.3)
    ctx = Context()
    try:
        ctx.store.upsert_instance(
            "vast", str(iid), "gpu", state="running", dph=0.22, info_json='{"bid_dph": 0.22}'
        )
        name, cfg = vast_config(ctx, "gpu")
        with make_client(cfg) as client:
            got = _reuse_live(ctx, client, name, cfg)
            assert got is not None and got[1] == "rebid" and "$0.330/h" in got[2]
            assert server.bids[iid] == [0.33]
            info = json.loads((ctx.store.live_instance_for("gpu") or {})["info_json"])
            assert info["bid_dph"] == 0.33 and "stopped_at" in info  # the GPU clock stopped
            # Over the ceiling: destroyed, so the caller rents elsewhere.
            server.preempt(iid, min_bid=0.6)
            assert _reuse_live(ctx, client, name, cfg) is None
        assert iid not in server.instances and ctx.store.live_instance_for("gpu") is None
    finally:
        ctx.close()


def test_lost_create_answer_leaves_one_recorded_instance(
    server: VastServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaled by 1/100: Vast answers the create after 0.4 s (40 s); with the official 120 s
    (1.2 s) it is recorded at once; with the old 30 s (0.3 s) the answer is lost, and the label
    finds the instance: still exactly one, recorded, and never a second create."""
    from orchestrator.vast import client as client_mod
    from orchestrator.vast import ledger, reconcile
    from orchestrator.vast.offers import rank_offers
    from orchestrator.vast.provision import _create, make_client, vast_config

    monkeypatch.setattr(reconcile, "SETTLE_S", 2.0)
    server.create_delay_s = 0.4
    for create_timeout in (1.2, 0.3):
        monkeypatch.setattr(client_mod, "CREATE_TIMEOUT_S", create_timeout)
        server.instances.clear()
        server.add_offer()
        ctx = Context()
        try:
            name, cfg = vast_config(ctx, "gpu")
            cfg = cfg.model_copy(update={"poll_s": 0.05})
            with make_client(cfg) as client:
                offer = rank_offers(client.search_offers({}), cfg)[0]
                iid = _create(ctx, client, name, cfg, offer, keep=False)
            assert list(server.instances) == [iid]
            live = [
                r for r in ctx.store.list_instances(live_only=True) if r["instance_id"] == str(iid)
            ]
            assert len(live) == 1 and live[0]["label"].startswith("orch-gpu-")
            assert ledger.pending(ctx.store) == []
            ctx.store.upsert_instance("vast", str(iid), "gpu", destroyed_at="2000-01-01")
        finally:
            ctx.close()
    assert server.request_count("PUT", "/asks/") == 2  # one create each, never resent


@pytest.mark.slow
def test_a_create_answering_after_40_s_is_recorded_once(server: VastServer, tmp_path: Path) -> None:
    """Unscaled: Vast answers after 40 s, longer than the old 30 s timeout."""
    from orchestrator.vast.offers import rank_offers
    from orchestrator.vast.provision import _create, make_client, vast_config

    server.create_delay_s = 40.0
    server.add_offer()
    ctx = Context()
    try:
        name, cfg = vast_config(ctx, "gpu")
        with make_client(cfg) as client:
            iid = _create(
                ctx, client, name, cfg, rank_offers(client.search_offers({}), cfg)[0], keep=False
            )
        assert list(server.instances) == [iid] and server.request_count("PUT", "/asks/") == 1
        # The answer itself arrived (120 s, vastai/api/client.py _DEFAULT_TIMEOUT_SECONDS): no
        # lookup by label was needed, as it would be after the old 30 s.
        assert server.request_count("GET", "/api/v1/instances/") == 0
        row = ctx.store.live_instance_for("gpu")
        assert row is not None and row["instance_id"] == str(iid)
    finally:
        ctx.close()


@pytest.mark.parametrize("failure", ["502", "no answer"])
def test_create_failing_after_sending_is_reconciled_later(
    server: VastServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: str,
) -> None:
    """The create fails after it was sent (a 502 from the gateway, or no answer within the
    create timeout) and Vast lists nothing yet: one error line, no second create, the ledger
    row stays open; when the instance shows up, `orch instances` records it. Nothing is ever
    rented without a record."""
    from orchestrator.vast import client as client_mod
    from orchestrator.vast import ledger, reconcile

    monkeypatch.setattr(client_mod, "CREATE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(reconcile, "SETTLE_S", 0.3)
    server.add_offer()
    if failure == "502":  # made nothing (yet)
        server.inject(502, text="upstream timed out", method="PUT", path="/asks/")
    else:  # a create that never answers (in 0.2 s) and has made nothing Vast lists yet
        server.inject(200, body={"success": True}, method="PUT", path="/asks/", delay_s=3.0)
    server.add_offer(dph_total=0.5)
    (Path.cwd() / "identity").write_text("x")
    (Path.cwd() / "identity.pub").write_text("ssh-ed25519 AAAA test")
    with open("orch.toml", "a") as fh:
        fh.write('identity_file = "identity"\npoll_s = 0.05\n')
    assert main(["up"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "did not confirm the create" in err
    assert server.instances == {} and server.request_count("PUT", "/asks/") == 1
    ctx = Context()
    try:
        [p] = ledger.pending(ctx.store)
        assert ctx.store.list_instances() == []
    finally:
        ctx.close()
    # Vast made it after all, under the label orch wrote down first.
    late = server.add_instance(label=p.label)
    assert main(["instances", "--json"]) == 0
    lines = {d["id"]: d for d in json.loads(capsys.readouterr().out)}
    assert lines[late]["target"] == "gpu"
    ctx = Context()
    try:
        assert ledger.pending(ctx.store) == []
        assert ctx.store.live_instance_for("gpu")["instance_id"] == str(late)  # type: ignore[index]
    finally:
        ctx.close()


def test_up_refuses_what_the_credit_does_not_cover(
    server: VastServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.credit = 2.0
    server.add_offer(dph_total=0.4)
    (Path.cwd() / "identity").write_text("x")
    (Path.cwd() / "identity.pub").write_text("ssh-ed25519 AAAA test")
    with open("orch.toml", "a") as fh:
        fh.write('identity_file = "identity"\nexpected_hours = 10\n')
    assert main(["up"]) == 1
    err = capsys.readouterr().err
    assert "credit ($2.00) does not cover 10 h" in err and "$4.00" in err
    assert server.instances == {} and server.request_count("PUT", "/asks/") == 0
    # A contract shorter than the planned use is filtered out by Vast and by orch.
    q = [r.body for r in server.requests if r.path == "/api/v0/bundles/"][-1]
    assert q["duration"] == {"gte": 36000} and q["external"] == {"eq": False}


def test_offers_all_null_is_one_line(
    server: VastServer, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = ("gpu_name", "num_gpus", "gpu_ram", "disk_space", "dph_total", "min_bid", "reliability",
              "reliability2", "direct_port_count", "cuda_max_good", "verified", "rentable",
              "external", "duration", "geolocation", "machine_id")  # fmt: skip
    server.add_offer(**dict.fromkeys(fields))
    (Path.cwd() / "identity").write_text("x")
    (Path.cwd() / "identity.pub").write_text("ssh-ed25519 AAAA test")
    with open("orch.toml", "a") as fh:
        fh.write('identity_file = "identity"\n')
    # Unfiltered too: the server returns the null row, orch re-checks it locally.
    server.inject(200, body={"offers": [{"id": 1, **dict.fromkeys(fields)}]}, path="/bundles/")
    assert main(["up"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no offer matched" in err
    assert server.instances == {} and server.request_count("PUT", "/asks/") == 0


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
            # A new instance: no heartbeat yet, then loading, then running.
            assert inst.actual_status == "running" and seen == ["unknown", "loading", "running"]
            stuck = c.create_instance(never, image="i", disk_gb=10, label="l", onstart="")
            with pytest.raises(ProvisionFailed, match="still loading after the deadline"):
                wait_running(
                    c, stuck, deadline=time.monotonic() + 0.5, poll_s=0.01, interruptible=False
                )


def test_wait_running_gives_recovering_states_their_grace(tmp_path: Path) -> None:
    import time

    from orchestrator.vast.client import ApiKey, VastClient
    from orchestrator.vast.provision import ProvisionFailed, wait_running
    from tests.vast_server import Box

    box = Box(host="127.0.0.1", port=1, home=tmp_path / "home")
    with (
        VastServer(api_key=KEY, box=box) as srv,
        VastClient(srv.url, ApiKey(KEY, "t"), backoff_s=0.001) as c,
    ):
        for boot in ("pull_retry", "heartbeat"):  # a retried image pull; a lost heartbeat
            iid = c.create_instance(
                srv.add_offer(boot=boot), image="i", disk_gb=10, label="l", onstart=""
            )
            inst = wait_running(c, iid, deadline=time.monotonic() + 30, poll_s=0.01,
                                    interruptible=False, grace_s=5.0)  # fmt: skip
            assert inst.actual_status == "running"
        bad = c.create_instance(
            srv.add_offer(boot="error_msg"), image="i", disk_gb=10, label="l", onstart=""
        )
        with pytest.raises(ProvisionFailed, match="pull access denied"):
            wait_running(c, bad, deadline=time.monotonic() + 30, poll_s=0.01,
                             interruptible=False, grace_s=0.2)  # fmt: skip
        dead = c.create_instance(
            srv.add_offer(boot="exited"), image="i", disk_gb=10, label="l", onstart=""
        )
        t0 = time.monotonic()
        with pytest.raises(ProvisionFailed, match="exited"):
            wait_running(c, dead, deadline=t0 + 30, poll_s=0.01, interruptible=False, grace_s=30)
        assert time.monotonic() - t0 < 5  # final at once


def test_up_with_a_key_without_permission_is_one_line(
    server: VastServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.vast import ledger

    server.read_only_keys.add("vk-read-only")
    monkeypatch.setenv("VAST_API_KEY", "vk-read-only")
    server.add_offer()
    (Path.cwd() / "identity").write_text("x")
    (Path.cwd() / "identity.pub").write_text("ssh-ed25519 AAAA test")
    with open("orch.toml", "a") as fh:
        fh.write('identity_file = "identity"\n')
    assert main(["up"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 403" in err and "permission" in err
    assert server.instances == {}
    ctx = Context()
    try:
        assert ledger.pending(ctx.store) == [] and ctx.store.list_instances() == []
    finally:
        ctx.close()


def test_a_404_on_a_live_box_destroys_nothing(
    server: VastServer, capsys: pytest.CaptureFixture[str]
) -> None:
    iid = server.add_instance(label="orch-gpu-0000aaaa")
    ctx = Context()
    try:
        ctx.store.upsert_instance("vast", str(iid), "gpu", state="running")
    finally:
        ctx.close()
    (Path.cwd() / "identity").write_text("x")
    (Path.cwd() / "identity.pub").write_text("ssh-ed25519 AAAA test")
    with open("orch.toml", "a") as fh:
        fh.write('identity_file = "identity"\n')
    server.inject(
        404,
        body={"success": False, "error": "not_found", "msg": "Not Found"},
        method="GET",
        path=rf"/instances/{iid}/",
    )
    assert main(["up"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 404" in err
    assert iid in server.instances and server.request_count("DELETE") == 0
    ctx = Context()
    try:
        assert ctx.store.live_instance_for("gpu") is not None
    finally:
        ctx.close()


def test_a_stop_someone_asked_for_is_not_undone_by_a_relaunch(
    server: VastServer, tmp_path: Path
) -> None:
    """A box stopped in the console while a run was on it: the run is lost, but auto-relaunch
    does not start the box again against that wish (one alert says how to)."""
    from orchestrator.monitor.actions import Actions
    from state.models import RunRecord, RunSpec, WorkerTask
    from state.phases import Phase

    (tmp_path / "orch.toml").write_text(
        'default_target = "gpu"\n[targets.gpu]\nkind = "vast"\nauto_relaunch = true\n'
        f'api_url = "{server.url}"\n'
    )
    iid = server.add_instance(label="orch-gpu-0000d00d")
    server.set_status(iid, actual="stopped", cur="stopped", intended="stopped", next_="stopped")
    ctx = Context()
    try:
        ctx.store.upsert_instance("vast", str(iid), "gpu", state="running")
        v = check_instance(ctx, "gpu")
        assert v.lost and v.state == "stopped"
        now = datetime.now(timezone.utc)
        task = WorkerTask(command="train", args={"model": "tiny://default"})
        spec = RunSpec(run_id="r1", stage="s", stage_dir="s", task=task, target="gpu")
        rec = RunRecord(
            run_id="r1", stage="s", stage_dir="s", target="gpu", phase=Phase.LOST,
            reason=v.reason, session="orch-s-r1", run_dir="runs/s/r1", created_at=now,
            updated_at=now, spec_json=spec.model_dump_json(),
        )  # fmt: skip
        ctx.store.insert_run(rec)
        Actions(ctx).on_final(rec)
        alerts = [a for a in ctx.store.recent_alerts() if a["run_id"] == "r1"]
        assert [a["kind"] for a in alerts] == ["relaunch_failed"]
        assert "stopped on request" in alerts[0]["body"] and "orch up gpu" in alerts[0]["body"]
        assert server.instances[iid]["intended_status"] == "stopped"  # not started again
        assert server.request_count("PUT") == 0 and server.request_count("DELETE") == 0
    finally:
        ctx.close()


def test_plan_holds_the_stages_dollars_against_the_account_credit(
    server: VastServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`orch plan` reads the credit as `orch up` does (`/users/current`) and fails when the
    planned stages cost more than it; nothing is rented either way."""
    with open("orch.toml", "w") as fh:
        fh.write(
            'default_target = "gpu"\n[experiment]\nprofile = "tiny"\n[targets.gpu]\n'
            f'kind = "vast"\napi_url = "{server.url}"\n[targets.gpu.offer]\nmax_dph = 500.0\n'
        )
    server.add_offer(dph_total=400.0)  # the tiny study's ~40 s cost a few dollars at this rate

    def plan() -> tuple[int, dict]:
        capsys.readouterr()
        rc = main(["plan", "all", "--json"])
        return rc, json.loads(capsys.readouterr().out)

    rc, out = plan()
    cost = sum(s["dollars"] for s in out["stages"])
    assert 1.0 < cost < 25.0 and out["capacity"]["credit"] == 25.0
    [row] = [c for c in out["checks"] if c["what"] == "credit"]
    assert row["ok"] is True and row["have"] == "credit $25.00" and rc == 0
    server.credit = round(cost / 2, 2)
    rc, out = plan()
    [row] = [c for c in out["checks"] if c["what"] == "credit"]
    assert rc == 1 and row["ok"] is False and "does not cover" in out["verdict"]
    assert server.instances == {} and server.request_count("GET", "/users/current/") == 2
    # Vast reports neither `credit` nor `balance`: unknown, never a pass or a failure.
    server.inject(200, body={"id": 1, "username": "tester"}, path="/users/current/")
    rc, out = plan()
    [row] = [c for c in out["checks"] if c["what"] == "credit"]
    assert row["ok"] is None and out["capacity"]["credit"] is None and rc == 0


def test_a_second_instance_under_one_create_label_is_destroyed(server: VastServer) -> None:
    """A create whose answer was lost and that Vast carried out twice: the lookup by label
    (`select_filters`) keeps the first, records it, and destroys the other."""
    from orchestrator.vast import ledger
    from orchestrator.vast.models import Offer
    from orchestrator.vast.provision import make_client, vast_config
    from orchestrator.vast.reconcile import settle_create

    label = "orch-gpu-0000dddd"
    first = server.add_instance(label=label)
    second = server.add_instance(label=label)
    theirs = server.add_instance(label="console")
    ctx = Context()
    try:
        name, cfg = vast_config(ctx, "gpu")
        ledger.record_request(ctx.store, label, name, server.url, 1)
        with make_client(cfg) as client:
            got = settle_create(ctx, client, name, cfg, label, Offer(id=1), None, adopt=True)
        assert got == first and sorted(server.instances) == [first, theirs]
        assert server.request_count("DELETE", rf"/instances/{second}/") == 1
        live = ctx.store.live_instance_for("gpu")
        assert live is not None and live["instance_id"] == str(first)
        assert ledger.pending(ctx.store) == []
    finally:
        ctx.close()
