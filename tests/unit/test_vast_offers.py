"""Pure vast logic: offer query and ranking, bids, boot problems, provider verdicts, cost, idle."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.config import VastOffer, VastTarget
from orchestrator.vast.client import Instance, Offer
from orchestrator.vast.cost import idle_verdict, instance_spend, run_spend, uptime_spend
from orchestrator.vast.offers import acceptable, bid_for, build_query, describe_offer, rank_offers
from orchestrator.vast.provider import verdict_for
from orchestrator.vast.provision import boot_problem, build_onstart
from state.models import RunRecord
from state.phases import Phase
from state.store import Store


def target(**kw: object) -> VastTarget:
    offer = VastOffer(
        gpu_names=["RTX 4090", "RTX A6000"], max_dph=0.6, min_reliability=0.98, min_disk_gb=50
    )
    return VastTarget.model_validate({"offer": offer, "disk_gb": 80.0, **kw})


def offer(**kw: object) -> Offer:
    base = {
        "id": 1,
        "gpu_name": "RTX 4090",
        "num_gpus": 1,
        "gpu_ram": 24564,
        "disk_space": 200,
        "dph_total": 0.4,
        "min_bid": 0.2,
        "reliability2": 0.99,
        "cuda_max_good": 12.4,
        "geolocation": "Norway, NO",
        "direct_port_count": 4,
        "verified": True,
        "rentable": True,
    }
    return Offer.model_validate({**base, **kw})


def test_query_on_demand() -> None:
    q = build_query(target())
    assert q["gpu_name"] == {"in": ["RTX 4090", "RTX A6000"]}
    assert q["num_gpus"] == {"eq": 1} and q["gpu_ram"] == {"gte": 24000}
    assert q["dph_total"] == {"lte": 0.6} and "min_bid" not in q
    assert q["reliability2"] == {"gte": 0.98}
    assert q["disk_space"] == {"gte": 80.0}  # the larger of min_disk_gb and disk_gb
    assert q["cuda_max_good"] == {"gte": 12.1}
    assert (
        q["verified"] == {"eq": True}
        and q["rentable"] == {"eq": True}
        and q["rented"] == {"eq": False}
    )
    assert q["type"] == "on-demand" and q["order"] == [["score", "desc"]]
    assert q["allocated_storage"] == 80.0 and "direct_port_count" not in q


def test_query_interruptible_and_direct() -> None:
    t = target(
        interruptible=True, offer=VastOffer(direct_ssh=True, order="dph_total", min_cuda=None)
    )
    q = build_query(t)
    assert q["type"] == "bid" and q["min_bid"] == {"lte": 1.0} and "dph_total" not in q
    assert q["direct_port_count"] == {"gte": 1} and q["order"] == [["dph_total", "asc"]]
    assert "cuda_max_good" not in q


def test_rank_filters_and_orders() -> None:
    t = target()
    offers = [
        offer(id=1, dph_total=0.5, reliability2=0.99),
        offer(id=2, dph_total=0.3, reliability2=0.985),
        offer(id=3, dph_total=0.3, reliability2=0.999),
        offer(id=4, dph_total=0.9),  # too expensive
        offer(id=5, gpu_name="RTX 3090"),  # wrong GPU
        offer(id=6, reliability2=0.5),  # unreliable
        offer(id=7, disk_space=40),  # too little disk
        offer(id=8, cuda_max_good=11.8),  # old driver
    ]
    assert [o.id for o in rank_offers(offers, t)] == [3, 2, 1]
    assert not acceptable(offer(num_gpus=2), t)


def test_bid() -> None:
    assert bid_for(offer(), target()) is None
    assert bid_for(offer(min_bid=0.2), target(interruptible=True)) == pytest.approx(0.22)
    assert bid_for(offer(min_bid=0.2), target(interruptible=True, bid_dph=0.15)) == 0.15
    # capped at max_dph
    assert bid_for(offer(min_bid=0.59), target(interruptible=True)) == pytest.approx(0.6)


def test_describe_offer() -> None:
    text = describe_offer(offer(), target())
    assert "RTX 4090" in text and "$0.400/h" in text and "99.0%" in text and "Norway" in text


def test_onstart_creates_no_auto_tmux_then_user_lines() -> None:
    script = build_onstart(target(onstart="echo hi > /tmp/x"))
    lines = script.splitlines()
    assert lines[1] == "touch ~/.no_auto_tmux" and lines[-1] == "echo hi > /tmp/x"


def inst(**kw: object) -> Instance:
    return Instance.parse({"id": 9, **kw})


def test_boot_problems_fail_fast() -> None:
    assert boot_problem(inst(actual_status="loading"), interruptible=False) is None
    assert boot_problem(inst(actual_status=None), interruptible=False) is None
    assert "exited" in (boot_problem(inst(actual_status="exited"), interruptible=False) or "")
    assert "offline" in (boot_problem(inst(actual_status="offline"), interruptible=False) or "")
    assert "unknown" in (boot_problem(inst(actual_status="unknown"), interruptible=False) or "")
    bad = inst(actual_status="loading", status_msg="Error response from daemon: manifest unknown")
    assert "manifest unknown" in (boot_problem(bad, interruptible=False) or "")
    outbid = inst(
        actual_status="stopped",
        cur_state="stopped",
        intended_status="stopped",
        next_state="stopped",
    )
    assert "outbid" in (boot_problem(outbid, interruptible=True) or "")


def test_provider_verdicts() -> None:
    assert verdict_for(None, interruptible=False) == verdict_for(None, interruptible=True)
    assert verdict_for(None, interruptible=False).state == "gone"
    outbid = inst(
        actual_status="stopped",
        cur_state="stopped",
        intended_status="stopped",
        next_state="stopped",
    )
    v = verdict_for(outbid, interruptible=True)
    assert v.lost and v.state == "outbid" and "preempted" in v.reason
    assert verdict_for(outbid, interruptible=False).state == "stopped"
    for status in ("exited", "offline", "unknown"):
        assert verdict_for(inst(actual_status=status), interruptible=False).lost
    running = verdict_for(inst(actual_status="running", cur_state="running"), interruptible=True)
    assert not running.lost and running.state == "running"
    assert not verdict_for(inst(actual_status="loading"), interruptible=False).lost


# -- cost -------------------------------------------------------------------------------------
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_instance_and_uptime_spend() -> None:
    row = {"dph": 0.5, "running_since": T0.isoformat(), "destroyed_at": None}
    assert instance_spend(row, T0 + timedelta(hours=3)) == pytest.approx(1.5)
    row["destroyed_at"] = (T0 + timedelta(hours=2)).isoformat()
    assert instance_spend(row, T0 + timedelta(hours=10)) == pytest.approx(1.0)
    assert (
        instance_spend({"dph": 0.5, "running_since": None}, T0) == 0.0
    )  # not running yet: no GPU bill
    hours, spend = uptime_spend(0.4, T0.timestamp(), T0 + timedelta(minutes=90))
    assert hours == pytest.approx(1.5) and spend == pytest.approx(0.6)


def _run(
    store: Store, run_id: str, phase: Phase, start: datetime, end: datetime, target: str = "gpu"
) -> RunRecord:
    rec = RunRecord(
        run_id=run_id,
        stage="s",
        stage_dir="s",
        target=target,
        phase=phase,
        session="x",
        run_dir=f"runs/s/{run_id}",
        created_at=start,
        updated_at=end,
    )
    store.insert_run(rec)
    return rec


def test_run_spend_and_idle(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.upsert_instance(
        "vast", "7", "gpu", dph=0.6, state="running", running_since=T0.isoformat()
    )
    rec = _run(
        store, "20260101-000000", Phase.SUCCEEDED, T0 + timedelta(hours=1), T0 + timedelta(hours=3)
    )
    assert run_spend(store, rec, T0 + timedelta(hours=5)) == pytest.approx(1.2)
    local = _run(store, "20260101-000001", Phase.SUCCEEDED, T0, T0, target="local")
    assert run_spend(store, local) is None

    # idle counts from the end of the last run
    v = idle_verdict(
        store, "gpu", idle_minutes=30, action="destroy", now=T0 + timedelta(hours=3, minutes=20)
    )
    assert not v.idle
    v = idle_verdict(
        store, "gpu", idle_minutes=30, action="destroy", now=T0 + timedelta(hours=3, minutes=40)
    )
    assert v.idle and v.action == "destroy" and v.idle_s == pytest.approx(40 * 60)
    # an active run means not idle
    _run(store, "20260101-040000", Phase.RUNNING, T0 + timedelta(hours=4), T0 + timedelta(hours=4))
    assert not idle_verdict(
        store, "gpu", idle_minutes=30, action="alert", now=T0 + timedelta(hours=9)
    ).idle
    store.close()


def test_docs_example_is_a_valid_config() -> None:
    """docs/vast.md's complete example must load as it is written."""
    import re

    from orchestrator.config import parse_config
    from tests.conftest import REPO

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    text = (REPO / "docs" / "vast.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    cfg = parse_config(tomllib.loads(block.group(1)), "docs/vast.md")
    gpu = cfg.targets["gpu"]
    assert isinstance(gpu, VastTarget) and gpu.offer.gpu_names == ["RTX 4090", "RTX A6000"]
    assert "no_auto_tmux" in build_onstart(gpu) and "HF_HOME" in build_onstart(gpu)
    assert build_query(gpu)["dph_total"] == {"lte": 0.6}
