"""`orch stop RUN`: end a run's tmux session and record it cancelled."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.context import Context
from orchestrator.launch import stop_run
from orchestrator.targets.factory import require_run_target
from state.store import RUN_FORMS


def register(sub: Any) -> None:
    p = sub.add_parser("stop", help="stop a run (kill its tmux session, record cancelled)")
    p.add_argument("run", metavar="RUN", help=RUN_FORMS)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    rec = ctx.store.resolve_run(args.run)
    if rec.phase.is_terminal:
        ctx.console.print(f"{rec.key} already ended: {rec.phase.value}")
        return 0
    require_run_target(ctx, rec, "stop")
    final = stop_run(ctx, rec)
    code = f" (exit code {final.exit_code})" if final.exit_code is not None else ""
    ctx.console.print(f"{final.key}: cancelled{code}")
    return 0
