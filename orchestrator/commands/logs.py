"""`orch logs RUN [-f] [-n N]`: the tail of a run's stdout.log, read over its target.

`-f` streams over the target's agent channel (state/watch.py's `follow`): the box pushes each
new complete line as it is written (within about 0.1 s), and says when the run's output is
complete, so the command ends when the run does. No command runs on the box per second, and a
dropped connection is picked up again from the last byte printed. An agent that cannot follow
(older than this orch) is read as before: `tail -c +N` once a second.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import posixpath
import queue
import sys
import time
from typing import Any, TextIO

from rich.markup import escape

from orchestrator.context import Context
from orchestrator.dashboard.snapshot import run_view
from orchestrator.targets.base import Target
from orchestrator.targets.factory import make_target, missing_target_hint
from state import names
from state.errors import ConfigError, RemoteCommandError, TargetError
from state.models import RunRecord
from state.store import RUN_FORMS

READ_TIMEOUT_S = 30.0
FOLLOW_WAIT_S = 0.25  # the longest sleep between looks at the channel
RECONNECT_S = (1.0, 2.0, 5.0, 10.0)  # backoff while the box does not answer


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


class _NoFollow(Exception):
    """The target's agent cannot stream a log (an agent older than `follow`)."""


def stream(target: Target, rec: RunRecord, lines: int, out: TextIO) -> int:
    """Follow the run's stdout.log over the agent channel until the box says it is complete;
    reconnects (from the last byte printed) while the box is unreachable. Raises _NoFollow
    for an agent that cannot do it, before anything is printed."""
    offset: int | None = None  # None: start `lines` lines before the end
    failures = 0
    note = False
    last = "\n"  # the last character printed
    while True:
        pushed: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        try:
            agent = target.agent()
            agent.on_push = pushed.put
            follow: dict[str, Any] = {"run_dir": rec.run_dir, "lines": max(0, lines)}
            if offset is not None:
                follow["offset"] = offset
            answer = agent.request(
                {
                    "op": "watch",
                    # A Slurm job's pid is on a compute node: its end is its exit_code only.
                    "runs": []
                    if rec.job_id
                    else [{"run_dir": rec.run_dir, "session": rec.session}],
                    "gpus": False,
                    "follow": [follow],
                    "heartbeat_s": 5.0,
                    "session_check_s": 30.0,
                },
                timeout=READ_TIMEOUT_S,
            )
        except (TargetError, OSError) as exc:  # UnreachableError is a TargetError
            if offset is None and failures >= len(RECONNECT_S):
                raise
            wait = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
            failures += 1
            if not note:
                print(f"orch logs: {rec.target} does not answer ({exc}); retrying", file=sys.stderr)
                note = True
            time.sleep(wait)
            continue
        if answer.get("ok") is False or "chan" not in answer:
            agent.on_push = None
            if offset is None and "unknown op" in str(answer.get("error", "")):
                raise _NoFollow(str(answer.get("error")))
            raise TargetError(f"target {rec.target}: cannot follow the log: {answer.get('error')}")
        failures, note = 0, False
        chan = answer["chan"]
        try:
            while True:
                alive = agent.drain(FOLLOW_WAIT_S)
                while True:
                    try:
                        line = pushed.get_nowait()
                    except queue.Empty:
                        break
                    chunk = line.get("log")
                    if line.get("chan") != chan or not isinstance(chunk, dict):
                        continue
                    if chunk.get("run_dir") != rec.run_dir:
                        continue
                    at = int(chunk.get("offset") or 0)
                    text = str(chunk.get("text") or "")
                    if offset is not None and at < offset:
                        continue  # a chunk of an earlier subscription already printed
                    if text:
                        out.write(text)
                        last = text[-1]
                    offset = int(chunk.get("next") or at + len(text.encode("utf-8")))
                    if chunk.get("eof"):
                        if last != "\n":
                            out.write("\n")  # the last line may lack a newline
                        out.flush()
                        return 0
                out.flush()
                if not alive:
                    break  # the channel dropped: subscribe again from `offset`
        finally:
            agent.on_push = None


def follow_polling(
    target: Target, rec: RunRecord, offset: int, interval: float, out: TextIO
) -> int:
    """`-f` for an agent that cannot stream: `tail -c +N` once per `interval`."""
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
        time.sleep(interval)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    rec = ctx.store.resolve_run(args.run)
    if rec.target not in ctx.config.targets:
        return recorded(ctx, rec, args.lines)
    target = make_target(ctx, rec.target)
    out = sys.stdout
    try:
        if args.follow:
            try:
                return stream(target, rec, args.lines, out)
            except _NoFollow:
                pass  # an old agent on the box: read it the old way
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
        return follow_polling(target, rec, offset, args.interval, out)
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            target.close()
