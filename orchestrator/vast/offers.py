"""Pure offer logic: the `[targets.X.offer]` filters -> Vast's search query; rank the offers that
came back; the bid of an interruptible rental (and the raised bid that resumes an outbid one);
what a rental is expected to cost; a one-line description for the user.

The query follows the official client (vast-ai/vast-cli): the default filters
`{"verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True}, "rented": {"eq":
False}}` (`vastai/api/offers.py` search_offers); the reliability filter key `reliability` and
`duration` in seconds (`vastai/api/query.py` offers_fields, offers_mult: days * 24*60*60);
`gpu_ram` in MB (offers_mult: GB * 1000). Vast ignores a filter key it does not know, so a wrong
key silently filters nothing: the keys here are all in `offers_fields`.

Any offer field can be null (`vastai/data/offer.py`): a null never satisfies a minimum, an
unknown price is never rented, and nulls are shown as `?`. No I/O here.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import VastOffer, VastTarget
from orchestrator.vast.models import Offer

#: Bid this much above an offer's minimum when the config names no bid.
DEFAULT_BID_MARGIN = 1.10
#: A raised bid beats the last one by at least this factor.
REBID_STEP = 1.20
#: Hours of credit `orch up` wants when `expected_hours` is not set.
DEFAULT_EXPECTED_HOURS = 1.0


def build_query(target: VastTarget) -> dict[str, Any]:
    """The body of `POST /api/v0/bundles/` for a vast target's offer filters."""
    f: VastOffer = target.offer
    query: dict[str, Any] = {
        # The official client's defaults (verified is dropped only when the config allows
        # unverified hosts: `verified = false` means "either").
        "verified": {"eq": True} if f.verified else None,
        "external": {"eq": False},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "gpu_name": {"in": list(f.gpu_names)} if f.gpu_names else None,
        "num_gpus": {"eq": f.num_gpus},
        "gpu_ram": {"gte": round(f.min_gpu_ram_gb * 1000)},  # MB, as the CLI multiplies
        "reliability": {"gte": f.min_reliability},
        "disk_space": {"gte": max(f.min_disk_gb, target.disk_gb)},
        "cuda_max_good": {"gte": f.min_cuda} if f.min_cuda is not None else None,
        "direct_port_count": {"gte": 1} if f.direct_ssh else None,
        "duration": {"gte": round(target.expected_hours * 3600)} if target.expected_hours else None,
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
    if spec in ("score", "reliability", "inet_down", "cuda_max_good", "gpu_ram"):
        return [spec, "desc"]
    return [spec, "asc"]


def _at_least(value: float | None, minimum: float) -> bool:
    """A known value at or above `minimum`; an unknown one only when nothing is required."""
    return minimum <= 0 if value is None else value >= minimum


def acceptable(offer: Offer, target: VastTarget) -> bool:
    """Re-check the filters locally: never rent something the config excludes, whatever the
    server returned (a null field cannot prove that it meets a minimum)."""
    f = target.offer
    if f.gpu_names and offer.gpu_name not in f.gpu_names:
        return False
    if offer.num_gpus != f.num_gpus:
        return False
    # Vast reports e.g. 24564 MB for "24 GB".
    if not _at_least(offer.gpu_ram, f.min_gpu_ram_gb * 1000 * 0.98):
        return False
    if not _at_least(offer.reliability, f.min_reliability):
        return False
    if not _at_least(offer.disk_space, max(f.min_disk_gb, target.disk_gb)):
        return False
    if f.min_cuda is not None and not _at_least(offer.cuda_max_good, f.min_cuda):
        return False
    if f.direct_ssh and not _at_least(offer.direct_port_count, 1):
        return False
    if offer.rentable is False or offer.external is True:
        return False
    if f.verified and offer.verified is False:
        return False
    hours = target.expected_hours
    if hours and offer.duration is not None and offer.duration < hours * 3600:
        return False  # the host's contract ends before the planned use does
    price = price_of(offer, target)
    return price is not None and price <= f.max_dph + 1e-9


def bid_for(offer: Offer, target: VastTarget) -> float | None:
    """The $/h bid of an interruptible rental (None for on-demand, or when nothing is known to
    bid from: such an offer is not acceptable).

    The configured `bid_dph` wins; otherwise a margin over the offer's minimum, capped at
    `max_dph`. A bid below the minimum is still sent: Vast may then create a stopped instance,
    which provisioning destroys.
    """
    if not target.interruptible:
        return None
    if target.bid_dph is not None:
        return float(target.bid_dph)
    base = offer.min_bid if offer.min_bid else offer.dph_total
    if not base:
        return None
    return round(min(target.offer.max_dph, base * DEFAULT_BID_MARGIN), 4)


def price_of(offer: Offer, target: VastTarget) -> float | None:
    """What this rental would cost per hour (the bid when interruptible), None if unknown."""
    if target.interruptible:
        return bid_for(offer, target)
    return offer.dph_total


def expected_spend(offer: Offer, target: VastTarget, hours: float | None = None) -> float | None:
    """$ for `hours` (default `expected_hours`, else one hour) of this rental; None if unknown."""
    price = price_of(offer, target)
    if price is None:
        return None
    return round(price * (hours or target.expected_hours or DEFAULT_EXPECTED_HOURS), 4)


def rank_offers(offers: list[Offer], target: VastTarget) -> list[Offer]:
    """Acceptable offers, best first: cheapest per hour, then most reliable (unknown last),
    then Vast's order."""

    def key(p: tuple[int, Offer]) -> tuple[float, int, float, int]:
        i, o = p
        rel = o.reliability
        return (round(price_of(o, target) or 0.0, 3), rel is None, -(rel or 0.0), i)

    ok = [(i, o) for i, o in enumerate(offers) if acceptable(o, target)]
    ok.sort(key=key)
    return [o for _, o in ok]


def rebid_price(
    min_bid: float | None, current_bid: float | None, target: VastTarget
) -> float | None:
    """The raised bid that should win an outbid instance back, or None when winning it would
    cost more than the ceiling (`max_bid_dph`, else `offer.max_dph`)."""
    ceiling = target.max_bid_dph or target.offer.max_dph
    if min_bid is None and current_bid is None:
        return None  # nothing to bid from
    wanted = max((min_bid or 0.0) * DEFAULT_BID_MARGIN, (current_bid or 0.0) * REBID_STEP, 0.001)
    if min_bid is not None and min_bid > ceiling:
        return None  # the machine's minimum alone is over the ceiling
    if current_bid is not None and current_bid >= ceiling:
        return None  # already bidding the most allowed, and still outbid
    return round(min(wanted, ceiling), 4)


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    if value is None:
        return "?"
    return format(value * scale if scale != 1.0 else value, fmt)


def describe_offer(offer: Offer, target: VastTarget | None = None) -> str:
    """`offer 123: 1x RTX 4090 24 GB, $0.420/h, reliability 99.2%, Norway, NO` (`?` = unknown)."""
    price = price_of(offer, target) if target is not None else offer.dph_total
    kind = " (interruptible bid)" if target is not None and target.interruptible else ""
    where = offer.geolocation or "unknown location"
    days = (
        f", contract up to {offer.duration / 86400:.1f} days"
        if offer.duration is not None and target is not None and target.expected_hours
        else ""
    )
    return (
        f"offer {offer.id}: {_num(offer.num_gpus, 'd')}x {offer.gpu_name or '?'} "
        f"{_num(offer.gpu_ram, '.0f', 1 / 1000)} GB, ${_num(price, '.3f')}/h{kind}, "
        f"reliability {_num(offer.reliability, '.1f', 100)}%, {where}{days}"
    )


def no_offer_hint(target: VastTarget) -> str:
    f = target.offer
    lasting = f", lasting >= {target.expected_hours:g} h" if target.expected_hours else ""
    return (
        f"no offer matched: {f.num_gpus}x {'/'.join(f.gpu_names) or 'any GPU'} >= {f.min_gpu_ram_gb:g} GB, "
        f"<= ${f.max_dph:g}/h, reliability >= {f.min_reliability:g}, disk >= "
        f"{max(f.min_disk_gb, target.disk_gb):g} GB{lasting}; loosen [targets.<name>.offer] in orch.toml"
    )
