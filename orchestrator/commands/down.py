"""`orch down [TARGET] [--force] [--pull]`: destroy the Vast instance of a vast target.
`orch down [TARGET] --orphans [--yes]`: destroy the instances labelled as orch's that orch has
no record of (see `orch instances`), after a confirmation."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from orchestrator.context import Context
from state.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("down", help="destroy the Vast.ai instance of a vast target")
    p.add_argument("target", nargs="?", help="a vast target of orch.toml (default: default_target)")
    p.add_argument(
        "--force",
        action="store_true",
        help="destroy even while runs are active (they are marked cancelled)",
    )
    p.add_argument("--pull", action="store_true", help="pull every finished, unpulled run first")
    p.add_argument(
        "--orphans",
        action="store_true",
        help="destroy instances labelled as orch's that orch has no record of (all vast "
        "targets unless TARGET is given)",
    )
    p.add_argument("--yes", action="store_true", help="with --orphans: do not ask to confirm")
    p.set_defaults(func=handle)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError(
            "orch down --orphans needs a confirmation", hint="pass --yes to destroy them"
        )
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: pulls in httpx
    from orchestrator.vast.teardown import down, down_orphans

    if args.orphans:
        if args.force or args.pull:
            raise ConfigError("--orphans cannot be combined with --force or --pull")
        down_orphans(ctx, args.target, yes=args.yes, confirm=_confirm)
        return 0
    if args.yes:
        raise ConfigError("--yes only goes with --orphans")
    down(ctx, args.target, force=args.force, pull=args.pull)
    return 0
