"""`orch watch`: watch every active run in the foreground, alert on every state change.

orch watch                 poll until Ctrl-C (one agent round trip per target every ~5 s)
orch watch --once          one poll of everything; exit 1 if any run is in a bad state
orch watch --target box    only the runs on `box` (repeatable)
orch watch --until-idle    return when no run is left active (exit 1 if one ended badly)
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.context import Context


def register(sub: Any) -> None:
    p = sub.add_parser(
        "watch",
        help="watch active runs: detect crashes/hangs/timeouts within seconds, alert, pull results",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="poll once and exit; exit code 1 if any run is failed/crashed/hung/timed out/lost/unreachable",
    )
    p.add_argument(
        "--target",
        action="append",
        metavar="T",
        dest="targets",
        help="only watch runs on target T (repeatable)",
    )
    p.add_argument(
        "--until-idle",
        action="store_true",
        help="exit when no run is left active and every alert is sent",
    )
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: pulls in apscheduler
    from orchestrator.monitor.watch import watch

    return watch(ctx, once=args.once, targets=args.targets, stop_when_idle=args.until_idle)
