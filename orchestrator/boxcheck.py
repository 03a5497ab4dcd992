"""What a box really has, in one round trip: the runtime contract of its Python env (Python,
torch, transformers, CUDA), its GPUs, free disk and memory. `orch plan` uses it.

    facts = probe_box(target, python)            # BoxFacts (one remote command)
    rows = contract_checks(facts, bootstrapped)  # jobs.plan.Check rows: versions against the contract

The probe is a fixed program (never user text) run with `python -c`, the workdir as argv[1];
the command is a list, quoted by the target (`orchestrator.sshcmd`). Versions come from
package metadata; torch is imported only to ask CUDA (a broken torch is reported, not fatal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jobs.plan import Check
from orchestrator.targets.base import Target
from state import runtime_contract
from state.errors import LaunchError

PROBE_TIMEOUT_S = 120.0  # importing torch on a cold box can take a while

_PROBE = r"""
import json, os, shutil, sys
from importlib import metadata
out = {"python": "%d.%d.%d" % tuple(sys.version_info[:3]), "executable": sys.executable,
       "gpus": [], "cuda": None, "disk_free": None, "mem_available": None}
for name in ("torch", "transformers", "tokenizers", "mistral-common"):
    try:
        out[name] = metadata.version(name)
    except Exception:
        out[name] = None
path = sys.argv[1]
while path and not os.path.exists(path):
    path = os.path.dirname(path)
try:
    out["disk_free"] = shutil.disk_usage(path or "/").free
except Exception:
    pass
try:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                out["mem_available"] = int(line.split()[1]) * 1024
except Exception:
    pass
if out["torch"]:
    try:
        import torch
        out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out["gpus"].append({"name": p.name, "memory": int(p.total_memory)})
    except Exception as exc:
        out["torch_error"] = ("%s: %s" % (type(exc).__name__, exc))[:200]
print(json.dumps(out))
"""


@dataclass(frozen=True)
class BoxFacts:
    python_exe: str
    python: str | None
    torch: str | None
    transformers: str | None
    tokenizers: str | None = None
    mistral_common: str | None = None
    cuda: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    disk_free: int | None = None
    mem_available: int | None = None
    torch_error: str | None = None

    @property
    def gpu_name(self) -> str | None:
        return str(self.gpus[0].get("name")) if self.gpus else None

    @property
    def gpu_memory(self) -> int | None:
        return int(self.gpus[0]["memory"]) if self.gpus and self.gpus[0].get("memory") else None


def parse_probe(stdout: str, python: str) -> BoxFacts:
    """The probe's JSON line (the last line of stdout) as BoxFacts; LaunchError otherwise."""
    try:
        raw = json.loads(stdout.strip().splitlines()[-1])
        if not isinstance(raw, dict):
            raise ValueError("not an object")
    except (ValueError, IndexError) as exc:
        raise LaunchError(f"unexpected answer from the box's {python}: {stdout[-200:]!r}") from exc

    def s(key: str) -> str | None:
        v = raw.get(key)
        return str(v) if v is not None else None

    def n(key: str) -> int | None:
        v = raw.get(key)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    gpus = [g for g in raw.get("gpus") or [] if isinstance(g, dict)]
    return BoxFacts(
        python_exe=str(raw.get("executable") or python),
        python=s("python"),
        torch=s("torch"),
        transformers=s("transformers"),
        tokenizers=s("tokenizers"),
        mistral_common=s("mistral-common"),
        cuda=s("cuda"),
        gpus=gpus,
        disk_free=n("disk_free"),
        mem_available=n("mem_available"),
        torch_error=s("torch_error"),
    )


def probe_box(target: Target, python: str) -> BoxFacts:
    """Run the probe with `python` on `target` (one round trip)."""
    res = target.run([python, "-c", _PROBE, target.workdir], timeout=PROBE_TIMEOUT_S)
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LaunchError(
            f"target {target.name!r}: {python} did not run the probe ({why[0]})",
            hint=f'check the box, or set python = "..." in [targets.{target.name}]',
        )
    return parse_probe(res.stdout, python)


def contract_checks(facts: BoxFacts, *, bootstrapped: bool, needs_cuda: bool) -> list[Check]:
    """The runtime contract on the box, one row per item. Before the bootstrap has run, a
    missing transformers (or torch: the venv gets the pinned one) is not a failure."""
    rows: list[Check] = []
    py = runtime_contract.python_problem(facts.python)
    rows.append(
        Check(
            "box", "python", f">= {'.'.join(map(str, runtime_contract.MIN_PYTHON))}",
            f"{facts.python} ({facts.python_exe})", py is None, py or "",
        )
    )  # fmt: skip
    tp = runtime_contract.torch_problem(facts.torch, required=bootstrapped)
    have_torch = facts.torch or ("none (the bootstrap installs it)" if not bootstrapped else "none")
    rows.append(
        Check("box", "torch", f">= {'.'.join(map(str, runtime_contract.MIN_TORCH))}",
              have_torch, tp is None, tp or "")
    )  # fmt: skip
    xp = runtime_contract.transformers_problem(facts.transformers, required=bootstrapped)
    have_tf = facts.transformers or (
        "none yet (the bootstrap installs it)" if not bootstrapped else "none"
    )
    rows.append(
        Check("box", "transformers", f">= {'.'.join(map(str, runtime_contract.MIN_TRANSFORMERS))}",
              have_tf, xp is None, xp or "")
    )  # fmt: skip
    if needs_cuda:
        ok = bool(facts.gpus)
        have = (
            f"CUDA {facts.cuda}, {len(facts.gpus)} GPU(s)"
            if facts.gpus
            else (
                facts.torch_error or f"no GPU visible to torch (CUDA build {facts.cuda or 'none'})"
            )
        )
        rows.append(
            Check("box", "CUDA", "a GPU torch can use", have, ok,
                  "" if ok else "check the driver (nvidia-smi) and that the image's torch is a CUDA build")
        )  # fmt: skip
    return rows
