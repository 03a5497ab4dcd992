"""What each stage needs and what it costs, estimated before anything is rented (pure; no I/O).

    cap = Capacity(target="gpu", kind="vast", device="cuda", gpu_name="H100 SXM", ...)
    plans = plan_stages(specs, profile, cap, recorded)    # one StagePlan per stage
    rows = fit_checks(plans, cap)                          # one Check per need, row by row

Per stage: the parameter count and peak memory (`state.footprint`: weights, gradients, AdamW
state, activations at the stage's batch size and `max_length`), the disk it holds at its peak
(step checkpoints while the next one is written, `final/`, the HF cache, the venv, and the
outputs of the stages before it, which stay on the box), and its duration from a throughput:
a previous run's own numbers on the same kind of device (`recorded`) if there is one, else the
profile's table (`jobs.profiles.PlanHints.throughput`). Dollars are the duration times the
target's $/h when it has one (Vast). `orchestrator/commands/plan.py` gathers the target's side
(an offer, a box's probe, free disk) and prints the table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.profiles import Profile, Throughput
from jobs.spec import StageSpec
from state import footprint
from state.footprint import GB, MemoryEstimate, ModelShape

#: What a GPU really gives a stage: its memory less the CUDA context and allocator slack.
GPU_USABLE_FRACTION = 0.92
#: A stage's logs, events, metrics, TensorBoard files (generous).
SMALL_OUTPUTS_BYTES = 50_000_000
#: The Docker image's own files on a Vast instance's disk (the default pytorch runtime image
#: is ~7 GB unpacked): the rented `disk_gb` holds them too.
VAST_IMAGE_BYTES = 8 * GB


@dataclass(frozen=True)
class Capacity:
    """What a target offers a stage. None = unknown (shown as `?`, never a pass)."""

    target: str
    kind: str  # local | ssh | slurm | vast
    device: str = "cpu"  # cuda | cpu: where `device = auto` stages run
    gpu_name: str | None = None
    gpu_count: int = 0
    gpu_memory: int | None = None  # bytes, per GPU
    host_memory: int | None = None  # bytes available to a CPU stage
    disk_free: int | None = None  # bytes the study may use on the target's disk
    dph: float | None = None  # $/h
    where: str = ""  # one line: the offer, the instance, the box
    credit: float | None = None  # $ the account may still spend (vast: /users/current), if read


@dataclass(frozen=True)
class Disk:
    """Bytes a stage holds on the target's disk at its peak."""

    checkpoint: int = 0  # one step checkpoint
    checkpoints_peak: int = 0  # step checkpoints (+ final/) at the peak of a save
    outputs: int = 0  # what stays after the stage (final/, metrics, logs)
    cache: int = 0  # HF cache: model + data sets (once per box)
    venv: int = 0  # the worker's venv (once per box)
    earlier: int = 0  # outputs of the stages before this one, still on the box

    @property
    def peak(self) -> int:
        return self.checkpoints_peak + self.cache + self.venv + self.earlier + SMALL_OUTPUTS_BYTES


@dataclass(frozen=True)
class StagePlan:
    stage: str
    kind: str  # train | eval
    device: str
    params: int
    memory: MemoryEstimate
    disk: Disk
    tokens: int  # real tokens the stage processes
    seconds: float | None
    rate: float | None  # tokens/s
    rate_source: str
    dollars: float | None
    timeout_s: float
    gpus: int = 1
    min_gpu_ram_gb: float | None = None


#: Rows about the target rather than a stage (`Check.stage`).
NOT_STAGES = frozenset({"account", "box", "image", "hub", "offer", "target"})


@dataclass(frozen=True)
class Check:
    """One row of the verdict: what is needed, what the target has, whether it fits, the fix."""

    stage: str
    what: str
    need: str
    have: str
    ok: bool | None  # None: unknown (cannot say), shown as `?`
    fix: str = ""


@dataclass
class Recorded:
    """Throughputs measured by earlier runs: (stage kind, device key) -> tokens/s and where."""

    rates: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)

    def add(self, kind: str, device_key: str, rate: float, source: str) -> None:
        self.rates.setdefault((kind, device_key), (rate, source))


# ---- formatting -------------------------------------------------------------------------------


def gb(n: int | float | None) -> str:
    """Bytes as `12.3 GB` (decimal, as Vast and disks count); `?` when unknown."""
    if n is None:
        return "?"
    if n < 10 * 1_000_000:
        return f"{n / 1_000_000:.2f} MB"
    if n < GB:
        return f"{n / 1_000_000:.0f} MB"
    return f"{n / GB:.1f} GB"


