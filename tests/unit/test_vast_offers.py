"""Pure vast logic: offer query and ranking, bids, boot problems, provider verdicts, cost, idle."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.config import VastOffer, VastTarget
from orchestrator.vast.client import Instance, Offer
from orchestrator.vast.cost import (
    idle_verdict,
    instance_hours,
    instance_spend,
    listed_hours,
    run_spend,
)
from orchestrator.vast.models import parse_offers
from orchestrator.vast.offers import (
    acceptable,
    bid_for,
    build_query,
    describe_offer,
    expected_spend,
    rank_offers,
    rebid_price,
)
from orchestrator.vast.provider import verdict_for
from orchestrator.vast.provision import boot_problem, build_onstart
from orchestrator.vast.records import running_fields, stopped_fields
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
        "reliability": 0.99,
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
    # vastai/api/query.py: the filter key is `reliability`; `reliability2` is ignored by Vast.
    assert q["reliability"] == {"gte": 0.98} and "reliability2" not in q
    # vastai/api/offers.py search_offers: the official client's default filters.
    assert q["external"] == {"eq": False} and "duration" not in q
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
        offer(id=1, dph_total=0.5, reliability=0.99),
        offer(id=2, dph_total=0.3, reliability=0.985),
        offer(id=3, dph_total=0.3, reliability=0.999),
        offer(id=4, dph_total=0.9),  # too expensive
        offer(id=5, gpu_name="RTX 3090"),  # wrong GPU
        offer(id=6, reliability=0.5),  # unreliable
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


def test_boot_problems_final_or_recoverable() -> None:
    def bp(**kw: object) -> tuple[str, bool] | None:
        p = boot_problem(inst(**kw), interruptible=kw.pop("_bid", False) is True)  # type: ignore[arg-type]
        return None if p is None else (p.reason, p.recoverable)

    assert bp(actual_status="loading") is None and bp(actual_status=None) is None
    reason, recoverable = bp(actual_status="exited") or ("", True)
    assert "exited" in reason and not recoverable  # final: the container exited
    # A new instance starts `unknown` (no heartbeat yet); `offline` is computed: both recover.
    for status in ("unknown", "offline"):
        reason, recoverable = bp(actual_status=status) or ("", False)
        assert status in reason and recoverable
    # An image pull that is retried says "error" too: recoverable, given boot_grace_s.
    reason, recoverable = bp(
        actual_status="loading", status_msg="Error response from daemon: TLS handshake timeout"
    ) or ("", False)
    assert "TLS handshake" in reason and recoverable
    outbid = inst(
        actual_status="stopped",
        cur_state="stopped",
        intended_status="running",
        next_state="stopped",
    )
    p = boot_problem(outbid, interruptible=True)
    assert p is not None and "outbid" in p.reason and not p.recoverable
    resuming = boot_problem(outbid, interruptible=True, resuming=True)
    assert resuming is not None and resuming.recoverable  # after a raised bid: wait for it


def test_stop_told_apart_from_outbid_by_intended_status() -> None:
    # A stop you (or orch's idle_action) asked for: intended_status is `stopped` as well.
    asked = inst(
        actual_status="stopped",
        cur_state="stopped",
        intended_status="stopped",
        next_state="stopped",
        is_bid=True,
    )
    assert asked.stop_kind(interruptible=True) == "user" and not asked.outbid
    v = verdict_for(asked, interruptible=True)
    assert v.lost and v.state == "stopped" and "on request" in v.reason
    # Outbid: the contract is stopped while the user still wants it running.
    outbid = inst(
        actual_status="stopped",
        cur_state="stopped",
        intended_status="running",
        next_state="stopped",
    )
    assert outbid.stop_kind(interruptible=True) == "outbid"
    assert verdict_for(outbid, interruptible=True).state == "outbid"
    assert outbid.stop_kind(interruptible=False) == "host"  # on demand: the host stopped it
    assert verdict_for(outbid, interruptible=False).state == "stopped"
    # Started again: stopped, but scheduled to run.
    starting = inst(
        actual_status="stopped",
        cur_state="stopped",
        intended_status="running",
        next_state="running",
    )
    assert starting.stop_kind(interruptible=True) is None


def test_provider_verdicts() -> None:
    assert verdict_for(None, interruptible=False) == verdict_for(None, interruptible=True)
    assert verdict_for(None, interruptible=False).state == "gone"
    assert verdict_for(inst(actual_status="exited"), interruptible=False).lost
    # Heartbeat states recover: lost only after heartbeat_grace_s.
    for status in ("offline", "unknown"):
        early = verdict_for(inst(actual_status=status), interruptible=False, heartbeat_lost_s=60)
        assert not early.lost and early.state == status
        late = verdict_for(
            inst(actual_status=status),
            interruptible=False,
            heartbeat_lost_s=700,
            heartbeat_grace_s=600,
        )
        assert late.lost and "giving up" in late.reason
    running = verdict_for(inst(actual_status="running", cur_state="running"), interruptible=True)
    assert not running.lost and running.state == "running"
    assert not verdict_for(inst(actual_status="loading"), interruptible=False).lost
    assert not verdict_for(
        inst(actual_status="frozen", intended_status="frozen"), interruptible=False
    ).lost


def test_nullable_offer_fields_stay_nullable() -> None:
    # vastai/data/offer.py: every field but id is Optional; a row of nulls must not abort a
    # search, must never be rented, and is shown with `?`.
    nulls = {k: None for k in offer().model_dump() if k != "id"}
    offers, bad = parse_offers(
        [{"id": 7, **nulls}, {"id": None}, "junk", {"id": 8, "gpu_ram": {"x": 1}}]
    )
    assert [o.id for o in offers] == [7, 8] and bad == 2 and offers[1].gpu_ram is None
    empty = offers[0]
    t = target()
    assert not acceptable(empty, t) and rank_offers(offers, t) == []
    text = describe_offer(empty, t)
    assert "?x ? ? GB" in text and "$?/h" in text and "reliability ?%" in text
    assert expected_spend(empty, t) is None
    # Interruptible with nothing to bid from: not acceptable (never rented on demand instead).
    assert bid_for(offer(min_bid=None, dph_total=None), target(interruptible=True)) is None
    assert not acceptable(offer(min_bid=None, dph_total=None), target(interruptible=True))
    # Unknown reliability ranks after known ones; acceptable when nothing is required.
    loose = target(offer=VastOffer(min_reliability=0.0, max_dph=1.0, min_disk_gb=50))
    ranked = rank_offers([offer(id=1, reliability=None), offer(id=2, reliability=0.9)], loose)
    assert [o.id for o in ranked] == [2, 1]


def test_external_and_contract_duration_filtered() -> None:
    assert not acceptable(offer(external=True), target())  # the CLI hides external offers
    t = target(expected_hours=48)
    assert build_query(t)["duration"] == {"gte": 48 * 3600}  # seconds, as offers_mult
    assert not acceptable(offer(duration=24 * 3600.0), t)
    assert acceptable(offer(duration=72 * 3600.0), t) and acceptable(offer(duration=None), t)
    assert expected_spend(offer(dph_total=0.4), t) == pytest.approx(19.2)
    assert expected_spend(offer(dph_total=0.4), target()) == pytest.approx(0.4)  # one hour


def test_rebid_within_the_ceiling() -> None:
    t = target(interruptible=True, max_bid_dph=0.5)
    assert rebid_price(0.3, 0.22, t) == pytest.approx(0.33)  # 10% over the machine's minimum
    assert rebid_price(None, 0.2, t) == pytest.approx(0.24)  # 20% over the last bid
    assert rebid_price(0.47, 0.3, t) == pytest.approx(0.5)  # capped at the ceiling
    assert rebid_price(0.6, 0.3, t) is None  # the minimum alone is over the ceiling
    assert rebid_price(None, 0.5, t) is None  # already at the ceiling
    assert rebid_price(None, None, t) is None
    assert rebid_price(0.5, None, target(interruptible=True)) == pytest.approx(0.55)  # max_dph


def test_ports_of_any_shape() -> None:
    # docs show_instance.yaml shows `ports` as a list of ints; vastai/data/instance.py: a str.
    for ports in ([8080, 8081], "8080/tcp", None, {"22/tcp": "x"}):
        i = inst(ports=ports, public_ipaddr="1.2.3.4", ssh_host="ssh5.vast.ai", ssh_port=3)
        ep = i.ssh_endpoint()
        assert ep is not None and ep.kind == "proxy"
    odd = inst(dph_total={"a": 1}, ssh_port="x", label=5)  # odd shapes read as unknown
    assert odd.dph_total is None and odd.ssh_port is None


# -- cost -------------------------------------------------------------------------------------
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_instance_spend_counts_running_stretches() -> None:
    row: dict[str, object] = {"dph": 0.5, "running_since": T0.isoformat(), "destroyed_at": None}
    assert instance_spend(row, T0 + timedelta(hours=3)) == pytest.approx(1.5)
    row["destroyed_at"] = (T0 + timedelta(hours=2)).isoformat()
    assert instance_spend(row, T0 + timedelta(hours=10)) == pytest.approx(1.0)
    assert (
        instance_spend({"dph": 0.5, "running_since": None}, T0) == 0.0
    )  # not running yet: no GPU bill
    # Stopped after 2 h, started again 5 h later, running 1 h since: 3 h, not 8 h (Vast's
    # start_date, the contract start, would say 8).
    row = {"dph": 0.5, "running_since": T0.isoformat(), "destroyed_at": None, "info_json": ""}
    row.update(stopped_fields(row, T0 + timedelta(hours=2)))
    assert instance_hours(row, T0 + timedelta(hours=6)) == pytest.approx(2.0)  # stopped: no clock
    row.update(running_fields(row, T0 + timedelta(hours=7)))
    assert instance_hours(row, T0 + timedelta(hours=8)) == pytest.approx(3.0)
    row.update(running_fields(row, T0 + timedelta(hours=8)))  # seen running again: same stretch
    assert instance_spend(row, T0 + timedelta(hours=8)) == pytest.approx(1.5)
    assert listed_hours(90) == pytest.approx(1.5) and listed_hours(None) is None


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
