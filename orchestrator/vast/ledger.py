"""Every Vast create, in the store before it is sent: no rented box without a record.

A create is given a unique label (`<label_prefix>-<target>-<8 hex>`) and a `vast_creates` row
(migration 4 of `state/store.py`) is written before `PUT /api/v0/asks/{id}/` goes out. When the
answer names the instance, the instance is recorded and the row resolved. When the answer is
lost (a timeout after the request reached Vast, a dropped connection, a 5xx, Ctrl-C, a crash),
the row stays open, and `reconcile.py` looks the label up (`select_filters` on
`/api/v1/instances/`) to adopt or destroy what it made.

Why a label: Vast's create may take long ("for slow operations like instance creation", the
official client allows 120 s, `vastai/api/client.py`) and the official client resends after a
timeout (`_RETRYABLE_EXC`), which can rent twice; the label is what makes a lost answer
recoverable and a duplicate visible.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from state.store import Store, now_iso, parse_time

if TYPE_CHECKING:
    from orchestrator.config import VastTarget

_TOKEN = re.compile(r"^[0-9a-f]{8}$")


@dataclass(frozen=True)
class PendingCreate:
    label: str
    target: str
    api_url: str
    offer_id: int | None
    requested_at: datetime | None


def new_label(cfg: VastTarget, target: str) -> str:
    """A label no other create of this account has: `<prefix>-<target>-<8 hex>`."""
    return f"{cfg.label_prefix}-{target}-{secrets.token_hex(4)}"


def label_owner(label: str | None, targets: Iterable[tuple[str, VastTarget]]) -> str | None:
    """The vast target whose creates are labelled like `label` (orch's own labels, including the
    older `<prefix>-<target>` ones), or None for an instance orch did not make."""
    if not label:
        return None
    for name, cfg in targets:
        head = f"{cfg.label_prefix}-{name}"
        if label == head:
            return name
        if label.startswith(head + "-") and _TOKEN.match(label[len(head) + 1 :]):
            return name
    return None


def record_request(store: Store, label: str, target: str, api_url: str, offer_id: int) -> None:
    """Write the create down before it is sent."""
    with store.tx() as db:
        db.execute(
            "INSERT INTO vast_creates (label, target, api_url, offer_id, requested_at) "
            "VALUES (?,?,?,?,?)",
            (label, target, api_url, int(offer_id), now_iso()),
        )


def resolve(store: Store, label: str, outcome: str, instance_id: int | str | None = None) -> None:
    """Close a create: `created`, `adopted`, `destroyed`, `refused`, `never_made`."""
    with store.tx() as db:
        db.execute(
            "UPDATE vast_creates SET outcome = ?, instance_id = ?, resolved_at = ? WHERE label = ?",
            (outcome, None if instance_id is None else str(instance_id), now_iso(), label),
        )


def pending(
    store: Store, *, target: str | None = None, api_url: str | None = None
) -> list[PendingCreate]:
    """Creates whose outcome is not known yet, oldest first."""
    sql = "SELECT * FROM vast_creates WHERE resolved_at IS NULL"
    args: list[str] = []
    if target is not None:
        sql += " AND target = ?"
        args.append(target)
    if api_url is not None:
        sql += " AND api_url = ?"
        args.append(api_url)
    rows = store.query(sql + " ORDER BY requested_at", tuple(args))
    return [
        PendingCreate(
            label=str(r["label"]),
            target=str(r["target"]),
            api_url=str(r["api_url"]),
            offer_id=r["offer_id"],
            requested_at=parse_time(r["requested_at"]),
        )
        for r in rows
    ]
