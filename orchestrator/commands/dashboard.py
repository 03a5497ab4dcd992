"""`orch dashboard`: the live full-screen view of runs, targets and alerts."""

from __future__ import annotations

import argparse
import sys

from orchestrator.context import Context
from orchestrator.dashboard.snapshot import KEEP_TERMINAL_S
from state.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dashboard",
        help="live view of runs, targets and alerts (q quit, r refresh, p pull, l log)",
        description=(
            "A full-screen live view of the store. Runs the monitor in-process when no "
            "`orch watch` is running. Piped or in CI it prints one static frame and exits."
        ),
    )
    p.add_argument("--fps", type=float, default=1.0, help="redraws per second (default 1)")
    p.add_argument("--all", action="store_true", help="show every run, not only recent ones")
    p.add_argument(
        "--keep-hours",
        type=float,
        default=KEEP_TERMINAL_S / 3600,
        help="how long finished runs stay on screen (default %(default)s h)",
    )
    p.add_argument(
        "--no-monitor",
        action="store_true",
        help="only read the store; never poll targets from this process",
    )
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: every command loads this file; orchestrator.dashboard.app only here
    from orchestrator.dashboard.app import Dashboard

    if not args.fps > 0:
        raise ConfigError(f"--fps must be above 0, got {args.fps}")
    if args.keep_hours < 0:
        raise ConfigError(f"--keep-hours must be 0 or more, got {args.keep_hours}")
    ctx.config  # noqa: B018 - a bad orch.toml is one error line before the screen is taken
    app = Dashboard(
        ctx,
        fps=args.fps,
        include_all=args.all,
        keep_terminal_s=args.keep_hours * 3600,
        run_monitor=not args.no_monitor,
    )
    if not ctx.console.is_terminal or not sys.stdout.isatty():
        return app.print_once()
    return app.run()
