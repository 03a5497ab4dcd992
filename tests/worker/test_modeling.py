"""Model loading (local dirs, tiny://, checkpoints) and the tiny model's build and cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from state.errors import WorkerError
from state.worker_config import EvalArgs, TaskSource, TrainArgs
from worker import modeling, tiny

REPO = Path(__file__).resolve().parents[2]
MINI = tiny.TinySpec(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    train_tasks=("arith",),
    train_rows=200,
    steps=4,
    batch_size=8,
)


def test_tiny_default_is_a_normal_pretrained_dir(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert tiny_model_dir.parent == tiny.cache_root()
    assert tiny_model_dir.name == tiny.SPECS["default"].key()
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "mistral" and config.sliding_window is None
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (
        tok.pad_token_id is not None
        and tok.bos_token_id is not None
        and tok.eos_token_id is not None
    )
    assert tok.convert_ids_to_tokens(tok("k3 = v7")["input_ids"]) == ["<s>", "k3", "=", "v7"]
    assert tiny.resolve("tiny://default") == tiny_model_dir  # cached: no rebuild


def test_load_by_tiny_uri_and_by_directory(tiny_model_dir: Path) -> None:
    by_uri = modeling.load(EvalArgs(model="tiny://default", device="cpu"))
    by_dir = modeling.load(EvalArgs(model=str(tiny_model_dir), attn_implementation="eager"))
    assert by_uri.device == torch.device("cpu") and by_uri.dtype == torch.float32  # auto on CPU
    assert by_uri.model.config._attn_implementation == "sdpa"
    assert by_dir.model.config._attn_implementation == "eager"
    assert not by_uri.model.training
    a = dict(by_uri.model.named_parameters())
    for name, p in by_dir.model.named_parameters():
        assert torch.equal(p, a[name])
    model, tok, device = modeling.load_model_and_tokenizer(EvalArgs(dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16 and device.type == "cpu"


def test_unloadable_models_are_clear_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(WorkerError, match="does not exist"):
        modeling.load(EvalArgs(model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkerError, match="no config.json"):
        modeling.load(EvalArgs(model=str(tmp_path / "empty")))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WorkerError, match="cannot load model"):
        modeling.load(EvalArgs(model=str(broken)))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(WorkerError, match="cannot load model config"):
        modeling.load(EvalArgs(model=str(broken)))
    with pytest.raises(WorkerError, match="cannot load model config"):
        modeling.load(EvalArgs(model="no-such-org/no-such-model"))  # hub id, offline
    with pytest.raises(WorkerError, match="unknown tiny model"):
        modeling.load(EvalArgs(model="tiny://huge"))
    if not torch.cuda.is_available():
        with pytest.raises(WorkerError, match="no CUDA GPU"):
            modeling.load(EvalArgs(device="cuda"))
    with pytest.raises(WorkerError, match="flex_attention needs a CUDA"):
        modeling.load(EvalArgs(attn_implementation="flex_attention", device="cpu"))


def test_checkpoint_from_a_different_config_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = json.loads((tiny_model_dir / "config.json").read_text())
    with pytest.raises(WorkerError, match="hidden_size: 64 != expected 128"):
        modeling.load(EvalArgs(), expected_config={**other, "hidden_size": 128})
    modeling.load(EvalArgs(), expected_config=other)  # same architecture: fine
    with pytest.raises(WorkerError, match="num_hidden_layers"):
        modeling.check_config_matches(
            other, {**other, "num_hidden_layers": 7}, "checkpoint step 10"
        )


def test_training_load_keeps_fp32_weights() -> None:
    train = TrainArgs(data=TaskSource(name="s", source="tiny:arith", format="sft"))
    loaded = modeling.load(train, training=True)
    assert loaded.dtype == torch.float32 and loaded.tokenizer.pad_token_id is not None


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    tiny.build(MINI, a)
    tiny.build(MINI, b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_concurrent_builds_do_not_race(tmp_path: Path) -> None:
    """Two processes ask for the same uncached model at once: one builds, both get the same
    complete directory, no temp dirs are left."""
    code = (
        "import sys; from pathlib import Path; from worker import tiny; "
        "from tests.worker.test_modeling import MINI; "
        "print(tiny.ensure_built(MINI, Path(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path / MINI.key())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MINI.key(), f"{MINI.key()}.lock"])
    assert (tmp_path / MINI.key() / "tiny_spec.json").exists()


def test_spec_key_changes_with_the_recipe() -> None:
    assert MINI.key() != tiny.TinySpec().key()
    assert MINI.key() == tiny.TinySpec(**{**MINI.__dict__}).key()


def test_tokenizer_backend_is_explicit_and_recorded(tiny_model_dir) -> None:
    # transformers 5: mistral_format=False keeps the HF files even where a tekken.json and
    # mistral_common would switch AutoTokenizer to MistralCommonBackend; None = its own pick
    assert modeling._backend_kwargs("hf") == {"mistral_format": False}
    assert modeling._backend_kwargs("auto") == {}
    assert modeling._backend_kwargs("mistral-common") == {"mistral_format": True}
    args = EvalArgs(model=str(tiny_model_dir), device="cpu", dtype="float32")
    assert args.tokenizer_backend == "hf"
    info = modeling.load(args).tokenizer_info
    assert info == {
        "class": "TokenizersBackend",
        "is_fast": True,
        "backend": "hf",
        "requested": "hf",
    }
    # the tiny dir has no tekken.json: asking for mistral-common is one clear error
    with pytest.raises(WorkerError, match="tokenizer_backend 'mistral-common'"):
        modeling.load(args.model_copy(update={"tokenizer_backend": "mistral-common"}))
