"""Training checkpoints on disk: save atomically, find the latest complete one, resume exactly.

A run's `checkpoints/` dir holds `step-N/` dirs (to resume) and, once the run is done, `final/`
(a plain `save_pretrained` dir that evaluation loads). Every checkpoint dir has

    *.safetensors, config.json, tokenizer files   the model (`save_pretrained`)
    trainer_state.pt                              optimizer, scheduler, RNG states (step-N only)
    meta.json                                     step, data position, config + its hash, ...

A checkpoint is written into `.NAME.tmp` and renamed into place, with `meta.json` written last
inside it, so a dir under a real name with `meta.json` is complete; a kill mid-save leaves only a
`.NAME.tmp` that the next attempt removes. A checkpoint made with another training config (the
args in `CONFIG_KEYS`, plus the world size) is refused rather than silently mixed into this run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from state.errors import WorkerError
from state.protocol import atomic_write_json
from worker import masks

if TYPE_CHECKING:
    from state.worker_config import TrainArgs

#: Args that change the training trajectory: a checkpoint made with other values is refused.
CONFIG_KEYS = (
    "model", "tokenizer", "revision", "attn_implementation", "dtype", "max_length", "seed",
    "data", "eval_data", "eval_fraction", "mask", "max_steps", "batch_size", "grad_accum", "lr",
    "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "gradient_checkpointing",
)  # fmt: skip
STEP_PREFIX = "step-"
FINAL = "final"
TRAINER_STATE = "trainer_state.pt"
META = "meta.json"


# ---- config identity --------------------------------------------------------------------


def config_of(args: TrainArgs, world_size: int) -> dict[str, Any]:
    """The trajectory-defining config of a run: `CONFIG_KEYS` of `args` plus the world size."""
    cfg = args.model_dump(mode="json", include=set(CONFIG_KEYS))
    cfg["world_size"] = world_size
    return cfg


def config_hash(cfg: dict[str, Any]) -> str:
    """A short stable hash of `cfg` (key order does not matter), stored in every meta.json."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(meta: dict[str, Any], cfg: dict[str, Any], ckpt: Path) -> None:
    """Raise WorkerError naming the differing keys unless `meta` was saved under `cfg`."""
    if meta.get("config_hash") == config_hash(cfg):
        return
    old = meta.get("config", {})
    diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
    raise WorkerError(
        f"checkpoint {ckpt} was made with a different config (differs in: {', '.join(diff) or 'unknown'})",
        hint="relaunch with the run's original args, or train into a new run dir",
    )


# ---- finding and pruning ----------------------------------------------------------------


def checkpoint_dirs(ckdir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints (those with meta.json) as (step, path), oldest step first."""
    out = []
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / META).is_file():
                with contextlib.suppress(ValueError):
                    out.append((int(p.name[len(STEP_PREFIX) :]), p))
    return sorted(out)


def latest_checkpoint(ckdir: Path) -> tuple[int, Path] | None:
    """The complete step checkpoint with the highest step, or None when there is none."""
    found = checkpoint_dirs(ckdir)
    return found[-1] if found else None


def remove_partial_saves(ckdir: Path) -> list[Path]:
    """Delete the `.NAME.tmp` dirs of saves cut short by a kill; returns what was removed."""
    removed = []
    if ckdir.is_dir():
        for stale in ckdir.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def prune_checkpoints(ckdir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete step checkpoints; returns what was removed."""
    removed = []
    for _, p in checkpoint_dirs(ckdir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def remove_step_checkpoints(ckdir: Path) -> list[Path]:
    """Delete every complete step checkpoint (a finished run keeps only `final/`)."""
    removed = []
    for _, p in checkpoint_dirs(ckdir):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ---- RNG state --------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The Python, torch (CPU and every CUDA device) and numpy (if installed) RNG states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only where CUDA is available)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state(optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """What `trainer_state.pt` holds: optimizer and scheduler state dicts and the RNG states."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }


# ---- saving and loading -----------------------------------------------------------------


def save_checkpoint(
    ckdir: Path,
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None,
) -> Path:
    """Write `ckdir/name` atomically: into `.name.tmp`, then rename (a kill mid-save leaves the
    previous checkpoints intact and no half directory under a real name). Returns the dir."""
    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = ckdir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    masks.unwrap(model).save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    atomic_write_json(tmp / META, meta)
    dest = ckdir / name
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load save_pretrained safetensors into `model` exactly (tied weights may be absent)."""
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise WorkerError(
            f"{ckpt}: no *.safetensors weights",
            hint="delete the broken checkpoint dir to resume from an older one",
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    target = masks.unwrap(model)
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed_tokens" in k}
    if unexpected or set(missing) - tied:
        raise WorkerError(
            f"{ckpt}: weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})",
            hint="resume with the model the run started with",
        )


def restore(
    ckpt: Path,
    cfg: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Resume from step checkpoint `ckpt`: refuse it (WorkerError) unless it was saved under
    `cfg`, then load the weights, optimizer, scheduler and RNG states. Returns its meta."""
    meta: dict[str, Any] = json.loads((ckpt / META).read_text())
    check_resumable(meta, cfg, ckpt)
    load_weights(model, ckpt)
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return meta
