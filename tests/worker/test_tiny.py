"""The tiny profile's tasks, seeded model ids and build progress (real tokenizers/transformers,
a 2-step build of a small spec: seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from state.errors import WorkerError
from tests.conftest import SMALL_TINY
from worker import tiny


def test_dup_answer_is_the_item_before_the_repeat_and_the_decoy_is_always_there() -> None:
    for row in tiny.mc_rows("dup", "test", 300):
        items = row["context"].split(" : ")[1].rstrip(" .").split()
        assert len(items) == 6
        repeated = [v for v in items if items.count(v) == 2]
        assert len(set(repeated)) == 1  # exactly one item occurs twice
        first, second = (i for i, v in enumerate(items) if v == repeated[0])
        assert first >= 1 and second - first >= 2
        choices, label = row["choices"], row["label"]
        assert choices[label] == items[second - 1]
        # what a bidirectional prompt confuses it with: the item before the first occurrence
        assert items[first - 1] in choices and len(set(choices)) == 4


def test_mixture_takes_the_tasks_in_turn_and_is_deterministic() -> None:
    rows = tiny.sft_rows("dup+arith+succ", "train", 6)
    assert [r["prompt"].split()[0] for r in rows] == ["dup", "sum", "count"] * 2
    assert rows == tiny.sft_rows("dup+arith+succ", "train", 6)
    assert rows != tiny.sft_rows("dup+arith+succ", "validation", 6)
    with pytest.raises(WorkerError, match="unknown tiny task"):
        tiny.mc_rows("dup+nope")


def test_seeded_ids() -> None:
    assert tiny.parse_uri("tiny://default") == tiny.SPECS["default"]
    assert tiny.parse_uri("tiny://default?seed=0") == tiny.SPECS["default"]  # the default seed
    three = tiny.parse_uri("tiny://default?seed=3")
    assert three.seed == 3 and three.key() != tiny.SPECS["default"].key()
    assert tiny.uri_for("default", 3) == "tiny://default?seed=3"
    assert tiny.parse_uri(tiny.uri_for("default", 3)) == three
    for bad in ("tiny://default?sed=3", "tiny://default?seed=x", "tiny://nope"):
        with pytest.raises(WorkerError):
            tiny.parse_uri(bad)


def test_a_build_says_how_far_along_it_is(tmp_path: Path) -> None:
    spec = tiny.TinySpec(**{**SMALL_TINY, "steps": 20})  # type: ignore[arg-type]
    lines: list[str] = []
    path = tiny.ensure_built(spec, root=tmp_path, progress=lines.append)
    assert (path / "tiny_spec.json").is_file()
    assert lines[0].startswith("building the tiny model (seed 0): pre-training 20 steps")
    assert any("step 10/20" in ln and "ETA" in ln for ln in lines)
    assert "step 20/20" in lines[-1]
    again: list[str] = []
    assert tiny.ensure_built(spec, root=tmp_path, progress=again.append) == path
    assert again == []  # cached: nothing to say


def test_a_stage_reports_the_build_in_its_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run on an uncached tiny model says what it is doing while it builds: the
    status message and info events carry the build's progress (what `--wait` shows)."""
    from state.protocol import read_events
    from worker import lifecycle

    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(tiny.SPECS, "small", tiny.TinySpec(**{**SMALL_TINY, "steps": 20}))  # type: ignore[arg-type]
    args = {
        "model": "tiny://small?seed=5",
        "device": "cpu",
        "dtype": "float32",
        "tasks": [{"name": "a", "source": "tiny:arith", "limit": 8}],
    }
    assert lifecycle.execute(tmp_path / "run", "eval", args) == 0
    infos = [e.message for e in read_events(tmp_path / "run") if e.kind == "info"]
    assert any(m.startswith("building the tiny model (seed 5): step 20/20") for m in infos)
