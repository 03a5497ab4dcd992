"""Completion-only SFT with a mask mode per run: `causal` (stage 3A) or `prefix` (stage 3B).

    setup  -> load model/tokenizer/data, leakage guard (a) on a real batch, optimizer, schedule,
              resume from the latest checkpoint of this run dir (same config only)
    train  -> leakage guard (b) on the starting weights (a leaky mask shows at once: a forced
              full_bidir run stops before its first step), then gradient accumulation, AdamW,
              clipping, bf16 autocast on CUDA, periodic eval loss, guard (b) again every
              `probe_every` steps on a fixed held-out batch (do the predictions of labels change
              when later tokens do? see `worker.probe`), checkpoints
    finish -> final eval + probe, `checkpoints/final` (a plain save_pretrained dir), summary

Loss is on response tokens only (prompt labels are -100, set by `worker.data`); every forward
goes through `worker.masks.forward`, which builds the mask for the run's attention
implementation and checks that it reached attention (no silent causal fallback).

Exact resume: a checkpoint holds the weights, optimizer, scheduler, RNG states and the data
position (micro-batches consumed); the batch order is a pure function of (seed, epoch), so a
killed run relaunched in the same run dir replays the same batches and reproduces the loss an
uninterrupted run has at the same step.

Under `torchrun --nproc_per_node N` (env RANK/WORLD_SIZE) it runs DDP (nccl on CUDA, gloo on
CPU); each rank takes its slice of every global batch; rank 0 writes status and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from state import names
from state.errors import WorkerError
from state.phases import MaskMode, WorkerPhase
from state.protocol import atomic_write_json
from worker import masks
from worker.lifecycle import LeakageError
from worker.loggers import make_logger
from worker.probe import ProbeResult, mean_loss, probe, replacement_ids, token_loss_sum

if TYPE_CHECKING:
    from state.worker_config import TrainArgs
    from worker.lifecycle import RunContext

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


# ---- pure pieces ------------------------------------------------------------------------


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based): linear warmup, then
    cosine/linear decay to 0 at `total`, or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def config_of(args: TrainArgs, world_size: int) -> dict[str, Any]:
    cfg = args.model_dump(mode="json", include=set(CONFIG_KEYS))
    cfg["world_size"] = world_size
    return cfg


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class BatchOrder:
    """Which examples micro-batch `pos` of rank `rank` holds: a pure function of its inputs.

    Each global micro-batch is `batch_size * world` examples of a per-epoch permutation seeded
    by (seed, epoch); rank r takes its slice; the last partial global batch is dropped.
    """

    n: int
    batch_size: int
    world: int
    seed: int
    _cache: dict[int, list[int]] = field(default_factory=dict)

    @property
    def per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def indices(self, pos: int, rank: int) -> list[int]:
        epoch, i = divmod(pos, self.per_epoch)
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        gb = self.batch_size * self.world
        start = i * gb + rank * self.batch_size
        return self._cache[epoch][start : start + self.batch_size]


# ---- checkpoints ------------------------------------------------------------------------


def checkpoint_dirs(ckdir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints (those with meta.json), oldest first."""
    out = []
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / META).is_file():
                with contextlib.suppress(ValueError):
                    out.append((int(p.name[len(STEP_PREFIX) :]), p))
    return sorted(out)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckdir: Path,
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None,
) -> Path:
    """Write `ckdir/name` atomically: into `.name.tmp`, then rename (a kill mid-save leaves the
    previous checkpoints intact and no half directory under a real name)."""
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


