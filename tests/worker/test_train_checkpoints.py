"""Checkpoints on disk: the latest COMPLETE step checkpoint is the one resumed, partial saves and
meta-less dirs are ignored, pruning goes by step number, and save -> restore brings back the
weights, optimizer, scheduler and RNG states of a real (tiny) model exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from state.errors import WorkerError
from state.worker_config import EvalArgs, TaskSource, TrainArgs
from worker import checkpoints as ck


def _fake_ckpt(ckdir: Path, name: str, *, meta: bool = True) -> Path:
    p = ckdir / name
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"not read by the listing")
    if meta:
        (p / ck.META).write_text(json.dumps({"step": name}))
    return p


def test_latest_complete_checkpoint_ignores_incomplete_ones(tmp_path: Path) -> None:
    ckdir = tmp_path / "checkpoints"
    assert ck.latest_checkpoint(ckdir) is None  # no dir yet: a fresh run
    for name in ("step-2", "step-9", "step-10", "step-x", ck.FINAL):
        _fake_ckpt(ckdir, name)
    _fake_ckpt(ckdir, "step-12", meta=False)  # no meta.json: not complete
    _fake_ckpt(ckdir, ".step-14.tmp")  # a save cut short before its rename
    (ckdir / "step-20").write_text("a file, not a checkpoint dir")

    # numeric order (step-10 after step-9), only complete step-N dirs
    assert [s for s, _ in ck.checkpoint_dirs(ckdir)] == [2, 9, 10]
    assert ck.latest_checkpoint(ckdir) == (10, ckdir / "step-10")

    assert ck.remove_partial_saves(ckdir) == [ckdir / ".step-14.tmp"]
    assert not (ckdir / ".step-14.tmp").exists()
    assert ck.prune_checkpoints(ckdir, keep=2) == [ckdir / "step-2"]
    assert [s for s, _ in ck.checkpoint_dirs(ckdir)] == [9, 10]
    assert ck.remove_step_checkpoints(ckdir) == [ckdir / "step-9", ckdir / "step-10"]
    assert ck.latest_checkpoint(ckdir) is None
    assert (ckdir / ck.FINAL / ck.META).is_file(), "the final model must survive"


def test_config_hash_ignores_key_order_and_check_names_the_difference(tmp_path: Path) -> None:
    args = TrainArgs(model="m", data=TaskSource(name="d", source="tiny:recall"), lr=1e-3)
    cfg = ck.config_of(args, world_size=2)
    assert set(cfg) == {*ck.CONFIG_KEYS, "world_size"} and cfg["world_size"] == 2
    assert ck.config_hash(dict(reversed(list(cfg.items())))) == ck.config_hash(cfg)
    # args that do not change the trajectory do not change the hash
    quiet = args.model_copy(update={"log_every": 7, "heartbeat_s": 1.0})
    assert ck.config_hash(ck.config_of(quiet, 2)) == ck.config_hash(cfg)

    meta = {"config": cfg, "config_hash": ck.config_hash(cfg)}
    ck.check_resumable(meta, cfg, tmp_path)  # same config: accepted
    other = ck.config_of(args.model_copy(update={"lr": 2e-3}), world_size=1)
    with pytest.raises(WorkerError, match=r"differs in: lr, world_size"):
        ck.check_resumable(meta, other, tmp_path)


def test_rng_state_round_trip() -> None:
    state = ck.rng_state()
    first = (random.random(), torch.rand(3).tolist())
    ck.set_rng_state(state)
    assert (random.random(), torch.rand(3).tolist()) == first


def _load(model_dir: Path):
    from worker import modeling

    return modeling.load(EvalArgs(model=str(model_dir), device="cpu", dtype="float32"))


def test_save_and_restore_are_exact(tmp_path: Path, tiny_model_dir: Path) -> None:
    from worker.optimizer import build_optimizer

    args = TrainArgs(
        model=str(tiny_model_dir),
        data=TaskSource(name="d", source="tiny:recall"),
        lr=1e-2,
        warmup_steps=1,
        max_steps=10,
    )
    cfg = ck.config_of(args, world_size=1)
    a = _load(tiny_model_dir)
    opt_a, sched_a = build_optimizer(a.model, args)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    for _ in range(2):  # two real AdamW steps: non-trivial moments and a moved schedule
        a.model(input_ids=ids, labels=ids).loss.backward()
        opt_a.step()
        sched_a.step()
        opt_a.zero_grad(set_to_none=True)

    ckdir = tmp_path / "checkpoints"
    (ckdir / ".step-2.tmp").mkdir(parents=True)  # debris of an earlier killed save
    meta = {"step": 2, "data_pos": 2, "config": cfg, "config_hash": ck.config_hash(cfg)}
    state = ck.trainer_state(opt_a, sched_a)
    path = ck.save_checkpoint(ckdir, "step-2", a.model, a.tokenizer, meta, state)
    assert path == ckdir / "step-2" and not (ckdir / ".step-2.tmp").exists()
    assert {ck.META, ck.TRAINER_STATE, "config.json"} <= {p.name for p in path.iterdir()}
    expected_draw = torch.rand(4)  # what the run would draw next after saving

    b = _load(tiny_model_dir)  # the starting weights, as a relaunched run has them
    opt_b, sched_b = build_optimizer(b.model, args)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(b.model.named_parameters())[name], a.model.state_dict()[name])
    torch.rand(100)  # move the RNG: restore must put it back
    got = ck.restore(path, cfg, b.model, opt_b, sched_b)
    assert got == meta
    assert torch.equal(torch.rand(4), expected_draw)
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    assert sched_b.last_epoch == sched_a.last_epoch == 2
    assert sched_b.get_last_lr() == sched_a.get_last_lr()
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)

    # A checkpoint saved under another config is refused before anything is loaded.
    other = {**cfg, "lr": 5e-3}
    with pytest.raises(WorkerError, match="different config"):
        ck.restore(path, other, b.model, opt_b, sched_b)


def test_load_weights_without_safetensors_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "step-3").mkdir()
    with pytest.raises(WorkerError, match="no \\*.safetensors") as info:
        ck.load_weights(torch.nn.Linear(2, 2), tmp_path / "step-3")
    assert "delete the broken checkpoint" in (info.value.hint or "")