def hours(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def dollars(d: float | None) -> str:
    return "-" if d is None else f"${d:.2f}"


# ---- devices and throughputs ------------------------------------------------------------------


def _tokens(name: str) -> set[str]:
    name = name.upper().replace("NVIDIA", "").replace("GEFORCE", "")
    name = name.replace("HBM3", "SXM").replace("PCIE", " PCIE")
    return {t for t in re.split(r"[^A-Z0-9]+", name) if t and not t.endswith("GB")}


def device_key(name: str | None, table: Mapping[str, Any]) -> str | None:
    """The key of `table` for a device: `cpu`, a Vast GPU name as it is (`H100 SXM`), or the
    name torch reports (`NVIDIA H100 80GB HBM3` -> `H100 SXM`); None when nothing matches."""
    if not name:
        return None
    if name in table:
        return name
    want = _tokens(name)
    best, score = None, 0
    for key in table:
        have = _tokens(key)
        if not have <= want | {"SXM", "SXM4", "PCIE"} or not have & want:
            continue
        common = len(have & want)
        if common > score:
            best, score = key, common
    return best


def run_rate(kind: str, result: Mapping[str, Any]) -> float | None:
    """Real tokens/s of a finished run from its summary.json (train) or metrics.json (eval)."""
    if kind == "train":
        rate = result.get("train_tokens_per_second")
    else:
        secs, toks = result.get("eval_seconds"), result.get("tokens_forwarded")
        rate = toks / secs if isinstance(secs, (int, float)) and secs > 0 and toks else None
    return float(rate) if isinstance(rate, (int, float)) and rate > 0 else None


def _rate(
    kind: str, cap: Capacity, profile: Profile, recorded: Recorded | None
) -> tuple[float | None, str]:
    dev = "cpu" if cap.device == "cpu" else cap.gpu_name
    if recorded is not None:
        key = device_key(dev, {k: None for (kd, k) in recorded.rates if kd == kind})
        if key is not None:
            return recorded.rates[(kind, key)]
    table: dict[str, Throughput] = dict(profile.plan.throughput)
    key = device_key(dev, table)
    if key is None:
        return None, f"no recorded throughput for {dev or 'this device'}"
    t = table[key]
    rate = t.train_tokens_per_s if kind == "train" else t.eval_tokens_per_s
    return rate, f"{key}: {t.source}"


# ---- one stage --------------------------------------------------------------------------------


def shape_of(profile: Profile) -> ModelShape:
    """The base model's shape (every stage of a profile trains or evaluates that network)."""
    return ModelShape.from_config(profile.plan.base_config)


def train_dtypes(dtype: str, device: str) -> tuple[str, bool]:
    """(weights' dtype, bf16 autocast) of a training run, as the worker picks them: `auto`
    trains fp32 weights (`worker.modeling.load(training=True)`); on CUDA, fp32 weights compute
    under bf16 autocast (`worker.train.Trainer.setup`)."""
    weights = "float32" if dtype == "auto" else dtype
    return weights, device == "cuda" and weights == "float32"


def eval_dtype(dtype: str, device: str) -> str:
    """The weights' dtype of an evaluation (`auto`: bf16 on CUDA, fp32 on CPU)."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def train_memory_for(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str,
    device: str,
    gradient_checkpointing: bool,
) -> MemoryEstimate:
    """`state.footprint.train_memory` with the dtypes the worker would use on `device`."""
    weights, autocast = train_dtypes(dtype, device)
    return footprint.train_memory(
        shape,
        batch_size=batch_size,
        seq_len=seq_len,
        weight_dtype=weights,
        autocast_bf16=autocast,
        gradient_checkpointing=gradient_checkpointing,
    )


def _device(args: Mapping[str, Any], cap: Capacity) -> str:
    device = str(args.get("device", "auto"))
    return cap.device if device == "auto" else device


def plan_stage(
    spec: StageSpec,
    profile: Profile,
    cap: Capacity,
    recorded: Recorded | None = None,
    *,
    earlier: int = 0,
) -> StagePlan:
    """The needs of one stage on `cap`; `earlier`: bytes earlier stages left on the box. The HF
    cache and the venv count in every stage's disk (they stay on the box once made)."""
    a = spec.task.args
    shape = shape_of(profile)
    hints = profile.plan
    device = _device(a, cap)
    kind = spec.task.command
    # An eval stage's None means the model's own limit; its batches are only as long as their
    # longest question, so plan sizes them at 1024 tokens (more than any of the study's tasks).
    seq = int(a.get("max_length") or 1024)
    cache = round((hints.hf_model_gb + hints.hf_datasets_gb) * GB)
    venv = round(hints.venv_gb * GB)
    if kind == "train":
        weights, _ = train_dtypes(str(a.get("dtype", "auto")), device)
        mem = train_memory_for(
            shape,
            batch_size=int(a["batch_size"]),
            seq_len=seq,
            dtype=str(a.get("dtype", "auto")),
            device=device,
            gradient_checkpointing=bool(a.get("gradient_checkpointing", False)),
        )
        tok_files = 20_000_000 if shape.vocab_size > 32_000 else 100_000
        step = footprint.checkpoint_bytes(
            shape.parameters, weights, tensors=shape.tensors, extra_bytes=tok_files
        )
        final = footprint.checkpoint_bytes(
            shape.parameters,
            weights,
            optimizer=not bool(a.get("final_weights_only", True)),
            tensors=shape.tensors,
            extra_bytes=tok_files,
        )
        max_steps, save_every = int(a["max_steps"]), int(a["save_every"])
        saves = (max_steps - 1) // save_every  # step saves: never at the last step
        # worker.checkpoints' rule (prune before save), shared with the worker's own disk check
        peak = footprint.checkpoints_peak_bytes(
            step, int(a["keep_checkpoints"]), final, saves=saves
        )
        disk = Disk(step, peak, final + SMALL_OUTPUTS_BYTES, cache, venv, earlier)
        rows = max_steps * int(a["batch_size"]) * int(a.get("grad_accum", 1))
        tokens = rows * max(1, hints.train_tokens_per_row)
    else:
        dtype = eval_dtype(str(a.get("dtype", "auto")), device)
        mem = footprint.eval_memory(
            shape, batch_size=int(a.get("batch_size", 16)), seq_len=seq, weight_dtype=dtype
        )
        disk = Disk(0, 0, SMALL_OUTPUTS_BYTES, cache, venv, earlier)
        tokens = hints.eval_tokens  # a task `limit` only shortens it: an upper bound
    rate, source = _rate(kind, Capacity(**{**cap.__dict__, "device": device}), profile, recorded)
    seconds = tokens / rate + hints.setup_s if rate else None
    cost = seconds / 3600 * cap.dph if seconds is not None and cap.dph is not None else None
    return StagePlan(
        stage=spec.name,
        kind=kind,
        device=device,
        params=shape.parameters,
        memory=mem,
        disk=disk,
        tokens=tokens,
        seconds=seconds,
        rate=rate,
        rate_source=source,
        dollars=cost,
        timeout_s=spec.timeout_s,
        gpus=spec.resources.gpus,
        min_gpu_ram_gb=spec.resources.min_gpu_ram_gb,
    )


def plan_stages(
    specs: list[StageSpec], profile: Profile, cap: Capacity, recorded: Recorded | None = None
) -> list[StagePlan]:
    """Every stage in order on one box: the first pays for the cache and venv, and each one
    finds the outputs of those before it still on the disk."""
    plans: list[StagePlan] = []
    earlier = 0
    for spec in specs:
        if spec.local_only:
            continue
        plan = plan_stage(spec, profile, cap, recorded, earlier=earlier)
        plans.append(plan)
        earlier += plan.disk.outputs
    return plans


# ---- does it fit ------------------------------------------------------------------------------


def _mem_check(p: StagePlan, cap: Capacity) -> Check:
    need = p.memory.total
    if p.device == "cuda":
        have = cap.gpu_memory
        usable = int(have * GPU_USABLE_FRACTION) if have else None
        what, label = "GPU memory", f"{gb(have)} ({cap.gpu_name or '?'})"
        if have is None and cap.kind == "slurm":  # gres names a type, never a memory size
            label = f"unknown (gres gpu{':' + cap.gpu_name if cap.gpu_name else ''} gives none)"
        fix = (
            f"rent a GPU with >= {need / GB / GPU_USABLE_FRACTION:.0f} GB "
            "([offer] min_gpu_ram_gb), or lower batch_size / max_length, or turn on "
            "gradient_checkpointing (--set)"
        )
    else:
        usable = cap.host_memory
        what, label = "host memory", gb(usable)
        fix = "lower batch_size / max_length (--set), or run on a bigger machine"
    if cap.device != "cuda" and p.device == "cuda":
        return Check(p.stage, what, gb(need), "no GPU", False, "run it on a GPU target (--target)")
    ok = None if usable is None else need <= usable
    return Check(
        p.stage, f"{what} ({p.memory.phase})", gb(need), label, ok, fix if ok is False else ""
    )


def _disk_check(p: StagePlan, cap: Capacity) -> Check:
    need = p.disk.peak
    ok = None if cap.disk_free is None else need <= cap.disk_free
    fix = ""
    if ok is False:
        fix = f"a disk of >= {need / GB * 1.1:.0f} GB"
        fix += " (disk_gb of the vast target)" if cap.kind == "vast" else " free in the workdir"
        if p.kind == "train" and p.disk.checkpoints_peak > 2 * p.disk.checkpoint:
            fix += ", or keep_checkpoints=2 (--set): two on disk at the peak either way"
    return Check(p.stage, "disk", gb(need), gb(cap.disk_free), ok, fix)


def _time_check(p: StagePlan) -> Check:
    if p.seconds is None:
        return Check(p.stage, "time", "?", f"timeout {hours(p.timeout_s)}", None, "")
    ok = p.seconds <= p.timeout_s
    fix = "" if ok else "raise timeout_s (--set timeout_s=...), or a faster GPU"
    return Check(p.stage, "time", hours(p.seconds), f"timeout {hours(p.timeout_s)}", ok, fix)


def _credit_check(plans: list[StagePlan], credit: float) -> Check:
    """The planned stages' dollars against what the account may still spend (`orch up`
    refuses an offer whose expected spend the credit does not cover)."""
    have = f"credit {dollars(credit)}"
    if not plans or any(p.dollars is None for p in plans):
        return Check("account", "credit", "the stages' dollars: unknown", have, None, "")
    cost = sum(p.dollars or 0.0 for p in plans)
    ok = cost <= credit
    fix = "" if ok else (
        f"the account's credit ({dollars(credit)}) does not cover ~{dollars(cost)} for these "
        "stages: add credit at https://cloud.vast.ai/billing/"
    )  # fmt: skip
    return Check("account", "credit", f"~{dollars(cost)}", have, ok, fix)


def fit_checks(plans: list[StagePlan], cap: Capacity) -> list[Check]:
    """Row by row: memory, disk and time of every stage against the target, then (when the
    target's account credit was read) their dollars against the credit."""
    rows: list[Check] = []
    for p in plans:
        rows.append(_mem_check(p, cap))
        # a slurm target has its own row per stage: GPUs a node (jobs.slurm_limits)
        gpu_row = p.device == "cuda" and cap.device == "cuda" and cap.kind != "slurm"
        if gpu_row and p.gpus > cap.gpu_count:
            rows.append(
                Check(p.stage, "GPUs", str(p.gpus), str(cap.gpu_count), False, "[offer] num_gpus")
            )
        rows.append(_disk_check(p, cap))
        rows.append(_time_check(p))
    if cap.credit is not None:
        rows.append(_credit_check(plans, cap.credit))
    return rows


def verdict(rows: list[Check], plans: list[StagePlan], cap: Capacity) -> tuple[bool, str]:
    """(fits, one line): the first failing row and its fix, or the totals."""
    bad = [r for r in rows if r.ok is False]
    total_s = sum(p.seconds for p in plans if p.seconds is not None)
    known = all(p.seconds is not None for p in plans)
    cost = sum(p.dollars for p in plans if p.dollars is not None)
    money = f", ~{dollars(cost)} at ${cap.dph:.3f}/h" if cap.dph is not None and known else ""
    took = f"~{hours(total_s)}" if known else "duration unknown"
    if bad:
        r = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        if r.stage in NOT_STAGES:  # the box, the image, the hub: the fix is the message
            return False, f"cannot run on {cap.target}: {r.fix or f'{r.what}: {r.have}'}{more}"
        return False, (
            f"does not fit {cap.target}: {r.stage} needs {r.need} of {r.what.split(' (')[0]}, "
            f"{cap.target} has {r.have}{more}; fix: {r.fix or 'see the table'}"
        )
    unknown = [r for r in rows if r.ok is None]
    if unknown:
        return True, (
            f"fits {cap.target} as far as known ({len(unknown)} row(s) unknown: "
            f"{', '.join(sorted({r.what for r in unknown}))}); {took}{money}"
        )
    return True, f"fits {cap.target}: {len(plans)} stage(s), {took}{money}"
