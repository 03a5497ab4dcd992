"""The poll agent: a long-lived process on the box answering one JSON line per request.

    python -m state.agent --workdir /root/orch-work

The controller keeps one ssh channel open to it, so a poll costs one line each way (about 1 ms on
loopback) instead of a new ssh channel and a new remote process (about 170 ms). Requests:

    {"op": "ping"}                        -> {"ok": true, "pong": <monotonic>}
    {"op": "observe", "runs": [...]}      -> a TargetObservation as JSON
    {"op": "exit"}                        -> ends the agent

Every answer is exactly one line. A bad request gets {"ok": false, "error": "..."}; the agent
never dies on bad input, and exits when stdin closes (the channel dropped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pydantic import ValidationError

from state.observe import ObserveRequest, observe


def handle(workdir: str, line: str) -> tuple[str, bool]:
    """Answer one request line; returns (answer line, keep_running)."""
    try:
        req = json.loads(line)
        op = req.get("op") if isinstance(req, dict) else None
    except ValueError as exc:
        return json.dumps({"ok": False, "error": f"bad request: {exc}"}), True
    if op == "ping":
        return json.dumps({"ok": True, "pong": time.monotonic()}), True
    if op == "exit":
        return json.dumps({"ok": True}), False
    if op == "observe":
        try:
            obs = observe(workdir, ObserveRequest.model_validate(req))
        except ValidationError as exc:
            return json.dumps({"ok": False, "error": f"bad observe request: {exc}"}), True
        except Exception as exc:  # the agent must survive anything a run dir holds
            return json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), True
        return obs.model_dump_json(), True
    return json.dumps({"ok": False, "error": f"unknown op {op!r}"}), True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m state.agent", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="the target's workdir (runs/ lives under it)")
    args = ap.parse_args(argv)
    out = sys.stdout
    out.write(json.dumps({"ok": True, "ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        answer, keep = handle(args.workdir, line)
        out.write(answer + "\n")
        out.flush()
        if not keep:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
