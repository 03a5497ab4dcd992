"""Bootstrap a target's Python environment for the worker, idempotently.

    python = ensure_env(ctx, target)

Before anything is installed (and before any stage starts) the interpreter's Python and torch
are checked against the runtime contract (`state.runtime_contract`): an image whose Python is
older than 3.11 or whose torch is older than 2.6 is refused with one line naming an image that
works, rather than installed around (transformers 5 would silently disable such a torch).

Order of preference:
1. the target names a ready interpreter (`python = "..."` in orch.toml): used as is, no install
   (its versions are still checked);
2. the `local` target whose own interpreter (`sys.executable`) can import the worker's deps
   (the README's venv can): used as is, so a newcomer never waits for a second install;
3. otherwise a venv at `<workdir>/venv` created with `--system-site-packages`, so the CUDA torch
   of a GPU image is reused and never replaced by a CPU wheel: when the base interpreter has
   torch, the worker extra is installed with torch left out and pinned (a pip constraint) to the
   version already there. The lock hash (the dependency lists of pyproject.toml + the target's
   Python version) is stored in `<workdir>/venv/.orch-lock`; an unchanged hash skips everything
   but one probe round trip.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.context import Context
from orchestrator.progress import QUIET, Steps
from orchestrator.targets.base import Target
from state import runtime_contract
from state.errors import ConfigError, LaunchError, RemoteCommandError, RuntimeContractError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VENV_DIR = "venv"
LOCK_FILE = ".orch-lock"
CONSTRAINTS_FILE = "orch-constraints.txt"
BASE_PYTHON = "python3"
PROBE_TIMEOUT_S = 60.0
VENV_TIMEOUT_S = 300.0
PIP_TIMEOUT_S = 3600.0

#: Modules the worker imports; the local interpreter is used as is when all are importable.
WORKER_MODULES = ("pydantic", "torch", "transformers", "datasets", "tokenizers", "safetensors")

# Runs on the target with its base interpreter: what bootstrap must know, in one round trip.
# A fixed program (never user text); the venv dir comes as argv[1].
_PROBE = r"""
import json, os, sys
venv = sys.argv[1]
out = {"executable": sys.executable, "version": "%d.%d.%d" % tuple(sys.version_info[:3]),
       "torch": None, "lock": None, "venv_python": os.path.exists(os.path.join(venv, "bin", "python"))}
try:
    from importlib import metadata
    out["torch"] = metadata.version("torch")
except Exception:
    pass
try:
    with open(os.path.join(venv, ".orch-lock")) as f:
        out["lock"] = json.load(f)
except Exception:
    pass
print(json.dumps(out))
"""

_REQ_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class Probe:
    executable: str
    version: str
    torch: str | None
    lock: dict[str, Any] | None
    venv_python: bool


def requirement_name(req: str) -> str:
    """The normalised project name of a requirement string (`Torch>=2` -> `torch`)."""
    m = _REQ_NAME_RE.match(req)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def worker_requirements(pyproject: Path) -> list[str]:
    """The base dependencies plus the `worker` extra of a pyproject.toml, in file order."""
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{pyproject} not found: cannot bootstrap the worker environment",
            hint='run orch from the project root, or set python = "..." on the target',
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{pyproject}: not valid TOML: {exc}") from exc
    project = data.get("project", {})
    reqs = list(project.get("dependencies", []))
    reqs += list(project.get("optional-dependencies", {}).get("worker", []))
    return [str(r) for r in reqs]


def lock_hash(requirements: list[str], python_version: str) -> str:
    """What decides whether the env must be (re)installed: the deps and the target's Python."""
    blob = json.dumps({"requirements": sorted(requirements), "python": python_version})
    return hashlib.sha256(blob.encode()).hexdigest()


def install_plan(requirements: list[str], torch_version: str | None) -> tuple[list[str], list[str]]:
    """(requirements to install, constraint lines). With a torch already in the base
    interpreter, torch is dropped from the list and pinned to that version, so nothing
    (transformers, accelerate) can drag in a different wheel."""
    if torch_version is None:
        return list(requirements), []
    kept = [r for r in requirements if requirement_name(r) != "torch"]
    return kept, [f"torch=={torch_version}"]


def local_interpreter_ready() -> bool:
    """True if this interpreter can import the worker's deps (found, not imported)."""
    return all(importlib.util.find_spec(m) is not None for m in WORKER_MODULES)


def _probe(target: Target, base: str, venv: str) -> Probe:
    res = target.run([base, "-c", _PROBE, venv], timeout=PROBE_TIMEOUT_S)
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LaunchError(
            f"target {target.name!r}: {base} did not run ({why[0]})",
            hint=f'install Python 3 on the box, or set python = "..." in [targets.{target.name}]',
        )
    try:
        raw = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise LaunchError(
            f"target {target.name!r}: unexpected probe output {res.stdout[-200:]!r}"
        ) from exc
    return Probe(
        executable=str(raw.get("executable", "")),
        version=str(raw.get("version", "")),
        torch=raw.get("torch"),
        lock=raw.get("lock") if isinstance(raw.get("lock"), dict) else None,
        venv_python=bool(raw.get("venv_python")),
    )


