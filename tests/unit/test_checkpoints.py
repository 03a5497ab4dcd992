"""Step checkpoints seen from the controller: which are complete, which one a relaunch resumes
from, and pruning of the pulled copy."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.checkpoints import Checkpoint, local_checkpoints, newest, prune_local, step_of


def test_step_of_reads_only_step_dirs() -> None:
    assert step_of("step-12") == 12
    assert step_of("step-0") == 0
    for other in ("final", ".step-12.tmp", "step-", "step-x", "step-12-old"):
        assert step_of(other) is None, other


def test_newest_takes_the_highest_step_and_prefers_the_box_on_a_tie() -> None:
    box8 = Checkpoint(8, "step-8", "box", "/w/runs/a/b/checkpoints/step-8")
    lap8 = Checkpoint(8, "step-8", "laptop", "/home/r/runs/a/b/checkpoints/step-8")
    lap12 = Checkpoint(12, "step-12", "laptop", "/home/r/runs/a/b/checkpoints/step-12")
    assert newest([]) is None
    assert newest([box8, lap12]) == lap12
    assert newest([lap8, box8]) == box8
    assert newest([box8, lap8]) == box8
    assert "surviving disk" in box8.describe() and "pulled" in lap8.describe()


def test_local_checkpoints_skip_incomplete_and_broken_ones(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    for name, meta in (
        ("step-4", json.dumps({"step": 4})),
        ("step-8", json.dumps({"step": 8})),
        ("step-12", None),  # cut off before meta.json: incomplete
        ("step-16", "{not json"),  # cut off mid-pull
        (".step-20.tmp", json.dumps({"step": 20})),  # a save in progress
        ("final", json.dumps({})),
    ):
        (ck / name).mkdir(parents=True)
        if meta is not None:
            (ck / name / "meta.json").write_text(meta)
    found = local_checkpoints(tmp_path)
    assert sorted(c.step for c in found) == [4, 8]
    assert all(c.where == "laptop" for c in found)
    best = newest(found)
    assert best is not None and best.name == "step-8" and best.path == str(ck / "step-8")
    assert local_checkpoints(tmp_path / "nothing-pulled") == []


def test_prune_local_keeps_the_newest_complete_and_a_newer_one_arriving(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    for step, complete in ((4, True), (6, False), (8, True), (12, True), (16, False)):
        (ck / f"step-{step}").mkdir(parents=True)
        if complete:
            (ck / f"step-{step}" / "meta.json").write_text("{}")
    (ck / "final").mkdir()
    assert prune_local(tmp_path, keep=2) == ["step-4", "step-6"]
    left = sorted(p.name for p in ck.iterdir())
    # step-16 has no meta.json yet but is newer than every complete one: still arriving.
    assert left == ["final", "step-12", "step-16", "step-8"]
    assert prune_local(tmp_path, keep=1) == ["step-8"]
    assert prune_local(tmp_path / "none", keep=2) == []
