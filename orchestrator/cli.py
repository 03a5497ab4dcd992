"""`orch`: the command line. Thin: parse, build a `Context`, call a command, print errors.

Commands live in `orchestrator/commands/<name>.py`; each module defines
`register(subparsers) -> None`, which adds its parser(s) with `set_defaults(func=handler)`;
a handler is `handler(args, ctx) -> int`. They are discovered, so adding a command touches no
shared file. Every `OrchError` becomes one red line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from rich.console import Console
from rich.markup import escape

import orchestrator.commands as commands_pkg
from orchestrator import __version__
from orchestrator.context import Context
from state.errors import OrchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orch",
        description="Run ML experiment stages on rented GPUs (Vast.ai), any ssh box, or this machine.",
    )
    parser.add_argument("--version", action="version", version=f"orch {__version__}")
    parser.add_argument(
        "--config", help="path to orch.toml (default: $ORCH_CONFIG, ./orch.toml, embedded default)"
    )
    parser.add_argument(
        "--state-dir", help="controller state dir (default: $ORCH_STATE_DIR or ./.orch)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for mod in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"orchestrator.commands.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    err = Console(stderr=True, highlight=False)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    ctx = Context(config_path=args.config, state_dir=args.state_dir)
    try:
        return int(args.func(args, ctx) or 0)
    except OrchError as exc:
        # The message may contain brackets (`[targets.box]`): escape it so rich prints it as is.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        return 130
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
