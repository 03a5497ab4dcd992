"""Checkpoints that fit (worker.checkpoints): pruning comes before saving, so a tiny training
run never has more than max(keep_checkpoints, 2) step dirs on disk (the one being written
included), observed on disk at the moment each save completes its files; final/ is weights and
tokenizer only unless asked; a save the free disk cannot hold is refused before anything is
written, with the numbers; and the footprint estimate plan uses agrees with the rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from state import footprint, names
from state.models import RunFailed
from state.phases import WorkerExit
from state.protocol import read_events, read_model
from tests.worker.test_train import train_args
from worker import checkpoints as ck
from worker import lifecycle

MAX_STEPS = 7


def _watch_saves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """(checkpoint being written, every entry of checkpoints/) at the moment each save writes
    its meta.json: its last file, when its data is all on disk beside the old ones."""
    seen: list[tuple[str, list[str]]] = []
    real = ck.atomic_write_json

    def spy(path: Path, data: Any) -> None:
        path = Path(path)
        if path.name == ck.META and path.parent.name.endswith(".tmp"):
            seen.append((path.parent.name, sorted(p.name for p in path.parent.parent.iterdir())))
        real(path, data)

    monkeypatch.setattr(ck, "atomic_write_json", spy)
    return seen


def _run(tmp_path: Path, model: str, **over: Any) -> Path:
    rd = tmp_path / "r"
    args = train_args(model, max_steps=MAX_STEPS, eval_every=100, probe_every=100, **over)
    assert lifecycle.execute(rd, "train", args) == 0, (rd / names.RUN_FAILED).read_text()
    return rd


def _steps(entries: list[str]) -> list[str]:
    return [e for e in entries if e.startswith("step-") or e.startswith(".step-")]


@pytest.mark.parametrize(("keep", "save_every"), [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_peak_step_checkpoints_on_disk_follow_the_prune_before_save_rule(
    tmp_path: Path, small_model: str, monkeypatch: pytest.MonkeyPatch, keep: int, save_every: int
) -> None:
    seen = _watch_saves(monkeypatch)
    rd = _run(tmp_path, small_model, keep_checkpoints=keep, save_every=save_every)
    saves = list(range(save_every, MAX_STEPS, save_every))  # never at the last step
    step_saves = [(name, entries) for name, entries in seen if name != ".final.tmp"]
    assert [name for name, _ in step_saves] == [f".step-{s}.tmp" for s in saves]
    old_kept = max(keep - 1, 1)  # complete ones beside the one being written
    for k, (name, entries) in enumerate(step_saves):
        expected_old = [f"step-{s}" for s in saves[:k][-old_kept:]] if k else []
        assert sorted(_steps(entries)) == sorted([*expected_old, name]), (name, entries)
    peak = max(len(_steps(entries)) for _, entries in step_saves)
    assert peak == min(len(saves), max(keep, 2))
    assert peak == footprint.checkpoints_peak_bytes(1, keep, 0, saves=len(saves))
    # final/ is written beside the newest step checkpoint only, then the step ones go
    final_name, final_entries = seen[-1]
    assert final_name == ".final.tmp" and _steps(final_entries) == [f"step-{saves[-1]}"]
    ckdir = rd / names.CHECKPOINTS
    assert sorted(p.name for p in ckdir.iterdir()) == [ck.FINAL]
    assert not (ckdir / ck.FINAL / ck.TRAINER_STATE).exists()  # weights + tokenizer only
    assert list((ckdir / ck.FINAL).glob("*.safetensors"))
    assert (ckdir / ck.FINAL / "tokenizer_config.json").is_file()
    # after every save the newest `keep` complete ones survive (the pruned names say so)
    pruned = [
        p for e in read_events(rd) if e.kind == "checkpoint" for p in e.data.get("pruned", [])
    ]
    assert pruned == [f"step-{s}" for s in saves[: max(0, len(saves) - keep)]]
    summary = json.loads((rd / names.SUMMARY).read_text())
    assert summary["final_weights_only"] is True


def test_final_with_optimizer_state_when_asked(tmp_path: Path, small_model: str) -> None:
    rd = _run(tmp_path, small_model, save_every=1000, final_weights_only=False)
    assert (rd / names.CHECKPOINTS / ck.FINAL / ck.TRAINER_STATE).is_file()


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(
    tmp_path: Path, small_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage

    def tight(path: Any) -> Any:
        usage = real(path)
        if Path(path).name == names.CHECKPOINTS:
            return usage._replace(free=10_000_000)  # 10 MB: less than the margin alone
        return usage

    monkeypatch.setattr(shutil, "disk_usage", tight)
    rd = tmp_path / "r"
    args = train_args(small_model, max_steps=3, save_every=1, eval_every=100, probe_every=100)
    assert lifecycle.execute(rd, "train", args) == WorkerExit.BAD_INPUT
    failed = read_model(rd / names.RUN_FAILED, RunFailed).value
    assert "not enough disk for checkpoint step-1: it needs about" in failed.reason
    assert "10.0 MB free" in failed.reason and "keep_checkpoints" in failed.reason
    assert list((rd / names.CHECKPOINTS).iterdir()) == []  # nothing half-written


def test_the_estimate_matches_a_saved_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch

    from state.worker_config import EvalArgs, TaskSource, TrainArgs
    from worker import modeling
    from worker.optimizer import build_optimizer

    loaded = modeling.load(EvalArgs(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    model = loaded.model
    args = TrainArgs(model=str(tiny_model_dir), data=TaskSource(name="d", source="tiny:dup"))
    opt, sched = build_optimizer(model, args)
    model.train()
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = ck.trainer_state(opt, sched)
    need, how = ck.checkpoint_estimate(tmp_path, model, state)
    assert how.startswith("estimated")
    path = ck.save_checkpoint(tmp_path, "step-1", model, loaded.tokenizer, {"step": 1}, state)
    tok_files = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("tokenizer"))
    actual = ck.dir_bytes(path) - tok_files
    assert abs((need - ck.TOKENIZER_ALLOWANCE) - actual) < 0.15 * actual, (need, actual)
    # the next save is sized from this one on disk (weights-only: less its trainer_state.pt)
    assert ck.checkpoint_estimate(tmp_path, model, state) == (
        ck.dir_bytes(path),
        "as step-1 on disk",
    )
    light, _ = ck.checkpoint_estimate(tmp_path, model, None)
    assert light == ck.dir_bytes(path) - (path / ck.TRAINER_STATE).stat().st_size
