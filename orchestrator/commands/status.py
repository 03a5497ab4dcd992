"""`orch status`: a one-shot view of the runs (the dashboard's table), or JSON for scripts.

It refreshes the active runs first (one poll per target) when no `orch watch` keeps the store
fresh, so a run launched without a watcher is still seen as it is; `--no-refresh` reads the
store only (instant), `--refresh` polls even when a watcher runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from orchestrator.context import Context
from orchestrator.dashboard.inprocess import monitor_label, refresh_now
from orchestrator.dashboard.render import runs_table, targets_table
from orchestrator.dashboard.snapshot import gather, run_json, utcnow

#: Finished runs older than this are left out unless `--all`.
STATUS_KEEP_S = 24 * 3600.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status",
        help="phase, step, heartbeat age and exit code of every recent run",
        description="Show the runs: active ones, and finished ones from the last 24 h (--all: every run).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--all", action="store_true", help="include runs that finished more than 24 h ago"
    )
    fresh = p.add_mutually_exclusive_group()
    fresh.add_argument(
        "--refresh",
        dest="refresh",
        action="store_true",
        default=None,
        help="poll the targets first even if `orch watch` is running",
    )
    fresh.add_argument(
        "--no-refresh",
        dest="refresh",
        action="store_false",
        help="read the store only (instant)",
    )
    p.set_defaults(func=handle)


def should_refresh(ctx: Context, flag: bool | None) -> bool:
    """`--refresh`/`--no-refresh` decide; by default refresh unless a watcher keeps it fresh."""
    if flag is not None:
        return flag
    return monitor_label(ctx) != "orch watch"


def handle(args: argparse.Namespace, ctx: Context) -> int:
    ctx.config  # noqa: B018 - a bad orch.toml fails here, before anything is polled
    if should_refresh(ctx, args.refresh):
        refresh_now(ctx, ctx.err)
    now = utcnow()
    snap = gather(
        ctx.store,
        ctx.config,
        include_all=args.all,
        keep_terminal_s=STATUS_KEEP_S,
        alerts_limit=0,
        monitor=monitor_label(ctx) or "off",
        now=now,
    )
    if args.json:
        doc = {
            "taken_at": now.isoformat(),
            "runs": [run_json(r, now) for r in snap.runs],
            "hidden_runs": snap.hidden_runs,
            "targets": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "reachable": t.reachable,
                    "unreachable_since": t.unreachable_since.isoformat()
                    if t.unreachable_since
                    else None,
                    "active_runs": t.active_runs,
                    "disk_free_bytes": t.disk_free_bytes,
                }
                for t in snap.targets
            ],
        }
        return _emit(lambda: print(json.dumps(doc, indent=2), flush=True))
    width = ctx.console.width

    def table() -> None:
        ctx.console.print(runs_table(snap, width, now, wrap_notes=True))
        if any(t.instance is not None or t.reachable is False for t in snap.targets):
            ctx.console.print()
            ctx.console.print(targets_table(snap, width, now))
        sys.stdout.flush()

    return _emit(table)


def _emit(write: Callable[[], None]) -> int:
    """Write to stdout; a reader that went away (`orch status --json | head`) is not an error."""
    try:
        write()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is quiet too
    return 0
