"""`orch logs RUN [-f] [-n N]`: the tail of a run's stdout.log, read over its target."""

from __future__ import annotations

import argparse
import collections
import contextlib
import posixpath
import sys
import time
from typing import Any

from rich.markup import escape

from orchestrator.context import Context
from orchestrator.dashboard.snapshot import run_view
from orchestrator.targets.base import Target
from state import names
from state.errors import ConfigError, RemoteCommandError
from state.models import RunRecord
from state.store import RUN_FORMS

READ_TIMEOUT_S = 30.0


def register(sub: Any) -> None:
    p = sub.add_parser("logs", help="show a run's output (stdout.log)")
    p.add_argument(
        "run",
        metavar="RUN",
        nargs="?",
        default="latest",
        help=f"{RUN_FORMS} (default: latest)",
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing until the run ends (Ctrl-C stops)",
    )
    p.add_argument(
        "-n", "--lines", type=int, default=50, help="lines from the end to show first (default 50)"
    )
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=handle)


def _path(target: Target, rec: RunRecord, name: str) -> str:
    return posixpath.join(target.workdir, rec.run_dir, name)


def tail(target: Target, rec: RunRecord, lines: int) -> tuple[str, int]:
    """(last `lines` lines, file size in bytes at that moment) of the run's stdout.log."""
    log = _path(target, rec, names.STDOUT)
    size = _size(target, log)
    if size is None:
        return "", 0
    res = target.run(["tail", "-n", str(max(0, lines)), log], timeout=READ_TIMEOUT_S)
    return res.stdout, size


def _size(target: Target, path: str) -> int | None:
    res = target.run(["wc", "-c", path], timeout=READ_TIMEOUT_S)
    if res.returncode != 0:
        return None
    try:
        return int(res.stdout.split()[0])
    except (ValueError, IndexError):
        return None


def read_from(target: Target, rec: RunRecord, offset: int) -> tuple[str, int]:
    """New complete lines of stdout.log from byte `offset`: (text, new offset).

    Only whole lines are consumed, so a line still being written, or a multi-byte character cut
    at the end, is read complete on the next call.
    """
    res = target.run(
        ["tail", "-c", f"+{offset + 1}", _path(target, rec, names.STDOUT)], timeout=READ_TIMEOUT_S
    )
    if res.returncode != 0 or not res.stdout:
        return "", offset
    text = res.stdout
    cut = text.rfind("\n")
    if cut < 0:
        return "", offset
    chunk = text[: cut + 1]
    return chunk, offset + len(chunk.encode("utf-8"))


def ended(target: Target, rec: RunRecord) -> bool:
    """The wrapper wrote exit_code: the run's output is complete."""
    res = target.run(["test", "-e", _path(target, rec, names.EXIT_CODE)], timeout=READ_TIMEOUT_S)
    return res.returncode == 0


def recorded(ctx: Context, rec: RunRecord, lines: int) -> int:
    """What orch knows of a run whose target left orch.toml, connecting nowhere: its phase,
    exit code and reason from the store, and the end of its output if a pull left a copy under
    runs/. ConfigError (non-zero) only when there is nothing to show."""
    from orchestrator.targets.factory import missing_target_hint

    local = ctx.runs_dir / rec.stage_dir / rec.run_id / names.STDOUT
    try:
        with open(local, encoding="utf-8", errors="replace") as f:
            text = "".join(collections.deque(f, maxlen=max(0, lines)))
    except OSError:
        text = None
    message = "" if rec.phase.is_terminal else run_view(rec).message
    if text is None and not rec.reason and not message:
        raise ConfigError(
            f"run {rec.key} ran on target {rec.target!r}, which is no longer in orch.toml, "
            f"and no copy of its {names.STDOUT} is under runs/",
            hint=missing_target_hint(rec.target, "read its output from the box"),
        )
    ctx.err.print(
        f"[yellow]note:[/] target {escape(repr(rec.target))} is no longer in orch.toml; "
        "showing what orch recorded of this run",
        soft_wrap=True,
    )
    out = sys.stdout
    head = f"{rec.key}: {rec.phase.value}"
    if rec.exit_code is not None:
        head += f" (exit {rec.exit_code})"
    out.write(" · ".join(x for x in (head, rec.reason, message) if x) + "\n")
    if text is None:
        out.write(f"(no copy of {names.STDOUT} under {local.parent})\n")
    else:
        out.write(f"--- {local} (pulled copy) ---\n{text}")
        if text and not text.endswith("\n"):
            out.write("\n")
    out.flush()
    return 0


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from orchestrator.targets.factory import make_target

    rec = ctx.store.resolve_run(args.run)
    if rec.target not in ctx.config.targets:
        return recorded(ctx, rec, args.lines)
    target = make_target(ctx, rec.target)
    out = sys.stdout
    try:
        text, offset = tail(target, rec, args.lines)
        if not args.follow and not text and _size(target, _path(target, rec, names.STDOUT)) is None:
            raise RemoteCommandError(
                f"{rec.key} has no {names.STDOUT} on {rec.target!r} yet",
                returncode=1, hint="the run may not have started; see `orch status`",
            )  # fmt: skip
        out.write(text)
        out.flush()
        if not args.follow:
            return 0
        while True:
            done = ended(target, rec)
            text, offset = read_from(target, rec, offset)
            if text:
                out.write(text)
                out.flush()
            if done:
                # The last line may lack a newline: print whatever is left.
                res = target.run(
                    ["tail", "-c", f"+{offset + 1}", _path(target, rec, names.STDOUT)],
                    timeout=READ_TIMEOUT_S,
                )
                if res.returncode == 0 and res.stdout:
                    out.write(res.stdout + ("" if res.stdout.endswith("\n") else "\n"))
                out.flush()
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            target.close()
