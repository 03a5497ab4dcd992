"""`python -m worker ...`: the entry point the launcher's tmux wrapper runs on the box.

    python -m worker run   --run-dir DIR                 # DIR/spec.json says what to run
    python -m worker train --run-dir DIR --args-json '{"data": {...}, "max_steps": 50}'
    python -m worker eval  --run-dir DIR --args-file eval.json --set mask=prefix
    python -m worker probe --run-dir DIR --args-json '{...}'
    python -m worker exec  --run-dir DIR -- python my_script.py --flag

Every form goes through `worker.lifecycle.execute`, which writes status.json, events.jsonl,
the result, manifest.json and `.run_complete` (or `.run_failed`) and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from state.errors import WorkerError
from state.phases import WorkerExit
from state.worker_config import ARGS_BY_COMMAND

DESCRIPTIONS = {
    "eval": "multiple-choice log-likelihood evaluation (acc, acc_norm) -> metrics.json",
    "train": "completion-only SFT with a mask mode, checkpoints, resume, leakage guard -> summary.json",
    "probe": "leakage probe: loss under a mask vs causal loss, and the counterfactual (do predictions change when later tokens are replaced?) -> metrics.json",
}


def _fields_help(model: type[BaseModel]) -> str:
    """One line per field of an args model: the subcommand's --help lists every option."""
    lines = ["args (JSON keys; nested with --set a.b=v):"]
    for name, f in model.model_fields.items():
        ann = _type_name(f.annotation)
        value = None if f.is_required() else f.get_default(call_default_factory=True)
        value = value.value if isinstance(value, Enum) else value
        default = "required" if f.is_required() else f"default {value!r}"
        desc = f" - {f.description}" if f.description else ""
        lines.append(f"  {name}: {ann} ({default}){desc}")
    return "\n".join(lines)


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Literal:
        return "|".join(str(a) for a in get_args(ann))
    name = getattr(ann, "__name__", None)
    return name if name and get_origin(ann) is None else str(ann).replace("typing.", "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker",
        description="orch worker: runs one stage (eval, train, probe, exec) in a run directory "
        "and reports through status.json / events.jsonl / markers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: " + ", ".join(f"{e.value}={e.name}" for e in WorkerExit),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the task of DIR/spec.json (what orch launches)",
        description="Read DIR/spec.json (a RunSpec), validate spec.task.args for spec.task.command "
        "and run it.",
    )
    run.add_argument(
        "--run-dir", required=True, type=Path, help="the run directory holding spec.json"
    )

    for command, desc in DESCRIPTIONS.items():
        sp = sub.add_parser(
            command,
            help=desc,
            description=desc,
            epilog=_fields_help(ARGS_BY_COMMAND[command]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(sp)
        src = sp.add_mutually_exclusive_group()
        src.add_argument("--args-json", help="the args as a JSON object")
        src.add_argument("--args-file", type=Path, help="a file holding the args as a JSON object")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one arg (VALUE parsed as JSON, else a string); repeatable",
        )

    ex = sub.add_parser(
        "exec",
        help="run an arbitrary command as a stage (status heartbeat + markers around it)",
        description="Run ARGV as a child process; its output goes to stdout, its last line to "
        "status.json; exit 0 -> manifest + .run_complete, else .run_failed. The child sees "
        "ORCH_RUN_DIR and ORCH_RUN_ID.",
    )
    _common(ex)
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    return p


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--run-dir", required=True, type=Path, help="the run directory (created if missing)"
    )
    sp.add_argument("--run-id", default=None, help="run id (default: the run dir's name)")
    sp.add_argument(
        "--stage", default=None, help="stage name (default: the run dir's parent's name)"
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["a.b=1", "mask=prefix"]` -> `{"a": {"b": 1}, "mask": "prefix"}`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise WorkerError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def direct_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The args of a direct `eval|train|probe` call: JSON/file, then --set overrides."""
    raw: Any = {}
    try:
        if ns.args_json is not None:
            raw = json.loads(ns.args_json)
        elif ns.args_file is not None:
            raw = json.loads(Path(ns.args_file).read_text())
    except (OSError, ValueError) as exc:
        raise WorkerError(f"cannot read the args: {exc}", hint="pass a JSON object") from exc
    if not isinstance(raw, dict):
        raise WorkerError("the args must be a JSON object")
    return _merge(raw, parse_overrides(ns.set))


def main(argv: list[str] | None = None) -> int:
    from worker import lifecycle  # after argparse: --help stays instant

    ns = build_parser().parse_args(argv)
    run_dir: Path = ns.run_dir
    if ns.command == "run":
        try:
            spec = lifecycle.load_spec(run_dir)
        except WorkerError as exc:
            # No usable spec: still leave a reason where the controller looks.
            return lifecycle.execute(run_dir, "_spec", {}, error=exc)
        return lifecycle.execute(run_dir, spec.task.command, spec.task.args, spec=spec)
    if ns.command == "exec":
        argv_ = list(ns.argv)
        if argv_[:1] == ["--"]:
            argv_ = argv_[1:]
        return lifecycle.execute(run_dir, "exec", {"argv": argv_}, run_id=ns.run_id, stage=ns.stage)
    try:
        raw = direct_args(ns)
    except WorkerError as exc:
        return lifecycle.execute(
            run_dir, ns.command, {}, run_id=ns.run_id, stage=ns.stage, error=exc
        )
    return lifecycle.execute(run_dir, ns.command, raw, run_id=ns.run_id, stage=ns.stage)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
