"""`state.footprint` and `state.runtime_contract`: parameter counts against transformers' own
model classes (built on the meta device: no weights), the checkpoint sizes the issue quotes for
Ministral 3B, and the version floors of the runtime contract."""

from __future__ import annotations

import pytest

from jobs.profiles import MINISTRAL_3B, MINISTRAL_3B_TEXT_CONFIG, TINY
from state import footprint, runtime_contract
from state.footprint import GB, FootprintError, ModelShape


def _meta_params(config_cls: str, model_cls: str, cfg: dict) -> tuple[int, int]:
    torch = pytest.importorskip("torch")
    import transformers

    keys = {k: v for k, v in cfg.items() if k != "model_type"}
    config = getattr(transformers, config_cls)(**keys)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


def test_parameters_match_transformers_for_the_real_ministral_and_the_tiny_model() -> None:
    shape = ModelShape.from_config(
        {"model_type": "mistral3", "text_config": MINISTRAL_3B_TEXT_CONFIG}
    )
    n, tensors = _meta_params("Ministral3Config", "Ministral3ForCausalLM", MINISTRAL_3B_TEXT_CONFIG)
    assert shape.parameters == n == 3_429_006_336  # the card's "3.4B language model"
    assert shape.tensors == tensors
    tiny = ModelShape.from_config(TINY.plan.base_config)
    n, tensors = _meta_params("MistralConfig", "MistralForCausalLM", TINY.plan.base_config)
    assert (tiny.parameters, tiny.tensors) == (n, tensors)


def test_a_ministral_step_checkpoint_is_about_41_gb_and_the_peak_counts_the_one_being_written() -> (
    None
):
    shape = ModelShape.from_config(MINISTRAL_3B.plan.base_config)
    step = footprint.checkpoint_bytes(shape.parameters, "float32", tensors=shape.tensors)
    final = footprint.checkpoint_bytes(shape.parameters, "float32", optimizer=False)
    assert 41.0 * GB < step < 41.3 * GB  # fp32 weights + AdamW's two fp32 moments = 12 B/param
    assert 13.7 * GB < final < 13.8 * GB
    # prune before save (worker.checkpoints): keep_checkpoints=2 is one complete one plus the
    # one being written (82 GB, not the 123 GB); keep=1 keeps the previous one until
    # the new one is complete (also 2); keep=3 is 3; final/ is written beside one step only
    assert footprint.checkpoints_peak_bytes(step, 2, final) == 2 * step
    assert footprint.checkpoints_peak_bytes(step, 1, final) == 2 * step
    assert footprint.checkpoints_peak_bytes(step, 3, final) == 3 * step
    assert footprint.checkpoints_peak_bytes(step, 2, final, saves=1) == step + final
    assert footprint.checkpoints_peak_bytes(step, 2, final, saves=0) == final


def test_training_memory_of_the_ministral_profile_fits_80_gb_and_not_24() -> None:
    shape = ModelShape.from_config(MINISTRAL_3B.plan.base_config)
    m = footprint.train_memory(shape, batch_size=8, seq_len=1024, weight_dtype="float32",
                               autocast_bf16=True, gradient_checkpointing=True)  # fmt: skip
    assert m.weights == m.gradients == shape.parameters * 4
    assert m.optimizer == pytest.approx(shape.parameters * 8, rel=1e-6)
    assert 50 * GB < m.total < 0.92 * 80 * GB and m.phase in {"loss", "step"}
    off = footprint.train_memory(shape, batch_size=8, seq_len=1024, weight_dtype="float32",
                                 autocast_bf16=True, gradient_checkpointing=False)  # fmt: skip
    assert off.total > 0.92 * 80 * GB  # without checkpointing it does not fit an 80 GB card


def test_a_config_without_sizes_is_refused_naming_the_key() -> None:
    with pytest.raises(FootprintError, match="'hidden_size'"):
        ModelShape.from_config({"vocab_size": 10, "num_attention_heads": 2})
    with pytest.raises(FootprintError, match="unknown dtype 'int4'"):
        footprint.dtype_bytes("int4")


@pytest.mark.parametrize(
    ("python", "torch", "transformers", "bad"),
    [
        ("3.11.10", "2.6.0+cu124", "5.24.0", []),
        ("3.10.12", "2.6.0", "5.0.0", ["python 3.10.12 is older than 3.11"]),
        ("3.11.10", "2.5.1+cu124", "5.24.0", ["torch 2.5.1+cu124 is older than 2.6"]),
        ("3.11.2", "2.6.0", "4.57.1", ["transformers 4.57.1 is older than 5.0"]),
    ],
)
def test_the_runtime_contract(python: str, torch: str, transformers: str, bad: list[str]) -> None:
    got = runtime_contract.check_versions(python=python, torch=torch, transformers=transformers)
    assert len(got) == len(bad) and all(b in g for b, g in zip(bad, got, strict=True))
    assert all(runtime_contract.DEFAULT_IMAGE in g for g in got if "transformers" not in g)


def test_an_image_tag_with_an_old_torch_is_refused_before_renting() -> None:
    old = runtime_contract.image_problem("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel")
    assert old and "torch 2.5.1 is older than 2.6" in old
    assert runtime_contract.image_problem(runtime_contract.DEFAULT_IMAGE) is None
    assert runtime_contract.image_torch("vastai/pytorch:2.7.1-cuda-12.8.1-py311") == "2.7.1"
    assert runtime_contract.image_problem("ghcr.io/me/custom:latest") is None  # cannot tell
    from orchestrator.config import VastTarget

    assert VastTarget().image == runtime_contract.DEFAULT_IMAGE
    assert runtime_contract.image_problem(VastTarget().image) is None
