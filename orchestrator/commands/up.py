"""`orch up [TARGET] [--keep] [--no-bootstrap] [--hours H]`: rent a Vast box for a vast target
and make it ready (see orchestrator/vast/provision.py)."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.context import Context
from state.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="rent a Vast.ai instance for a vast target and set it up")
    p.add_argument("target", nargs="?", help="a vast target of orch.toml (default: default_target)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the instance if anything fails or on Ctrl-C (default: destroy it)",
    )
    p.add_argument("--no-bootstrap", action="store_true", help="skip setting up the Python env")
    p.add_argument(
        "--hours",
        type=float,
        default=None,
        help="how long you will use the box: offers must last that long and the account's "
        "credit must cover it (default: expected_hours, else one hour of credit)",
    )
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    # lazy, for start-up time: pulls in httpx
    from orchestrator.vast.provision import up

    if args.hours is not None and args.hours <= 0:
        raise ConfigError(f"--hours must be positive, not {args.hours:g}")
    up(ctx, args.target, keep=args.keep, bootstrap=not args.no_bootstrap, hours=args.hours)
    return 0