def check_contract(target: Target, probe: Probe, python: str) -> None:
    """Refuse (LaunchError, one line with the fix) an interpreter whose Python or torch is
    below the runtime contract. A missing torch is not refused here: the venv gets the worker
    extra's pinned one (and a ready interpreter may serve `exec` stages without it)."""
    problems = runtime_contract.check_versions(
        python=probe.version,
        torch=probe.torch,
        transformers=None,
        torch_required=False,
        transformers_required=False,
    )
    if problems:
        raise RuntimeContractError(
            f"target {target.name!r}: {python} cannot run the worker: {problems[0]}",
            hint="nothing was installed or started; see docs/vast.md (the image)",
        )


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "no output"


def _record(ctx: Context, target: Target, python: str, lock: str = "") -> str:
    ctx.store.upsert_target(target.name, target.kind, python=python, bootstrap_hash=lock)
    target.python = python  # type: ignore[attr-defined]  # the attribute every Target carries
    return python


def ensure_env(
    ctx: Context,
    target: Target,
    *,
    base_python: str = BASE_PYTHON,
    report: Steps | None = None,
) -> str:
    """Make sure the target can run the worker; return the interpreter to use there.

    Idempotent: a second call with unchanged dependencies costs one probe round trip.
    Raises LaunchError with the installer's last lines when venv/pip fails. `report` says
    which way it went (`bootstrap: unchanged, skipped`, `bootstrap: installing deps ...`).
    """
    say = report or QUIET
    _, cfg = ctx.config.target(target.name)
    if cfg.python:
        if target.kind != "local":
            check_contract(target, _probe(target, cfg.python, "/nonexistent"), cfg.python)
        say.note(f"bootstrap: skipped, using python = {cfg.python} (orch.toml)")
        return _record(ctx, target, cfg.python)
    if target.kind == "local" and local_interpreter_ready():
        say.note(f"bootstrap: skipped, this Python has the worker's deps ({sys.executable})")
        return _record(ctx, target, sys.executable)

    requirements = worker_requirements(ctx.project_root / "pyproject.toml")
    venv = f"{target.workdir.rstrip('/')}/{VENV_DIR}"
    venv_python = f"{venv}/bin/python"
    with say.step(f"bootstrap: checking the env on {target.name}"):
        probe = _probe(target, base_python, venv)
    check_contract(target, probe, base_python)
    digest = lock_hash(requirements, probe.version)
    if probe.venv_python and probe.lock and probe.lock.get("hash") == digest:
        say.note(f"bootstrap: unchanged (hash {digest[:12]}), skipped")
        return _record(ctx, target, venv_python, digest)

    # A venv made by another Python version cannot be upgraded in place: start it again.
    stale = bool(probe.lock) and probe.lock.get("python") != probe.version  # type: ignore[union-attr]
    if not probe.venv_python or stale:
        argv = [base_python, "-m", "venv", "--system-site-packages"]
        argv += ["--clear", venv] if stale else [venv]
        with say.step(f"bootstrap: creating the venv {venv}"):
            res = target.run(argv, timeout=VENV_TIMEOUT_S)
        if res.returncode != 0:
            raise LaunchError(
                f"target {target.name!r}: creating the venv failed: {_tail(res.stderr or res.stdout)}",
                hint="install python3-venv on the box (apt-get install python3-venv)",
            )

    to_install, constraints = install_plan(requirements, probe.torch)
    if to_install:
        pip = [venv_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        if constraints:
            cpath = f"{venv}/{CONSTRAINTS_FILE}"
            target.put_bytes("".join(c + "\n" for c in constraints).encode(), cpath)
            pip += ["-c", cpath]
        n = len(to_install)
        what = f"{n} package{'' if n == 1 else 's'}"
        what += f", torch {probe.torch} kept" if probe.torch else ""
        t0 = time.monotonic()
        try:
            with say.step(f"bootstrap: installing deps (hash {digest[:12]}, {what})") as step:
                res = target.run([*pip, *to_install], timeout=PIP_TIMEOUT_S)
                if res.returncode == 0:
                    step.done(f"bootstrap: installed deps in {time.monotonic() - t0:.0f}s")
        except RemoteCommandError as exc:  # pragma: no cover - run() is called without check
            raise LaunchError(f"target {target.name!r}: pip failed: {exc}") from exc
        if res.returncode != 0:
            raise LaunchError(
                f"target {target.name!r}: installing the worker deps failed: {_tail(res.stderr or res.stdout)}",
                hint=f"run `{shlex.join([*pip, *to_install][:6])} ...` on the box to see why",
            )
    lock = {
        "hash": digest,
        "python": probe.version,
        "torch": probe.torch,
        "requirements": requirements,
    }
    target.put_bytes(json.dumps(lock, indent=2).encode(), f"{venv}/{LOCK_FILE}")
    return _record(ctx, target, venv_python, digest)
