"""The runtime contract where the worker runs (`worker.runtime`): version and CUDA problems are
one line each naming the fix, the start check passes here, and a run records the versions and
the tokenizer class it really loaded in its events and result file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from state import names
from state.errors import WorkerError
from state.protocol import read_events
from worker import lifecycle, runtime

GOOD = {
    "python": "3.11.7",
    "torch": "2.6.0+cu124",
    "transformers": "5.24.0",
    "ministral3": True,
    "cuda_build": "12.4",
    "cuda_available": True,
    "gpus": ["NVIDIA H100 80GB HBM3"],
}


def test_a_good_environment_has_no_problems() -> None:
    assert runtime.problems(GOOD, "cuda") == []
    assert runtime.problems({**GOOD, "cuda_available": False, "gpus": []}, "auto") == []


@pytest.mark.parametrize(
    ("over", "device", "needle"),
    [
        ({"python": "3.10.12"}, "auto", "python 3.10.12 is older than 3.11"),
        ({"torch": "2.5.1+cu124"}, "auto", "torch 2.5.1+cu124 is older than 2.6"),
        ({"torch": None}, "auto", "torch is not installed"),
        ({"transformers": "4.57.1"}, "auto", "transformers 4.57.1 is older than 5.0"),
        ({"transformers": None}, "auto", "transformers is not installed"),
        ({"ministral3": False}, "auto", "has no ministral3 model type"),
        ({"cuda_available": False, "cuda_build": None}, "cuda", "is a CPU-only build"),
        ({"cuda_available": False}, "cuda", "sees no GPU"),
    ],
)
def test_each_problem_is_one_line_with_its_fix(over: dict, device: str, needle: str) -> None:
    (line,) = runtime.problems({**GOOD, **over}, device)
    assert needle in line and "\n" not in line
    fixes = ("use an image", "reinstall", "run `orch up`", "device = 'cpu'")
    assert any(f in line for f in fixes), line


def test_start_check_passes_here_and_records_versions() -> None:
    class Events:
        def __init__(self) -> None:
            self.seen: list[tuple[str, str, dict]] = []

        def event(self, kind: str, message: str = "", **data: object) -> None:
            self.seen.append((kind, message, data))

    from state.worker_config import EvalArgs

    ev = Events()
    env = runtime.start_check(EvalArgs(device="cpu"), ev)
    import torch
    import transformers

    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["ministral3"] is True
    kind, message, data = ev.seen[0]
    assert kind == "info" and message.startswith("runtime: python ") and data["runtime"] == env
    info = runtime.note_tokenizer(object())
    assert info["class"] == "object" and runtime.report()["tokenizers"] == [info]
    assert "status" not in runtime.report()


def test_start_check_refuses_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from state.worker_config import EvalArgs

    monkeypatch.setattr(
        runtime, "environment", lambda: {**GOOD, "cuda_available": False, "cuda_build": None}
    )
    with pytest.raises(WorkerError, match="runtime contract: device 'cuda' requested") as e:
        runtime.start_check(EvalArgs(device="cuda"))
    assert e.value.hint and "\n" not in str(e.value)


def test_a_run_fails_at_start_with_bad_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "environment", lambda: {**GOOD, "torch": "2.5.1+cu124"})
    rd = tmp_path / "r"
    args = {"tasks": [{"name": "t", "source": "tiny:recall", "limit": 4}]}
    code = lifecycle.execute(rd, "eval", args)
    assert code == 2
    failed = json.loads((rd / names.RUN_FAILED).read_text())
    assert "torch 2.5.1+cu124 is older than 2.6" in failed["reason"]
    assert not (rd / names.METRICS).exists()


def test_a_train_run_records_versions_and_the_tokenizer_class(
    tmp_path: Path, small_model: str
) -> None:
    from tests.worker.test_train import train_args

    rd = tmp_path / "r"
    args = train_args(small_model, max_steps=2, device="cpu", eval_every=100, probe_every=100)
    assert lifecycle.execute(rd, "train", args) == 0
    rt = json.loads((rd / names.SUMMARY).read_text())["runtime"]
    assert rt["python"] and rt["torch"] and rt["transformers"] and rt["device"] == "cpu"
    (tok,) = rt["tokenizers"]
    assert tok["class"] and tok["module"].startswith("transformers."), tok
    infos = [e for e in read_events(rd) if e.kind == "info"]
    assert any(e.message.startswith("runtime: ") for e in infos)
    assert any(e.message.startswith(f"tokenizer: {tok['class']}") for e in infos)
