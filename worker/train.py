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
uninterrupted run has at the same step. Saving, finding and restoring checkpoints lives in
`worker.checkpoints`, AdamW and the LR schedule in `worker.optimizer`.

Under `torchrun --nproc_per_node N` (env RANK/WORLD_SIZE) it runs DDP (nccl on CUDA, gloo on
CPU; `worker.distributed`); each rank takes its slice of every global batch; rank 0 writes
status and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from state import names
from state.errors import WorkerError
from state.phases import MaskMode, WorkerPhase
from worker import checkpoints, masks, modeling
from worker import data as wdata
from worker.context import LeakageError
from worker.distributed import Dist
from worker.loggers import make_logger
from worker.optimizer import build_optimizer
from worker.probe import ProbeResult, mean_loss, probe, replacement_ids, token_loss_sum

if TYPE_CHECKING:
    from state.worker_config import TrainArgs
    from worker.context import RunContext


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


# ---- the run ----------------------------------------------------------------------------


def train(args: TrainArgs, ctx: RunContext) -> dict[str, Any]:
    """The `train` task: returns the summary (the lifecycle writes summary.json)."""
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
        self.cfg = checkpoints.config_of(args, d.world)
        self.mode = MaskMode(args.mask)
        self.probes: list[dict[str, Any]] = []
        self.first_leak_step: int | None = None
        self.structural = "n/a (causal)"
        self.long_rows: dict[str, Any] = {}  # data / eval_data -> worker.data.LongRowStats

    # -- setup --------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        torch.manual_seed(a.seed)
        random.seed(a.seed)
        self.status.set_phase(WorkerPhase.LOADING, f"loading {a.model}")
        self.modeling.prebuild(a.model, self.status)  # ranks wait on the build's file lock
        loaded = self.modeling.load(a, training=True, local_rank=self.d.local_rank)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = loaded.device
        # Weights stay fp32 on CUDA and compute runs in bf16 (autocast): AdamW on bf16 weights
        # loses small updates.
        self.autocast = self.device.type == "cuda" and loaded.dtype == torch.float32
        masks.check_impl(a.attn_implementation, self.device)
        if a.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()

        self.train_ex, self.eval_ex = self.wdata.sft_splits(a, self.tokenizer, stats=self.long_rows)
        self.report_long_rows()
        dropped = self.long_rows["data"].dropped if "data" in self.long_rows else 0
        why = f"; {self.long_rows['data'].describe()}" if dropped else ""
        if not self.train_ex:
            raise WorkerError(
                f"training data {a.data.source} has no usable examples{why}",
                hint="raise max_length or set long_rows='truncate_prompt_left'"
                if dropped
                else "check the source and its split",
            )
        # The mask self-check on the stage's own rows (real tokens, never reserved low ids);
        # its generator is private, so the run's random streams are as before.
        masks.verify_mask_path(
            self.model,
            sample=[r.prompt_ids + r.response_ids for r in self.train_ex[:4]],
            tokenizer=self.tokenizer,
        )
        self.order = BatchOrder(len(self.train_ex), a.batch_size, self.d.world, a.seed)
        if self.order.per_epoch == 0:
            raise WorkerError(
                f"{len(self.train_ex)} training examples are fewer than one global batch "
                f"({a.batch_size} x {self.d.world} ranks){why}",
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

        self.optimizer, self.scheduler = build_optimizer(self.model, a)
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

    def report_long_rows(self) -> None:
        """The `long_rows` policy's counts per data set: a warning event when rows were dropped
        or cut, else an info event (summary.json gets them too, `long_rows_summary`)."""
        for key, st in self.long_rows.items():
            src = getattr(self.args, key)
            self.status.event(
                "warning" if st.long else "info",
                f"SFT rows of {src.name} ({key}): {st.describe()}",
                long_rows=st.as_dict(),
            )

    def long_rows_summary(self) -> dict[str, Any]:
        a = self.args
        return {
            "policy": a.long_rows,
            "max_length": a.max_length,
            "chat_template": a.chat_template,
            **{key: st.as_dict() for key, st in self.long_rows.items()},
        }

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
        """Continue from the latest complete step checkpoint of this run dir, if there is one."""
        if self.ctx.is_main:
            checkpoints.remove_partial_saves(self.ckdir)
        latest = checkpoints.latest_checkpoint(self.ckdir)
        if latest is None:
            return
        _, ckpt = latest
        meta = checkpoints.restore(ckpt, self.cfg, self.model, self.optimizer, self.scheduler)
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
            asked = self.save_asked()
            if asked and not last:
                st.event(
                    "info",
                    f"time limit near (USR1): checkpoint at step {self.step}",
                    step=self.step,
                )
            if (self.step % a.save_every == 0 or asked) and not last:
                self.save(time.monotonic() - t0, tokens)
        runtime = time.monotonic() - t0
        eval_loss = self.evaluate()
        final_probe = self.run_probe()
        self.save_final(runtime, tokens)
        return self.summary(eval_loss, final_probe, runtime, self.step - start_step, tokens)

    def save_asked(self) -> bool:
        """Slurm's time-limit warning (`ctx.save_request`, set on USR1) at this step boundary;
        under torchrun every rank agrees (any rank's request), so all of them save."""
        asked = self.ctx.save_request.take()
        if asked and self.ctx.is_main:  # the job script's note of it is answered
            with contextlib.suppress(OSError):
                os.unlink(self.ctx.run_dir / names.CHECKPOINT_REQUEST)
        if self.d.world > 1:
            asked = self.d.total(int(asked)) > 0
        return asked

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
            # the step too, so status and the dashboard say "LEAK at step N" while it trains
            self.status.update(leak_flag=True, first_leak_step=self.first_leak_step)
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
            "step": self.step, "data_pos": self.pos, "config": self.cfg, "config_hash": checkpoints.config_hash(self.cfg),
            "mask": self.mode.value, "loss_sum": self.loss_sum,
            "train_runtime": self.runtime_before + runtime, "train_tokens": self.tokens_before + tokens,
            "probes": self.probes, "first_leak_step": self.first_leak_step, "run_id": self.ctx.run_id,
        }  # fmt: skip

    def save(self, runtime: float, tokens: int) -> None:
        if self.ctx.is_main:
            self.status.update(phase=WorkerPhase.SAVING, message=f"checkpoint step {self.step}")
            state = checkpoints.trainer_state(self.optimizer, self.scheduler)
            name = f"{checkpoints.STEP_PREFIX}{self.step}"
            keep = self.args.keep_checkpoints
            # prune first: at most max(keep, 2) step dirs on disk, the new one included
            removed = checkpoints.prune_before_save(self.ckdir, keep)
            checkpoints.save_checkpoint(
                self.ckdir, name, self.model, self.tokenizer, self._meta(runtime, tokens), state
            )
            removed += checkpoints.prune_checkpoints(self.ckdir, keep)  # keep=1: the previous
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
            meta = self._meta(runtime, tokens)
            # Only the newest step checkpoint stays beside final/ while it is written (to resume
            # from if this save dies); `final_weights_only`: no optimizer state in final/.
            checkpoints.prune_checkpoints(self.ckdir, 1)
            state = (
                None
                if self.args.final_weights_only
                else checkpoints.trainer_state(self.optimizer, self.scheduler)
            )
            checkpoints.save_checkpoint(
                self.ckdir, checkpoints.FINAL, self.model, self.tokenizer, meta, state
            )
            # Step checkpoints exist to resume; a finished run keeps only the final model.
            checkpoints.remove_step_checkpoints(self.ckdir)
            self.status.event(
                "checkpoint",
                "saved final model",
                step=self.step,
                path=f"{names.CHECKPOINTS}/{checkpoints.FINAL}",
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
            "final_model": f"{names.CHECKPOINTS}/{checkpoints.FINAL}",
            "final_weights_only": a.final_weights_only,
            "sft_rows": self.long_rows_summary(),
            "structural_check": self.structural,
            "leak_flag": self.first_leak_step is not None,
            "first_leak_step": self.first_leak_step,
            "probe": pr.as_dict(),
            "probes": self.probes,
            "config": self.cfg,
        }
