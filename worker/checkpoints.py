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

Pruning comes BEFORE saving (`prune_before_save`), so the disk never holds more step
checkpoints than the run keeps plus the one being written. The rule, with `keep` =
`keep_checkpoints`:

- before step N is written, old ones are deleted down to `max(keep - 1, 1)` complete ones;
  after it is complete, down to `keep` (only `keep = 1` then deletes the previous one: it is
  kept until the new one is complete, so a save that dies always leaves a checkpoint to resume);
- the newest `keep` complete step checkpoints survive every save;
- PEAK: at most `max(keep, 2)` step dirs at once (complete ones + the one being written);
- `final/` is written beside only the newest step checkpoint (the older ones go first), and the
  step checkpoints are deleted once it is complete: peak at the end = 1 step + `final/`.

`state.footprint.checkpoints_peak_bytes` (what `orch plan` reserves) follows the same rule.
Before anything is written, `ensure_space` estimates the checkpoint's bytes (the previous step
checkpoint's size on disk, else the model's tensors and the optimizer state) and refuses, with
the numbers, a save that cannot fit the free disk, instead of leaving a partial one.
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

import numpy as np
import torch

from state import footprint
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
    "chat_template", "long_rows",
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


def prune_before_save(ckdir: Path, keep: int) -> list[Path]:
    """Make room for the next step checkpoint: leave `max(keep - 1, 1)` complete ones, so that
    with the new one there are never more than `max(keep, 2)` (see the module docstring)."""
    return prune_checkpoints(ckdir, max(keep - 1, 1))


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
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only where CUDA is available)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
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


# ---- disk space -------------------------------------------------------------------------

#: Tokenizer files saved beside the weights when no earlier checkpoint tells their size (a
#: 131k-token `tokenizer.json` is ~17 MB, a `tekken.json` ~15 MB).
TOKENIZER_ALLOWANCE = 32_000_000
#: Free space a save leaves untouched (events, status, summary, manifest, `.run_failed`).
SPACE_MARGIN = 64_000_000


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _tensors(obj: Any) -> tuple[int, int]:
    """(bytes, count) of the tensors nested in dicts/lists/tuples of `obj`."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size(), 1
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    size = count = 0
    for item in items:
        b, c = _tensors(item)
        size, count = size + b, count + c
    return size, count


def estimate_bytes(model: torch.nn.Module, trainer_state: dict[str, Any] | None) -> int:
    """Bytes a checkpoint of `model` (+ `trainer_state`) takes, from its tensors: the weights
    in their dtypes (tied ones once), the optimizer state as it is in memory, the file formats'
    per-tensor overheads, tokenizer files and the small JSONs (`state.footprint`'s constants)."""
    seen: set[int] = set()
    weights = n = 0
    for t in masks.unwrap(model).state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        weights += t.numel() * t.element_size()
        n += 1
    total = weights + n * footprint.SAFETENSORS_PER_TENSOR + footprint.SMALL_FILES_BYTES
    total += TOKENIZER_ALLOWANCE
    if trainer_state is not None:
        size, count = _tensors(trainer_state)
        total += size + count * footprint.TORCH_SAVE_PER_TENSOR + footprint.RNG_BYTES
    return total


def checkpoint_estimate(
    ckdir: Path, model: torch.nn.Module, trainer_state: dict[str, Any] | None
) -> tuple[int, str]:
    """(bytes, how they were found) of the next checkpoint: the newest step checkpoint's size on
    disk (less its trainer_state.pt for a weights-only save) when there is one, else
    `estimate_bytes`."""
    latest = latest_checkpoint(ckdir)
    if latest is not None:
        _, prev = latest
        size = dir_bytes(prev)
        if trainer_state is None and (prev / TRAINER_STATE).is_file():
            size -= (prev / TRAINER_STATE).stat().st_size
        return size, f"as {prev.name} on disk"
    return estimate_bytes(model, trainer_state), "estimated from the model and optimizer state"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 100_000_000 else f"{n / 1e6:.1f} MB"


def ensure_space(ckdir: Path, need: int, name: str, how: str = "") -> None:
    """Refuse (WorkerError, with the numbers) a save of `need` bytes that the free space of
    `ckdir`'s disk cannot hold with `SPACE_MARGIN` to spare."""
    free = shutil.disk_usage(ckdir).free
    if need + SPACE_MARGIN > free:
        raise WorkerError(
            f"not enough disk for checkpoint {name}: it needs about {_size(need)}"
            f"{f' ({how})' if how else ''} plus {_size(SPACE_MARGIN)} to spare, and {ckdir} "
            f"has {_size(free)} free",
            hint="free space on the box, lower keep_checkpoints, or use a bigger disk "
            "(disk_gb of the vast target); then relaunch to resume",
        )


# ---- saving and loading -----------------------------------------------------------------


def save_checkpoint(
    ckdir: Path,
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None,
    *,
    check_space: bool = True,
) -> Path:
    """Write `ckdir/name` atomically: into `.name.tmp`, then rename (a kill mid-save leaves the
    previous checkpoints intact and no half directory under a real name). Returns the dir.

    `check_space`: first refuse (`ensure_space`) a checkpoint the free disk cannot hold. A save
    that fails anyway (a full disk) removes its `.name.tmp` before the error goes on."""
    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = ckdir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if check_space:
        need, how = checkpoint_estimate(ckdir, model, trainer_state)
        ensure_space(ckdir, need, name, how)
    tmp.mkdir()
    try:
        masks.unwrap(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        atomic_write_json(tmp / META, meta)
    except BaseException:
        # A kill (Interrupted) or a full disk: free the space now, the next attempt would anyway.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dest = ckdir / name
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load save_pretrained safetensors into `model` exactly (tied weights may be absent)."""
    # lazy, for start-up time: pulls in safetensors
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
