"""The runtime contract, checked where the worker runs: at the start of every train, eval and
probe command (`worker.lifecycle.execute`), before any model or data is touched.

    info = runtime.start_check(args, status)    # WorkerError (one line, the fix) on a problem
    runtime.note_tokenizer(tokenizer)           # `worker.modeling.load`: what was really loaded
    runtime.report()                            # -> "runtime" of summary.json / metrics.json

What is checked (the numbers live in `state.runtime_contract`, which the bootstrap and
`orch plan` read too): Python, torch and transformers versions; that this transformers has the
`ministral3` model type; CUDA when the stage's `device` is `cuda` (a CPU-only torch build or no
visible GPU is refused at once instead of failing at the first `.to("cuda")`). `device = auto`
without a GPU is allowed (it means CPU) but said in an event. The versions, the GPUs and the
tokenizer class actually loaded (its backend: `tokenizers`, sentencepiece, `mistral-common`...)
go to the run's events and into its result file under "runtime".
"""

from __future__ import annotations

import importlib.util
import platform
from typing import Any

from state.errors import WorkerError
from state.runtime_contract import DEFAULT_IMAGE, check_versions

_session: dict[str, Any] = {}


def environment() -> dict[str, Any]:
    """Versions of this interpreter, torch and transformers, and what CUDA torch sees."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": None,
        "transformers": None,
        "ministral3": False,
        "cuda_build": None,
        "cuda_available": False,
        "gpus": [],
    }
    try:
        # lazy, for start-up time: pulls in torch
        import torch
    except ImportError:
        pass
    else:
        env["torch"] = str(torch.__version__)
        env["cuda_build"] = torch.version.cuda
        env["cuda_available"] = bool(torch.cuda.is_available())
        if env["cuda_available"]:
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        # lazy, for start-up time: pulls in transformers
        import transformers
    except ImportError:
        pass
    else:
        env["transformers"] = str(transformers.__version__)
        env["ministral3"] = importlib.util.find_spec("transformers.models.ministral3") is not None
    return env


def problems(env: dict[str, Any], device: str = "auto") -> list[str]:
    """Every contract problem of `env` (as `environment()` returns it) for a stage that runs on
    `device`, one line each with its fix; empty when the worker can run."""
    found = check_versions(
        python=env.get("python"), torch=env.get("torch"), transformers=env.get("transformers")
    )
    old = any("transformers" in p for p in found)  # already said: too old or missing
    if env.get("transformers") and not old and not env.get("ministral3"):
        found.append(
            f"transformers {env['transformers']} has no ministral3 model type: reinstall the "
            "worker extra (pip install -e '.[worker]')"
        )
    if device == "cuda" and env.get("torch") and not env.get("cuda_available"):
        if env.get("cuda_build") is None:
            found.append(
                f"device 'cuda' requested but torch {env['torch']} is a CPU-only build: use an "
                f"image with a CUDA torch >= 2.6 (e.g. image = {DEFAULT_IMAGE!r}), or device = "
                "'cpu'"
            )
        else:
            found.append(
                f"device 'cuda' requested but torch {env['torch']} (CUDA {env['cuda_build']}) "
                "sees no GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES on the box (a driver "
                "older than the CUDA build also hides it), or set device = 'cpu'"
            )
    return found


def start_check(args: Any, status: Any = None) -> dict[str, Any]:
    """Check this process against the contract for a stage with `args` (its `device`); raise
    WorkerError naming every problem and its fix, else record the versions in an event and
    return them (also kept for `report`)."""
    device = str(getattr(args, "device", "auto"))
    env = environment()
    found = problems(env, device)
    if found:
        raise WorkerError(
            "runtime contract: " + "; ".join(found),
            hint="fix the environment as said, then relaunch the stage",
        )
    _session.clear()
    _session.update(env, device=device, tokenizers=[])
    if status is not None:
        cuda = ", ".join(env["gpus"]) if env["gpus"] else "no GPU"
        status.event(
            "info",
            f"runtime: python {env['python']}, torch {env['torch']}, transformers "
            f"{env['transformers']}, CUDA {env['cuda_build'] or 'none'} ({cuda})",
            runtime=dict(env),
        )
        if device == "auto" and not env["cuda_available"]:
            status.event("info", "device auto: no CUDA GPU visible, running on the CPU")
    _session["status"] = status
    return env


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Which tokenizer was loaded: its class, module (the backend) and whether it is a fast
    (Rust `tokenizers`) one."""
    cls = type(tokenizer)
    return {
        "class": cls.__name__,
        "module": cls.__module__,
        "is_fast": bool(getattr(tokenizer, "is_fast", False)),
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
    }


def note_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """Record the tokenizer a load really produced (an event, and `report()["tokenizers"]`)."""
    info = tokenizer_info(tokenizer)
    seen = _session.setdefault("tokenizers", [])
    if info not in seen:
        seen.append(info)
        status = _session.get("status")
        if status is not None:
            status.event(
                "info",
                f"tokenizer: {info['class']} ({info['module']}) from {info['name_or_path']}",
                tokenizer=info,
            )
    return info


def report() -> dict[str, Any]:
    """The versions and tokenizers of this run (empty before `start_check`)."""
    return {k: v for k, v in _session.items() if k != "status"}
