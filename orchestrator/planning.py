"""The I/O half of `orch plan`: what a target offers (`capacity`), what earlier runs measured
(`recorded_rates`), which hub repos the stages read (`hub_repos`). The estimates themselves are
pure (`jobs.plan`); nothing here rents, starts or writes anything.

    cap, rows = capacity(ctx, "gpu", needs_cuda=True)    # the offer orch up would rent, or the box
    recorded = recorded_rates(ctx.project_root / "runs", profile)

- slurm: the partition's limits and nodes from the login node in one round trip
  (`orchestrator.slurm.partition`: `scontrol show partition` + `sinfo -N`, parsed purely by
  `jobs.slurm_limits`), a row per limit per stage (GPUs a node against `resources.gpus`,
  `--time` as the job script computes it against MaxTime, `--mem` against RealMemory /
  MaxMemPerNode / MaxMemPerCPU, `--cpus-per-task` against the node's CPUs), then the probe of
  the login node's env (contract, free disk of the shared workdir). GPU memory: unknown, gres
  does not say it. A missing partition is one error naming those that exist.
- local / ssh: the box itself, probed once (`orchestrator.boxcheck`): GPUs, free disk of the
  workdir, memory, and the runtime contract of the env the worker would use.
- vast with a live instance: the same probe over its ssh, its recorded $/h and GPU.
- vast without one: the offer `orch up` would rent now (the same search and ranking,
  `orchestrator.vast.offers`), its GPU memory and $/h, the target's `disk_gb` less the image;
  the image's torch is read from its tag (`state.runtime_contract.image_problem`).
- vast either way: the account's credit (`/users/current`, as `orch up` reads it), which
  `jobs.plan.fit_checks` holds against the stages' dollars.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jobs import slurm_limits as sl
from jobs.plan import GB, VAST_IMAGE_BYTES, Capacity, Check, Recorded, run_rate
from jobs.profiles import Profile
from jobs.spec import StageSpec
from orchestrator.boxcheck import BoxFacts, contract_checks, probe_box
from orchestrator.config import LocalTarget, SlurmTarget, SshTarget, VastTarget
from orchestrator.context import Context
from orchestrator.hub import Repo
from orchestrator.slurm.partition import read_partition
from orchestrator.targets.factory import make_target, recorded_python
from orchestrator.vast.client import account_credit
from orchestrator.vast.offers import (
    build_query,
    describe_offer,
    no_offer_hint,
    price_of,
    rank_offers,
)
from state import names
from state.errors import OrchError
from state.runtime_contract import MIN_TORCH, image_problem, image_torch

MIB = 1 << 20


def _box(
    ctx: Context, name: str, kind: str, *, needs_cuda: bool
) -> tuple[Capacity, list[Check], Any]:
    _, cfg = ctx.config.target(name)
    target = make_target(ctx, name)
    try:
        python = cfg.python or recorded_python(ctx, name)
        if kind == "local" and python is None:
            python = sys.executable
        bootstrapped = python is not None
        facts = probe_box(target, python or "python3")
    finally:
        target.close()
    rows = contract_checks(facts, bootstrapped=bootstrapped, needs_cuda=needs_cuda)
    cap = Capacity(
        target=name,
        kind=kind,
        device="cuda" if facts.gpus else "cpu",
        gpu_name=facts.gpu_name,
        gpu_count=len(facts.gpus),
        gpu_memory=facts.gpu_memory,
        host_memory=facts.mem_available,
        disk_free=facts.disk_free,
        where=f"{kind} box, probed: {facts.gpu_name or 'no GPU'}, {facts.python_exe}",
    )
    return cap, rows, facts


def _vast_offer(
    ctx: Context, name: str, cfg: VastTarget, need_gpu: int, need_disk: int
) -> tuple[Capacity, list[Check]]:
    """The offer `orch up` would rent, and the cheapest matching one that would fit."""
    # lazy, for start-up time: only this path needs orchestrator.vast.provision
    from orchestrator.vast.provision import make_client

    with make_client(cfg) as client:
        credit, rows = _vast_credit(client)
        ranked = rank_offers(client.search_offers(build_query(cfg)), cfg)
    disk = int(cfg.disk_gb * GB) - VAST_IMAGE_BYTES
    if not ranked:
        rows.append(Check("offer", "offer", "a matching offer", "none", False, no_offer_hint(cfg)))
        where = "no matching offer"
        return Capacity(name, "vast", "cuda", disk_free=disk, where=where, credit=credit), rows
    best = ranked[0]
    mem = int(best.gpu_ram * MIB) if best.gpu_ram else None
    fitting = [
        o for o in ranked
        if o.gpu_ram and o.gpu_ram * MIB * 0.92 >= need_gpu and (o.disk_space or 0) * GB >= need_disk
    ]  # fmt: skip
    where = describe_offer(best, cfg)
    if fitting and fitting[0] is not best and (mem is None or mem * 0.92 < need_gpu):
        where += f"; cheapest that fits: {describe_offer(fitting[0], cfg)}"
    cap = Capacity(
        target=name,
        kind="vast",
        device="cuda",
        gpu_name=best.gpu_name,
        gpu_count=int(best.num_gpus or 0),
        gpu_memory=mem,
        disk_free=disk,
        dph=price_of(best, cfg),
        where=where,
        credit=credit,
    )
    return cap, rows


def _vast_credit(client: Any) -> tuple[float | None, list[Check]]:
    """The account's credit (`GET /api/v0/users/current/`, as `orch up` reads it), and a row
    marked unknown when Vast does not report it. A refused key is an error, as in `orch up`."""
    credit = account_credit(client.check_key())
    if credit is None:
        return None, [
            Check("account", "credit", "the stages' dollars", "not reported by Vast", None)
        ]
    return credit, []


def capacity(
    ctx: Context, name: str | None, *, needs_cuda: bool, need_gpu: int = 0, need_disk: int = 0,
    remote: bool = True, stages: list[StageSpec] | None = None,
) -> tuple[Capacity, list[Check]]:  # fmt: skip
    """What target `name` offers the stages, and the contract rows of its env (probed when it
    exists and `remote`). On a slurm target, also a row per limit of its partition for each of
    `stages` (their jobs' GPUs, --time, memory and CPUs)."""
    tname, cfg = ctx.config.target(name)
    if isinstance(cfg, SlurmTarget):
        if not remote:
            where = f"slurm partition {cfg.partition or '(default)'}, not read (--offline)"
            return Capacity(tname, "slurm", device="cuda", where=where), []
        return _slurm(ctx, tname, cfg, needs_cuda=needs_cuda, stages=stages or [])
    if isinstance(cfg, LocalTarget):
        if not remote:
            return Capacity(tname, "local", where="not probed (--offline)"), []
        cap, rows, _ = _box(ctx, tname, "local", needs_cuda=needs_cuda)
        return cap, rows
    if isinstance(cfg, SshTarget):
        if not remote:
            return Capacity(tname, "ssh", device="cuda", where="not probed (--offline)"), []
        cap, rows, _ = _box(ctx, tname, "ssh", needs_cuda=needs_cuda)
        return cap, rows
    assert isinstance(cfg, VastTarget)
    bad, tagged = image_problem(cfg.image), image_torch(cfg.image)
    have = f"{cfg.image} (torch {tagged})" if tagged else f"{cfg.image} (torch not in the tag)"
    rows = [
        Check("image", "image torch", f">= {'.'.join(map(str, MIN_TORCH))}", have,
              None if tagged is None else bad is None,
              f"set image in [targets.{tname}] (docs/vast.md)" if bad else "")
    ]  # fmt: skip
    live = ctx.store.live_instance_for(tname)
    if live is not None and live.get("ssh_host") and remote:
        # lazy, for start-up time: only this path needs orchestrator.vast.provision
        from orchestrator.vast.provision import make_client

        cap, box_rows, _ = _box(ctx, tname, "vast", needs_cuda=needs_cuda)
        with make_client(cfg) as client:
            credit, credit_rows = _vast_credit(client)
        dph = live.get("dph")
        gpu = live.get("gpu_name") or cap.gpu_name
        cap = Capacity(
            **{**cap.__dict__, "gpu_name": gpu, "dph": float(dph) if dph is not None else None,
               "where": f"vast instance {live['instance_id']} ({gpu}), probed", "credit": credit}
        )  # fmt: skip
        return cap, rows + box_rows + credit_rows
    if not remote:
        disk = int(cfg.disk_gb * GB) - VAST_IMAGE_BYTES
        return Capacity(
            tname, "vast", "cuda", disk_free=disk, where="offers not searched (--offline)"
        ), rows
    cap, offer_rows = _vast_offer(ctx, tname, cfg, need_gpu, need_disk)
    return cap, rows + offer_rows


def _slurm(
    ctx: Context, name: str, cfg: SlurmTarget, *, needs_cuda: bool, stages: list[StageSpec]
) -> tuple[Capacity, list[Check]]:
    """A slurm target: its partition's limits and nodes (one round trip to the login node,
    `orchestrator.slurm.partition`), then the runtime contract of the env the jobs would use
    and the free disk of the workdir (the probe, on the login node: the compute nodes share
    both). The GPUs are the partition's gres: their memory is unknown (gres says none)."""
    # lazy, for start-up time: orchestrator.slurm.jobscript loads the wrapper and state.slurm
    from orchestrator.slurm.jobscript import time_limit_minutes

    facts: BoxFacts | None = None
    probe_rows: list[Check] = []
    target = make_target(ctx, name)
    try:
        part = read_partition(target, cfg.partition)
        python = cfg.python or recorded_python(ctx, name)
        try:
            facts = probe_box(target, python or "python3")
        except OrchError as exc:
            probe_rows = [plan_error_row(exc, "login node env")]
    finally:
        target.close()
    if facts is not None:
        # the login node has no GPU to show torch; what matters is a CUDA build of torch
        probe_rows = contract_checks(facts, bootstrapped=python is not None, needs_cuda=False)
        if needs_cuda and facts.torch and python is not None:  # the venv the jobs run
            ok = facts.cuda is not None
            fix = "" if ok else (
                "the venv the jobs use has a CPU-only torch, and the compute nodes share it: "
                "install a CUDA build of torch there"
            )  # fmt: skip
            probe_rows.append(
                Check("box", "torch CUDA build", "a CUDA build",
                      f"CUDA {facts.cuda}" if ok else "a CPU-only torch", ok, fix)
            )  # fmt: skip
    rows = sl.partition_checks(part, account=cfg.account, qos=cfg.qos)
    mem_mb = sl.parse_mem_mb(cfg.mem)
    for spec in stages:
        if spec.local_only:
            continue
        req = sl.JobRequest(
            stage=spec.name,
            gpus=max(int(spec.resources.gpus), 0),
            gpu_type=cfg.gpu_type,
            time_min=time_limit_minutes(spec.timeout_s, cfg.time_margin_s),
            cpus=cfg.cpus_per_task or 1,
            mem_mb=mem_mb,
        )
        rows += sl.stage_checks(req, part)
    gpus = part.max_gpus(cfg.gpu_type)
    types = sorted({g.type for n in part.nodes for g in n.gres if g.name == "gpu" and g.type})
    job_mem = sl.job_memory_mb(sl.JobRequest("", 0, None, 1, cfg.cpus_per_task or 1, mem_mb), part)
    where = sl.summary(part)
    if facts is not None:
        where += f"; login node env {facts.python_exe}"
    cap = Capacity(
        target=name,
        kind="slurm",
        device="cuda" if gpus else "cpu",
        gpu_name=cfg.gpu_type or (types[0] if len(types) == 1 else None),
        gpu_count=gpus,
        gpu_memory=None,  # gres gives no memory; a guess from the type's name would be a guess
        host_memory=job_mem * MIB if job_mem is not None else None,
        disk_free=facts.disk_free if facts is not None else None,
        where=where,
    )
    return cap, probe_rows + rows


# ---- earlier runs ------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_rates(runs_dir: Path, profile: Profile, stages: list[StageSpec]) -> Recorded:
    """Throughputs of the newest finished runs of these stages under `profile` (their own
    summary.json / metrics.json), keyed by stage kind and device (`cpu` or the GPU's name)."""
    rec = Recorded()
    for spec in stages:
        base = runs_dir / spec.stage_dir
        if not base.is_dir():
            continue
        for run in sorted((p for p in base.iterdir() if p.is_dir()), reverse=True):
            if not (run / names.RUN_COMPLETE).exists():
                continue
            sp = _read(run / names.SPEC)
            if sp.get("profile") != profile.name:
                continue
            kind = spec.task.command
            result = _read(run / (names.SUMMARY if kind == "train" else names.METRICS))
            rate = run_rate(kind, result)
            if rate is None:
                continue
            status = _read(run / names.STATUS)
            gpus = status.get("gpus") or []
            device = str(result.get("device") or "")
            dev = "cpu" if device.startswith("cpu") or not gpus else str(gpus[0].get("name") or "")
            if dev:
                rec.add(kind, dev, rate, f"run {spec.stage_dir}/{run.name} on {dev}")
    return rec


# ---- hub inputs --------------------------------------------------------------------------------


def hub_repos(stages: list[StageSpec]) -> list[Repo]:
    """The hub repos the stages read: a hub model id (not `tiny://`, a path, or an upstream
    checkpoint) and every `hf:` data set, each with its revision."""
    out: list[Repo] = []
    for spec in stages:
        a = spec.task.args
        model = str(a.get("model", ""))
        local = model.startswith(("tiny://", "input:", "/", ".", "~")) or Path(model).exists()
        if model and "/" in model and not local:
            out.append(Repo(model, "model", a.get("revision"), spec.name))
        srcs = [t for t in a.get("tasks") or []] + [a[k] for k in ("data", "eval_data") if a.get(k)]
        for src in srcs:
            source = str(src.get("source", ""))
            if source.startswith("hf:"):
                out.append(Repo(source[3:], "dataset", src.get("revision"), spec.name))
    return out


def plan_error_row(exc: OrchError, what: str) -> Check:
    """An OrchError while gathering a fact, as one failing row (the plan still prints)."""
    return Check("target", what, "an answer", "error", False, exc.message)
