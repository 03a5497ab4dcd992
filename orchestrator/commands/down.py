"""`orch down [TARGET] [--force] [--pull]`: destroy the Vast instance of a vast target."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.context import Context


def register(sub: Any) -> None:
    p = sub.add_parser("down", help="destroy the Vast.ai instance of a vast target")
    p.add_argument("target", nargs="?", help="a vast target of orch.toml (default: default_target)")
    p.add_argument(
        "--force",
        action="store_true",
        help="destroy even while runs are active (they are marked cancelled)",
    )
    p.add_argument("--pull", action="store_true", help="pull every finished, unpulled run first")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from orchestrator.vast.provision import down

    down(ctx, args.target, force=args.force, pull=args.pull)
    return 0
