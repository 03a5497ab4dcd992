"""Pure offer logic: the `[targets.X.offer]` filters -> Vast's search query; rank the offers that
came back; the bid of an interruptible rental; a one-line description for the user.

No I/O here: `provision.py` sends the query and acts on the choice.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import VastOffer, VastTarget
from orchestrator.vast.client import Offer

#: Bid this much above an offer's minimum when the config names no bid.
DEFAULT_BID_MARGIN = 1.10


def build_query(target: VastTarget) -> dict[str, Any]:
    """The body of `POST /api/v0/bundles/` for a vast target's offer filters."""
    f: VastOffer = target.offer
    query: dict[str, Any] = {
        "verified": {"eq": True} if f.verified else None,
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "gpu_name": {"in": list(f.gpu_names)} if f.gpu_names else None,
        "num_gpus": {"eq": f.num_gpus},
        "gpu_ram": {"gte": round(f.min_gpu_ram_gb * 1000)},  # Vast counts MB, as its CLI does
        "reliability2": {"gte": f.min_reliability},
        "disk_space": {"gte": max(f.min_disk_gb, target.disk_gb)},
        "cuda_max_good": {"gte": f.min_cuda} if f.min_cuda is not None else None,
        "direct_port_count": {"gte": 1} if f.direct_ssh else None,
    }
    if target.interruptible:
        # A bid pays the bid, not the on-demand price: filter on the minimum bid.
        query["min_bid"] = {"lte": f.max_dph}
    else:
        query["dph_total"] = {"lte": f.max_dph}
    query = {k: v for k, v in query.items() if v is not None}
    query["order"] = [_order(f.order)]
    query["type"] = "bid" if target.interruptible else "on-demand"
    query["limit"] = f.limit
    query["allocated_storage"] = target.disk_gb
    return query


def _order(spec: str) -> list[str]:
    """`score` (best first), `dph_total` (cheapest first), `-FIELD` for descending."""
    if spec.startswith("-"):
        return [spec[1:], "desc"]
    if spec in ("score", "reliability2", "inet_down", "cuda_max_good", "gpu_ram"):
        return [spec, "desc"]
    return [spec, "asc"]


def acceptable(offer: Offer, target: VastTarget) -> bool:
    """Re-check the filters locally: never rent something the config excludes, whatever the
    server returned."""
    f = target.offer
    if f.gpu_names and offer.gpu_name not in f.gpu_names:
        return False
    if offer.num_gpus != f.num_gpus:
        return False
    if offer.gpu_ram < f.min_gpu_ram_gb * 1000 * 0.98:  # Vast reports e.g. 24564 MB for "24 GB"
        return False
    if offer.reliability2 < f.min_reliability:
        return False
    if offer.disk_space < max(f.min_disk_gb, target.disk_gb):
        return False
    if f.min_cuda is not None and (offer.cuda_max_good or 0.0) < f.min_cuda:
        return False
    if f.direct_ssh and offer.direct_port_count < 1:
        return False
    if offer.rentable is False or (f.verified and offer.verified is False):
        return False
    return price_of(offer, target) <= f.max_dph + 1e-9


def bid_for(offer: Offer, target: VastTarget) -> float | None:
    """The $/h bid of an interruptible rental (None for on-demand).

    The configured `bid_dph` wins; otherwise a margin over the offer's minimum, capped at
    `max_dph`. A bid below the minimum is still sent: Vast may then create a stopped instance,
    which provisioning destroys.
    """
    if not target.interruptible:
        return None
    if target.bid_dph is not None:
        return float(target.bid_dph)
    base = offer.min_bid if offer.min_bid else offer.dph_total
    return round(min(target.offer.max_dph, base * DEFAULT_BID_MARGIN), 4)


def price_of(offer: Offer, target: VastTarget) -> float:
    """What this rental would cost per hour: the bid when interruptible, else `dph_total`."""
    bid = bid_for(offer, target)
    return bid if bid is not None else offer.dph_total


def rank_offers(offers: list[Offer], target: VastTarget) -> list[Offer]:
    """Acceptable offers, best first: cheapest per hour, then most reliable, then Vast's order."""
    ok = [(i, o) for i, o in enumerate(offers) if acceptable(o, target)]
    ok.sort(key=lambda p: (round(price_of(p[1], target), 3), -p[1].reliability2, p[0]))
    return [o for _, o in ok]


def describe_offer(offer: Offer, target: VastTarget | None = None) -> str:
    """`offer 123: 1x RTX 4090 24 GB, $0.420/h, reliability 99.2%, Norway, NO`."""
    price = price_of(offer, target) if target is not None else offer.dph_total
    kind = " (interruptible bid)" if target is not None and target.interruptible else ""
    where = offer.geolocation or "unknown location"
    return (
        f"offer {offer.id}: {offer.num_gpus}x {offer.gpu_name} {offer.gpu_ram / 1000:.0f} GB, "
        f"${price:.3f}/h{kind}, reliability {offer.reliability2 * 100:.1f}%, {where}"
    )


def no_offer_hint(target: VastTarget) -> str:
    f = target.offer
    return (
        f"no offer matched: {f.num_gpus}x {'/'.join(f.gpu_names) or 'any GPU'} >= {f.min_gpu_ram_gb:g} GB, "
        f"<= ${f.max_dph:g}/h, reliability >= {f.min_reliability:g}, disk >= "
        f"{max(f.min_disk_gb, target.disk_gb):g} GB; loosen [targets.<name>.offer] in orch.toml"
    )
