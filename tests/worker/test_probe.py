"""The leakage guard, both layers, on a tiny model (CPU, real transformers).

(a) structural: the mask built for a real batch refuses full_bidir, passes prefix and causal;
(b) numeric: a forced full_bidir run is caught within a bounded number of steps (stopped with
exit LEAKAGE, or flagged and continued with allow_leaky), while prefix and causal runs with the
same data and steps are never flagged; `python -m worker probe` reports the collapse on the
leaky run's weights and nothing on the starting weights.

The data are prompt/response pairs with random-word responses: causally unpredictable, so a
mask that shows a position its own label is the only way to a low loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from state import names
from state.models import RunFailed, RunStatus
from state.phases import WorkerExit
from state.protocol import read_events, read_model
from tests.worker.test_train import random_sft, small_model, train_args  # noqa: F401 - fixture
from worker import lifecycle

#: The numeric probe must flag a full_bidir run by this step (measured here: step 60).
LEAK_BOUND = 150


@pytest.fixture(scope="module")
def leak_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("leakdata")
    return {
        "data": random_sft(d / "train.jsonl", 400, seed=1, resp_words=6, prompt_words=4),
        "eval_data": random_sft(d / "val.jsonl", 16, seed=2, resp_words=6, prompt_words=4),
    }


def leak_args(model: str, data: dict[str, Any], **over: Any) -> dict[str, Any]:
    # Constant LR: the trajectory up to step N does not depend on max_steps.
    return train_args(
        model, **data, lr=1e-2, lr_schedule="constant", warmup_steps=2, probe_every=10,
        eval_every=1000, eval_batches=1, batch_size=8, **over,
    )  # fmt: skip


def probes(run_dir: Path) -> list[dict[str, Any]]:
    return [{"step": e.step, **e.data} for e in read_events(run_dir) if e.kind == "probe"]


@pytest.mark.parametrize("mode", ["full_bidir", "prefix", "causal"])
def test_structural_check_on_a_real_batch(tmp_path: Path, small_model: str, mode: str) -> None:  # noqa: F811
    rd = tmp_path / "r"
    args = train_args(small_model, mask=mode, max_steps=1, eval_every=100, probe_every=100)
    code = lifecycle.execute(rd, "train", args)
    if mode == "full_bidir":
        assert code == WorkerExit.LEAKAGE
        failed = read_model(rd / names.RUN_FAILED, RunFailed).value
        assert (
            "label leakage" in failed.reason
            and "refusing to train with mask full_bidir" in failed.reason
        )
        assert failed.error_type == "LeakageError" and not (rd / names.RUN_COMPLETE).exists()
        assert not (rd / "checkpoints").exists(), "trained before the guard"
    else:
        assert code == 0
        s = json.loads((rd / names.SUMMARY).read_text())
        assert s["structural_check"] == ("passed" if mode == "prefix" else "n/a (causal)")


@pytest.mark.slow
def test_numeric_probe_stops_a_leaky_run(tmp_path: Path, small_model: str, leak_data: dict) -> None:  # noqa: F811
    rd = tmp_path / "r"
    args = leak_args(
        small_model, leak_data, mask="full_bidir", structural_check=False, max_steps=LEAK_BOUND
    )
    code = lifecycle.execute(rd, "train", args)
    assert code == WorkerExit.LEAKAGE
    failed = read_model(rd / names.RUN_FAILED, RunFailed).value
    ps = probes(rd)
    last = ps[-1]
    assert last["leak"] is True and not any(p["leak"] for p in ps[:-1])
    assert last["step"] <= LEAK_BOUND
    assert "label leakage" in failed.reason
    assert (
        f"{last['loss_mask']:.4f}" in failed.reason
        and f"{last['loss_causal']:.4f}" in failed.reason
    )
    assert last["loss_mask"] < 0.5 * last["loss_causal"]
    assert read_model(rd / names.STATUS, RunStatus).value.leak_flag is True
    assert not (rd / names.RUN_COMPLETE).exists()


@pytest.mark.slow
def test_allow_leaky_flags_continues_and_probe_cli_sees_it(
    tmp_path: Path,
    small_model: str,  # noqa: F811
    leak_data: dict,
) -> None:
    rd = tmp_path / "leaky"
    args = leak_args(small_model, leak_data, mask="full_bidir", allow_leaky=True, max_steps=70)
    assert lifecycle.execute(rd, "train", args) == 0  # the seed's failed run, reproduced on purpose
    s = json.loads((rd / names.SUMMARY).read_text())
    assert s["leak_flag"] is True and s["first_leak_step"] <= 70
    assert s["structural_check"].startswith("failed (allowed")
    assert s["probe"]["leak"] is True
    assert read_model(rd / names.STATUS, RunStatus).value.leak_flag is True

    def run_probe(model: str, where: Path) -> dict[str, Any]:
        pargs = {
            "model": model,
            "data": leak_data["eval_data"],
            "mask": "full_bidir",
            "samples": 16,
        }
        assert lifecycle.execute(where, "probe", pargs) == 0
        return json.loads((where / names.METRICS).read_text())

    after = run_probe(str(rd / "checkpoints" / "final"), tmp_path / "probe-after")
    before = run_probe(small_model, tmp_path / "probe-before")
    assert after["leak"] is True and after["loss_mask"] < 0.5 * after["loss_causal"]
    # On the starting weights the leak does not show: the model never learned to use it.
    assert before["leak"] is False and before["samples"] == 16
    assert (tmp_path / "probe-after" / names.RUN_COMPLETE).exists()


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "steps"), [("prefix", 70), ("causal", 20)])
def test_prefix_and_causal_runs_are_never_flagged(
    tmp_path: Path,
    small_model: str,  # noqa: F811
    leak_data: dict,
    mode: str,
    steps: int,
) -> None:
    rd = tmp_path / "r"
    assert (
        lifecycle.execute(
            rd, "train", leak_args(small_model, leak_data, mask=mode, max_steps=steps)
        )
        == 0
    )
    ps = probes(rd)
    assert len(ps) == steps // 10 and not any(p["leak"] for p in ps)
    assert all(p["ratio"] > 0.8 for p in ps)
    s = json.loads((rd / names.SUMMARY).read_text())
    assert s["leak_flag"] is False and s["first_leak_step"] is None