def prune_checkpoints(ckdir: Path, keep: int) -> list[Path]:
    removed = []
    for _, p in checkpoint_dirs(ckdir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


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


def check_resumable(meta: dict[str, Any], cfg: dict[str, Any], ckpt: Path) -> None:
    if meta.get("config_hash") == config_hash(cfg):
        return
    old = meta.get("config", {})
    diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
    raise WorkerError(
        f"checkpoint {ckpt} was made with a different config (differs in: {', '.join(diff) or 'unknown'})",
        hint="relaunch with the run's original args, or train into a new run dir",
    )


# ---- distributed ------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: bool = False

    @classmethod
    def setup(cls, ctx: RunContext, device_kind: str) -> Dist:
        d = cls(ctx.rank, ctx.world_size, int(os.environ.get("LOCAL_RANK", "0")))
        if d.world > 1 and not dist.is_initialized():
            if device_kind == "cuda":
                torch.cuda.set_device(d.local_rank)
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
            d.started = True
        return d

    def _tensor(self, value: float | int, dtype: torch.dtype) -> torch.Tensor:
        # nccl reduces CUDA tensors only; gloo CPU ones.
        dev = (
            torch.device("cuda", self.local_rank)
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        return torch.tensor([value], dtype=dtype, device=dev)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = self._tensor(value, torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def total(self, value: int) -> int:
        if self.world == 1:
            return value
        t = self._tensor(value, torch.int64)
        dist.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()


# ---- the run ----------------------------------------------------------------------------


def train(args: TrainArgs, ctx: RunContext) -> dict[str, Any]:
    """The `train` task: returns the summary (the lifecycle writes summary.json)."""
    from worker import data as wdata
    from worker import modeling

    device_kind = modeling.resolve_device(args.device).type
    d = Dist.setup(ctx, device_kind)
    try:
        return Trainer(args, ctx, d, modeling, wdata).run()
    finally:
        d.close()


class Trainer:
    """One training run; see the module docstring for the phases."""

    def __init__(
        self, args: TrainArgs, ctx: RunContext, d: Dist, modeling: Any, wdata: Any
    ) -> None:
        self.args, self.ctx, self.d = args, ctx, d
        self.modeling, self.wdata = modeling, wdata
        self.status = ctx.status
        self.ckdir = ctx.run_dir / names.CHECKPOINTS
        self.cfg = config_of(args, d.world)
        self.mode = MaskMode(args.mask)
        self.probes: list[dict[str, Any]] = []
        self.first_leak_step: int | None = None
        self.structural = "n/a (causal)"

    # -- setup --------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        self.status.set_phase(WorkerPhase.LOADING, f"loading {a.model}")
        loaded = self.modeling.load(a, training=True, local_rank=self.d.local_rank)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = loaded.device
        # Weights stay fp32 on CUDA and compute runs in bf16 (autocast): AdamW on bf16 weights
        # loses small updates.
        self.autocast = self.device.type == "cuda" and loaded.dtype == torch.float32
        masks.check_impl(a.attn_implementation, self.device)
        masks.verify_mask_path(self.model)
        if a.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()

        self.train_ex, self.eval_ex = self.wdata.sft_splits(a, self.tokenizer)
        if not self.train_ex:
            raise WorkerError(
                f"training data {a.data.source} has no usable examples",
                hint="check the source and its split",
            )
        self.order = BatchOrder(len(self.train_ex), a.batch_size, self.d.world, a.seed)
        if self.order.per_epoch == 0:
            raise WorkerError(
                f"{len(self.train_ex)} training examples are fewer than one global batch "
                f"({a.batch_size} x {self.d.world} ranks)",
                hint="lower batch_size or add data",
            )
        held = self.eval_ex or self.train_ex  # probe on training rows only if nothing is held out
        self.probe_batch = self.collate(held[: a.probe_batch_size])
        self.probe_pool = replacement_ids(self.tokenizer, self.model)
        self.eval_batches = [
            self.collate(self.eval_ex[i : i + a.batch_size])
            for i in range(0, min(len(self.eval_ex), a.eval_batches * a.batch_size), a.batch_size)
        ]
        self.structural_guard(
            self.collate([self.train_ex[i] for i in self.order.indices(0, self.d.rank)])
        )

        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=a.lr,
            weight_decay=a.weight_decay,
            betas=(0.9, 0.999),
            foreach=False,  # the same kernel every run: resume must be bit-exact
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup=a.warmup_steps, total=a.max_steps, kind=a.lr_schedule),
        )
        self.step, self.pos, self.loss_sum, self.runtime_before, self.tokens_before = (
            0,
            0,
            0.0,
            0.0,
            0,
        )
        self.resumed_from: str | None = None
        self.resume()
        self.ddp: torch.nn.Module = self.model
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.logger = make_logger(
            self.ctx.run_dir,
            main=self.ctx.is_main,
            wandb=a.wandb,
            wandb_project=a.wandb_project,
            run_name=f"{self.ctx.stage}/{self.ctx.run_id}",
            config=a.model_dump(mode="json"),
        )

    def collate(self, rows: list[Any]) -> dict[str, torch.Tensor]:
        return self.wdata.collate_sft(rows, self.tokenizer)

    def structural_guard(self, batch: dict[str, torch.Tensor]) -> None:
        """Guard (a): the mask actually built for a real batch may not show a label to the
        position that predicts it."""
        a = self.args
        if self.mode is MaskMode.CAUSAL:
            return
        if not a.structural_check:
            self.structural = "skipped"
            self.status.event(
                "warning", "structural leakage check skipped (structural_check=false)"
            )
            return
        am, plens = batch["attention_mask"], batch["prompt_lens"]
        built = masks.build_mask(am, plens, self.mode, a.attn_implementation)
        try:
            masks.check_no_leak(built, plens, am)
        except WorkerError as exc:
            if not a.allow_leaky:
                raise LeakageError(
                    f"refusing to train with mask {self.mode.value}: {exc.message}",
                    hint="use mask=prefix (prompt bidirectional, response causal); set allow_leaky=true only to reproduce the leak on purpose",
                ) from exc
            self.structural = "failed (allowed: allow_leaky)"
            self.status.update(leak_flag=True)
            self.status.event(
                "warning", f"allow_leaky: training on a leaky mask on purpose: {exc.message}"
            )
            return
        self.structural = "passed"
        self.status.event("info", f"structural leakage check passed for mask {self.mode.value}")

    def resume(self) -> None:
        if self.ctx.is_main and self.ckdir.is_dir():
            for stale in self.ckdir.glob(".*.tmp"):  # a save cut short by a kill
                shutil.rmtree(stale, ignore_errors=True)
        found = checkpoint_dirs(self.ckdir)
        if not found:
            return
        step, ckpt = found[-1]
        meta = json.loads((ckpt / META).read_text())
        check_resumable(meta, self.cfg, ckpt)
        load_weights(self.model, ckpt)
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step, self.pos = int(meta["step"]), int(meta["data_pos"])
        self.loss_sum = float(meta.get("loss_sum", 0.0))
        self.runtime_before = float(meta.get("train_runtime", 0.0))
        self.tokens_before = int(meta.get("train_tokens", 0))
        self.probes = list(meta.get("probes", []))
        self.first_leak_step = meta.get("first_leak_step")
        self.resumed_from = ckpt.name
        self.status.event(
            "checkpoint",
            f"resumed from {ckpt.name}",
            step=self.step,
            path=f"{names.CHECKPOINTS}/{ckpt.name}",
        )

    # -- loop ---------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.args.grad_accum):
            rows = [self.train_ex[i] for i in self.order.indices(self.pos, self.d.rank)]
            self.pos += 1
            yield self.collate(rows)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over `grad_accum` micro-batches: (loss, grad norm, tokens)."""
        a = self.args
        losses, tokens = [], 0
        for i, batch in enumerate(self.micro_batches()):
            sync = self.d.world == 1 or i == a.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()  # type: ignore[operator]
            with ctx:
                ids = batch["input_ids"].to(self.device)
                am = batch["attention_mask"].to(self.device)
                with torch.autocast(
                    device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast
                ):
                    logits = masks.forward(
                        self.ddp,
                        ids,
                        am,
                        batch["prompt_lens"].to(self.device),
                        self.mode,
                        use_cache=False,
                    )
                s, n = token_loss_sum(logits, batch["labels"].to(self.device))
                if n == 0:
                    raise WorkerError(
                        "a training batch has no response tokens (all labels -100)",
                        hint="check the data's responses and max_length",
                    )
                loss = s / n
                (loss / a.grad_accum).backward()
            losses.append(float(loss.detach()))
            tokens += int(am.sum())
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.d.mean(sum(losses) / len(losses)), float(norm), self.d.total(tokens)

    def run(self) -> dict[str, Any]:
        self.setup()
        try:
            return self._loop()
        finally:
            self.logger.close()

    def _loop(self) -> dict[str, Any]:
        a = self.args
        st = self.status
        st.update(total_steps=a.max_steps, step=self.step)
        st.set_phase(WorkerPhase.TRAINING, f"mask={self.mode.value} from step {self.step}")
        st.reset_rates()
        t0 = time.monotonic()
        start_step, tokens = self.step, 0
        st.step(self.step, total_steps=a.max_steps)
        if self.step == 0:
            # The counterfactual sees a leaky mask on the starting weights already: stop such a
            # run before it spends a single step (allow_leaky: flag it and go on).
            self.run_probe()
        while self.step < a.max_steps:
            loss, norm, n_tok = self.train_step()
            self.step += 1
            tokens += n_tok
            self.loss_sum += loss
            lr = self.scheduler.get_last_lr()[0]
            st.step(
                self.step, loss=loss, lr=lr, tokens=n_tok, epoch=self.pos / self.order.per_epoch
            )
            if self.step % a.log_every == 0:
                st.event(
                    "train", f"loss={loss:.4f}", step=self.step, loss=loss, lr=lr, grad_norm=norm
                )
                self.logger.log(
                    {
                        "train/loss": loss,
                        "train/lr": lr,
                        "train/grad_norm": norm,
                        "train/tokens_per_s": st.status.tokens_per_s or 0.0,
                    },
                    self.step,
                )
            last = self.step == a.max_steps
            if self.step % a.eval_every == 0 and not last:
                self.evaluate()
            if self.step % a.probe_every == 0 and not last:
                self.run_probe()
            if self.step % a.save_every == 0 and not last:
                self.save(time.monotonic() - t0, tokens)
        runtime = time.monotonic() - t0
        eval_loss = self.evaluate()
        final_probe = self.run_probe()
        self.save_final(runtime, tokens)
        return self.summary(eval_loss, final_probe, runtime, self.step - start_step, tokens)

    def evaluate(self) -> float | None:
        if not self.eval_batches:
            return None
        self.status.update(phase=WorkerPhase.EVALUATING, message=f"eval loss at step {self.step}")
        loss, n = mean_loss(self.model, self.eval_batches, self.mode, autocast=self.autocast)
        self.status.update(phase=WorkerPhase.TRAINING, eval_loss=loss, message="")
        self.status.event("eval", f"eval_loss={loss:.4f}", step=self.step, eval_loss=loss, tokens=n)
        self.logger.log({"eval/loss": loss}, self.step)
        return loss

    def run_probe(self) -> ProbeResult:
        """Guard (b) on the fixed held-out batch: the counterfactual decides (do the predictions
        of labels change when later tokens do?); the mask/causal loss ratio is reported."""
        self.status.update(phase=WorkerPhase.PROBING, message=f"leakage probe at step {self.step}")
        r = probe(
            self.model,
            [self.probe_batch],
            self.mode,
            self.args.leak_ratio,
            self.probe_pool,
            autocast=self.autocast,
        )
        rec = {"step": self.step, **r.as_dict()}
        self.probes.append(rec)
        self.status.update(
            phase=WorkerPhase.TRAINING, message="", extra={**self.status.status.extra, "probe": rec}
        )
        self.status.event("probe", r.describe(), step=self.step, **r.as_dict())
        self.logger.log(
            {
                "probe/loss_mask": r.loss_mask,
                "probe/loss_causal": r.loss_causal,
                "probe/ratio": r.ratio,
                "probe/future_sensitivity": r.future_sensitivity,
                "probe/max_logit_diff": r.max_logit_diff,
            },
            self.step,
        )
        if r.ratio_flag and not r.leak:
            # The seed's rule would have stopped this run: the weights adapted to their mask
            # (prefix-LM), which is the point of the run, not a leak.
            self.status.event(
                "info",
                f"loss ratio {r.ratio:.3f} is below {r.leak_ratio}, but the counterfactual shows "
                "no dependence on later tokens: adaptation to the mask, not leakage",
                step=self.step,
            )
        if r.leak:
            if self.first_leak_step is None:
                self.first_leak_step = self.step
            self.status.update(leak_flag=True)
            msg = f"label leakage at step {self.step}: {r.describe()}"
            if not self.args.allow_leaky:
                raise LeakageError(
                    msg,
                    hint="the mask lets response tokens see their labels; train with mask=prefix or causal",
                )
            self.status.event(
                "warning", f"{msg} (allow_leaky: continuing on purpose)", step=self.step
            )
        return r

    # -- saving -------------------------------------------------------------------------
    def _meta(self, runtime: float, tokens: int) -> dict[str, Any]:
        return {
            "step": self.step, "data_pos": self.pos, "config": self.cfg, "config_hash": config_hash(self.cfg),
            "mask": self.mode.value, "loss_sum": self.loss_sum,
            "train_runtime": self.runtime_before + runtime, "train_tokens": self.tokens_before + tokens,
            "probes": self.probes, "first_leak_step": self.first_leak_step, "run_id": self.ctx.run_id,
        }  # fmt: skip

    def save(self, runtime: float, tokens: int) -> None:
        if self.ctx.is_main:
            self.status.update(phase=WorkerPhase.SAVING, message=f"checkpoint step {self.step}")
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
            }
            name = f"{STEP_PREFIX}{self.step}"
            save_checkpoint(
                self.ckdir, name, self.model, self.tokenizer, self._meta(runtime, tokens), state
            )
            removed = prune_checkpoints(self.ckdir, self.args.keep_checkpoints)
            self.status.event(
                "checkpoint",
                f"saved {name}",
                step=self.step,
                path=f"{names.CHECKPOINTS}/{name}",
                pruned=[p.name for p in removed],
            )
            self.status.update(phase=WorkerPhase.TRAINING, message="")
        self.d.barrier()

    def save_final(self, runtime: float, tokens: int) -> None:
        if self.ctx.is_main:
            self.status.update(phase=WorkerPhase.SAVING, message="final model")
            save_checkpoint(
                self.ckdir, FINAL, self.model, self.tokenizer, self._meta(runtime, tokens), None
            )
            # Step checkpoints exist to resume; a finished run keeps only the final model.
            for _, p in checkpoint_dirs(self.ckdir):
                shutil.rmtree(p, ignore_errors=True)
            self.status.event(
                "checkpoint",
                "saved final model",
                step=self.step,
                path=f"{names.CHECKPOINTS}/{FINAL}",
            )
        self.d.barrier()

    def summary(
        self, eval_loss: float | None, pr: ProbeResult, runtime: float, steps: int, tokens: int
    ) -> dict[str, Any]:
        total_runtime = self.runtime_before + runtime
        a = self.args
        return {
            "train_loss": self.loss_sum / max(1, self.step),
            "eval_loss": eval_loss,
            "train_runtime": total_runtime,
            "train_steps_per_second": self.step / total_runtime if total_runtime > 0 else None,
            "train_tokens_per_second": (self.tokens_before + tokens) / total_runtime
            if total_runtime > 0
            else None,
            "steps": self.step,
            "steps_this_attempt": steps,
            "resumed_from": self.resumed_from,
            "mask": self.mode.value,
            "attn_implementation": a.attn_implementation,
            "world_size": self.d.world,
            "device": str(self.device),
            "autocast_bf16": self.autocast,
            "final_model": f"{names.CHECKPOINTS}/{FINAL}",
            "structural_check": self.structural,
            "leak_flag": self.first_leak_step is not None,
            "first_leak_step": self.first_leak_step,
            "probe": pr.as_dict(),
            "probes": self.probes,
            "config": self.cfg,
        }
