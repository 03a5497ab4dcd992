"""The `ministral-3b` profile's model, loaded from local files: a tiny random checkpoint with the
config structure of `mistralai/Ministral-3-3B-Base-2512` (a vision+text
`Mistral3ForConditionalGeneration`, model_type `mistral3`, whose text_config is a `ministral3`
decoder with YaRN rope and Llama-4 attention scaling, tied embeddings; a byte-level BPE
`tokenizer.json`), built offline with transformers' own classes.

`AutoModelForCausalLM` refuses that config, so `worker.modeling.load` takes the text decoder out
as a `Ministral3ForCausalLM`; these tests check that it is the same network as the full model,
that our custom masks reach its attention in causal and prefix mode (eager and sdpa), and that a
fine-tuned `checkpoints/final` of it loads back (stage 4).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.profiles import MINISTRAL_3B_ID, get_profile
from jobs.stages import get_stage
from state import names
from state.errors import WorkerError
from state.phases import MaskMode
from state.worker_config import EvalArgs
from worker import lifecycle, masks, modeling, tiny

# The real checkpoint's text_config, sizes shrunk (26 layers, hidden 3072, intermediate 9216,
# 32/8 heads of 128, vocab 131072 in the real one); every key and the rope block as published.
ROPE = {
    "type": "yarn",
    "rope_type": "yarn",
    "rope_theta": 1000000.0,
    "factor": 16.0,
    "original_max_position_embeddings": 16384,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
# Mistral's control tokens first (<unk>=0, <s>=1, </s>=2, [IMG]=10, <pad>=11), as in Tekken
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]"]
SPECIALS += ["[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]"]
SPECIALS += ["[IMG]", "<pad>"]


def _tokenizer():
    """A byte-level BPE tokenizer.json (the real one's kind) trained on the tiny tasks' text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [r["prompt"] + r["response"] for r in tiny.sft_rows("recall", "train", 200)]
    tok.train_from_iterator(text + [" ".join(tiny.task_words())], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=262144,
    )


@pytest.fixture(scope="module")
def ministral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        Ministral3Config,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralVisionConfig,
    )

    dest = tmp_path_factory.mktemp("ministral-3-tiny")
    tok = _tokenizer()
    assert tok.convert_tokens_to_ids(["[IMG]", "<pad>"]) == [10, 11]
    text = Ministral3Config(
        vocab_size=448,  # > len(tok): the real vocab is padded too
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=262144,
        rope_parameters=dict(ROPE),
        tie_word_embeddings=True,
        sliding_window=None,
        pad_token_id=11,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
        image_size=56,
        patch_size=14,
    )
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=10,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    Mistral3ForConditionalGeneration(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _load(path: Path | str, impl: str = "sdpa", dtype: str = "float32") -> modeling.Loaded:
    return modeling.load(
        EvalArgs(model=str(path), attn_implementation=impl, device="cpu", dtype=dtype)
    )


def _batch(vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 full, row 1 right padded; prompts of 5 tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(12, vocab, (2, 12), generator=gen)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 9:] = 0
    ids[1, 9:] = 11
    return ids, am, torch.tensor([5, 5])


def test_replica_has_the_real_config_structure(ministral_dir: Path) -> None:
    cfg = json.loads((ministral_dir / "config.json").read_text())
    assert cfg["model_type"] == "mistral3"
    assert cfg["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "ministral3"
    assert cfg["vision_config"]["model_type"] == "pixtral"
    assert cfg["text_config"]["rope_parameters"]["llama_4_scaling_beta"] == 0.1
    assert cfg["text_config"]["tie_word_embeddings"] is True
    assert (ministral_dir / "tokenizer.json").exists()
    # why modeling needs a text-only path at all
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(ministral_dir)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_loads_text_only_as_the_same_network(ministral_dir: Path, impl: str) -> None:
    from transformers import AutoModelForImageTextToText

    loaded = _load(ministral_dir, impl)
    model = loaded.model
    assert type(model).__name__ == "Ministral3ForCausalLM"
    assert model.config.model_type == "ministral3"
    assert model.config._attn_implementation == impl and not model.training
    assert not any("vision" in n or "projector" in n for n, _ in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the original
    assert loaded.tokenizer.pad_token_id == 11 and loaded.tokenizer.bos_token_id == 1
    full = AutoModelForImageTextToText.from_pretrained(
        ministral_dir, dtype=torch.float32, attn_implementation=impl
    ).eval()
    ids, am, _ = _batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=am).logits
        ref = full(input_ids=ids, attention_mask=am).logits
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_custom_masks_reach_attention(ministral_dir: Path, impl: str) -> None:
    model = _load(ministral_dir, impl).model
    masks.verify_mask_path(model)  # causal == own forward; prefix really used (raises if not)
    ids, am, plens = _batch()
    real = am.bool()
    with torch.no_grad():
        causal = masks.forward(model, ids, am, plens, MaskMode.CAUSAL)
        own = model(input_ids=ids, attention_mask=am).logits
        prefix = masks.forward(model, ids, am, plens, "prefix")
        # the prefix property: other response tokens leave the prompt's logits unchanged
        other = ids.clone()
        other[0, 5:] = (other[0, 5:] + 7) % 300 + 12
        other[1, 5:9] = (other[1, 5:9] + 7) % 300 + 12
        prefix2 = masks.forward(model, other, am, plens, "prefix")
        leaky = masks.forward(model, ids, am, plens, "full_bidir")
        leaky2 = masks.forward(model, other, am, plens, "full_bidir")
    assert torch.allclose(causal[real], own[real], atol=1e-5)
    assert (prefix[:, :4] - causal[:, :4]).abs().max() > 1e-3  # prompt sees its later tokens
    assert torch.allclose(prefix[:, :5], prefix2[:, :5], atol=1e-6)
    assert (leaky[:, :5] - leaky2[:, :5]).abs().max() > 1e-3  # the check above can fail


def test_left_padding_matches_the_unpadded_row(ministral_dir: Path) -> None:
    # position ids count real tokens, so rotary phases and the Llama-4 query scaling match
    model = _load(ministral_dir).model
    ids, _, _ = _batch()
    row = ids[:1, :9]
    padded = torch.cat([torch.full((1, 3), 11), row], dim=1)
    am = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = masks.forward(model, row, torch.ones_like(row), torch.tensor([5]), "prefix")
        left = masks.forward(model, padded, am, torch.tensor([5]), "prefix")
    assert torch.allclose(left[0, 3:], alone[0], atol=1e-5)


def test_bfloat16_load(ministral_dir: Path) -> None:
    loaded = _load(ministral_dir, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    ids, am, plens = _batch()
    with torch.no_grad():
        logits = masks.forward(loaded.model, ids, am, plens, "prefix")
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_profile_args_load_the_local_replica(ministral_dir: Path) -> None:
    profile = get_profile("ministral-3b")
    assert profile.model == MINISTRAL_3B_ID == "mistralai/Ministral-3-3B-Base-2512"
    args = dict(get_stage("stage2", "ministral-3b").task.args)
    assert (args["dtype"], args["attn_implementation"]) == ("bfloat16", "sdpa")
    # eval: contexts cut to the model's own limit, as lm-eval does; the SFT rows of training
    # stay within YaRN's original window (262144 extended)
    assert args["max_length"] is None
    assert get_stage("stage3b", "ministral-3b").task.args["max_length"] <= 16384
    args.update(model=str(ministral_dir), device="cpu")  # no GPU, no hub here
    loaded = modeling.load(EvalArgs.model_validate(args))
    assert type(loaded.model).__name__ == "Ministral3ForCausalLM"
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.dtype == torch.bfloat16


def test_trained_final_checkpoint_loads_back(ministral_dir: Path, tmp_path: Path) -> None:
    base = _load(ministral_dir).model
    rd = tmp_path / "stage3b" / "r1"
    code = lifecycle.execute(
        rd,
        "train",
        {
            "model": str(ministral_dir),
            "device": "cpu",
            "dtype": "float32",
            "data": {"name": "recall", "source": "tiny:recall", "format": "sft", "limit": 32},
            "eval_data": {
                "name": "recall-val",
                "source": "tiny:recall",
                "format": "sft",
                "split": "validation",
                "limit": 8,
            },
            "mask": "prefix",
            "max_steps": 3,
            "batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 0,
            "eval_every": 3,
            "eval_batches": 1,
            "probe_every": 3,
            "probe_batch_size": 4,
            "save_every": 1000,
            "heartbeat_s": 0.5,
            "gradient_checkpointing": True,
        },
    )
    failed = rd / names.RUN_FAILED
    assert code == 0, failed.read_text() if failed.exists() else code
    final = rd / "checkpoints" / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["model_type"] == "ministral3" and cfg["architectures"] == ["Ministral3ForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and cfg["rope_parameters"]["rope_type"] == "yarn"
    base_cfg = json.loads((ministral_dir / "config.json").read_text())
    loaded = modeling.load(
        EvalArgs(model=str(final), device="cpu", dtype="float32"), expected_config=base_cfg
    )
    model = loaded.model
    assert type(model).__name__ == "Ministral3ForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert loaded.tokenizer.pad_token_id == 11
    trained = dict(model.named_parameters())
    moved = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved  # the fine-tune is what was saved
    masks.verify_mask_path(model)


def test_other_architecture_is_refused_clearly(ministral_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPConfig

    base = json.loads((ministral_dir / "config.json").read_text())
    with pytest.raises(WorkerError, match="different model config.*hidden_size"):
        modeling.check_config_matches({**base["text_config"], "hidden_size": 65}, base, "ckpt")
    # a config that is neither a causal LM nor vision+text with a causal decoder
    CLIPConfig().save_pretrained(tmp_path / "clip")
    with pytest.raises(WorkerError, match="neither a causal LM nor a vision\\+text"):
        _load(tmp_path / "clip")


def test_mask_self_check_on_the_replica_uses_real_tokens_not_reserved_ids(
    ministral_dir: Path,
) -> None:
    """The replica's low ids are Mistral's control tokens; with their embedding rows zeroed (as
    reported for Tekken's reserved rows), low ids give the same logits under any mask: the check
    must read text (the stage's rows, or the tokenizer's ordinary vocabulary) and pass."""
    from state.errors import WorkerError

    loaded = _load(ministral_dir)
    model, tok = loaded.model, loaded.tokenizer
    n_special = len(SPECIALS)
    with torch.no_grad():
        model.get_input_embeddings().weight[:n_special] = 0.0
    low = torch.randint(3, n_special, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(WorkerError, match="silent causal fallback"):
        masks.verify_mask_path(model, sample=low.tolist())
    rows = [
        tok(r["prompt"] + r["response"])["input_ids"] for r in tiny.sft_rows("recall", "train", 4)
    ]
    assert min(i for r in rows for i in r[1:]) >= n_special  # text, past the control tokens
    assert masks.verify_mask_path(model, sample=rows, tokenizer=tok) == "data"
    assert masks.verify_mask_path(model, tokenizer=tok) == "tokenizer vocabulary"


# ---- the Tekken tokenizer (mistral-common) beside the HF files, as the real repo ships both

#: Tekken's pre-tokenization regex (tiktoken `pat_str`), as in Mistral's tekken.json files
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _tekken_json(vocab_size: int) -> tuple[dict, int]:
    """(a tekken.json in mistral-common's file format, its number of reserved special ids).

    The format of `mistral_common.tokens.tokenizers.tekken` (`ModelData`: `vocab` of TokenInfo
    {rank, token_bytes (base64), token_str}, `special_tokens` of SpecialTokenInfo {rank,
    token_str, is_control}, `config` of TekkenConfig). Ranks 0-255 are the single bytes, then the
    replica's byte-level BPE merges in training order; the special tokens come first in the ids
    (Mistral's control tokens, `<unk>`=0, `<s>`=1, `</s>`=2, `[IMG]`=10, `<pad>`=11), padded with
    `<SPECIAL_n>` fillers to a reserved block, as Tekken reserves its first 1000 ids."""
    import base64

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {u: b for b, u in bytes_to_unicode().items()}
    hf = _tokenizer().backend_tokenizer.get_vocab(with_added_tokens=False)
    by_id = sorted(hf.items(), key=lambda kv: kv[1])
    merges = [t for t, _ in by_id if len(t) > 1 and t not in SPECIALS]
    inner = [bytes([i]) for i in range(256)] + [bytes(to_byte[c] for c in t) for t in merges]
    n_special = vocab_size - len(inner)
    specials = [
        {**t, "token_str": str(t["token_str"])} for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    ]
    assert n_special > len(specials)
    data = {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "num_vocab_tokens": len(inner),
            "default_vocab_size": vocab_size,
            "default_num_special_tokens": n_special,
            "version": "v7",
        },
        "vocab": [
            {
                "rank": i,
                "token_bytes": base64.b64encode(b).decode(),
                "token_str": b.decode("utf-8", "replace"),
            }
            for i, b in enumerate(inner)
        ],
        "special_tokens": specials,
    }
    return data, n_special


@pytest.fixture(scope="module")
def tekken_dir(ministral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The replica with a tekken.json, and the HF tokenizer files transformers converts from it
    (`convert_tekken_tokenizer`, the same vocabulary), as the real repo ships both."""
    pytest.importorskip("mistral_common", reason="mistral-common is in the dev extra")
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    dest = tmp_path_factory.mktemp("ministral-3-tekken")
    for f in ministral_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (dest / f.name).write_bytes(f.read_bytes())
    vocab = json.loads((ministral_dir / "config.json").read_text())["text_config"]["vocab_size"]
    data, _ = _tekken_json(vocab)
    (dest / "tekken.json").write_text(json.dumps(data))
    convert_tekken_tokenizer(str(dest / "tekken.json")).save_pretrained(dest)
    return dest


def _load_backend(path: Path, backend: str) -> modeling.Loaded:
    return modeling.load(
        EvalArgs(model=str(path), device="cpu", dtype="float32", tokenizer_backend=backend)
    )


@pytest.mark.parametrize(
    ("backend", "cls", "family", "bos_default"),
    [
        # transformers' own pick (mistral_format=None): mistral-common whenever it is installed
        # and a tekken.json is there, whatever tokenizer.json says: the hazard of the issue
        ("auto", "MistralCommonBackend", "mistral-common", True),
        ("hf", "TokenizersBackend", "hf", False),  # the converted tokenizer.json adds nothing
        ("mistral-common", "MistralCommonBackend", "mistral-common", True),
    ],
)
def test_tekken_tokenizer_backend_is_the_one_asked_for(
    tekken_dir: Path, backend: str, cls: str, family: str, bos_default: bool
) -> None:
    from worker import evaluate as ev
    from worker.data import McExample

    loaded = _load_backend(tekken_dir, backend)
    tok = loaded.tokenizer
    assert type(tok).__name__ == cls
    assert loaded.tokenizer_info == {
        "class": cls,
        "is_fast": cls == "TokenizersBackend",
        "backend": family,
        "requested": backend,
    }
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 11, 448)
    # the same vocabulary either way, its text ids past the reserved control block
    tekken = json.loads((tekken_dir / "tekken.json").read_text())
    n_special = tekken["config"]["default_num_special_tokens"]
    text = "sum : 3 plus 4 is 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert (
        ids
        == _load_backend(tekken_dir, "hf").tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    assert min(ids) >= n_special > 100
    # BOS follows the backend that loaded (stage add_bos unset), as lm-eval's add_bos_token=None
    assert ev.resolve_add_bos(tok, None) == (bos_default, "tokenizer default")
    ctx = ev.prepare([McExample("sum : 3 plus 4 is", [" 7", " 8"], 0)], tok, 64)[0][0].ctx
    plain = tok("sum : 3 plus 4 is", add_special_tokens=False)["input_ids"]
    assert ctx == ([1] if bos_default else []) + plain
    assert ev.resolve_add_bos(tok, True) == (True, "stage")
    # the mask self-check reads ordinary vocabulary, never the reserved ids
    assert masks.verify_mask_path(loaded.model, tokenizer=tok) == "tokenizer vocabulary"


def test_tekken_backend_is_recorded_in_spec_events_and_metrics(
    tekken_dir: Path, tmp_path: Path
) -> None:
    # spec.json holds the stage's validated args: the backend is always there, explicitly
    assert get_stage("stage1", "ministral-3b").task.args["tokenizer_backend"] == "hf"
    rd = tmp_path / "stage1" / "r1"
    task = {"name": "arith", "source": "tiny:arith", "format": "mc", "limit": 8}
    args = {
        "model": str(tekken_dir),
        "device": "cpu",
        "dtype": "float32",
        "tokenizer_backend": "mistral-common",
        "tasks": [task],
        "heartbeat_s": 0.5,
    }
    code = lifecycle.execute(rd, "eval", args)
    failed = rd / names.RUN_FAILED
    assert code == 0, failed.read_text() if failed.exists() else code
    metrics = json.loads((rd / names.METRICS).read_text())
    assert metrics["tokenizer"]["class"] == "MistralCommonBackend"
    assert metrics["tokenizer"]["requested"] == "mistral-common"
    assert (metrics["add_bos"], metrics["add_bos_source"]) == (True, "tokenizer default")
    events = [json.loads(x) for x in (rd / names.EVENTS).read_text().splitlines()]
    loaded = [e["data"]["tokenizer"] for e in events if "tokenizer" in (e.get("data") or {})]
    assert [t["class"] for t in loaded] == ["MistralCommonBackend"], events


def test_missing_tekken_backend_is_one_line_naming_the_fix(
    ministral_dir: Path, tekken_dir: Path, tmp_path: Path
) -> None:
    # asked for mistral-common where the model has only the HF files
    with pytest.raises(WorkerError, match="needs a tekken.json") as err:
        _load_backend(ministral_dir, "mistral-common")
    assert "tokenizer_backend 'hf'" in str(err.value.hint) and "\n" not in str(err.value)
    # asked for mistral-common where the package is not installed (hidden in a child process)
    code = (
        "import sys; sys.modules['mistral_common'] = None\n"
        "from state.errors import WorkerError\n"
        "from state.worker_config import EvalArgs\n"
        "from worker import modeling\n"
        "try:\n"
        f"    modeling.load(EvalArgs(model={str(tekken_dir)!r}, device='cpu',"
        " tokenizer_backend='mistral-common'))\n"
        "except WorkerError as e:\n"
        "    print(e); print(e.hint)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.splitlines()
    assert out[0].startswith("tokenizer_backend 'mistral-common' needs the mistral-common"), out
    assert "pip install 'mistral-common>=" in out[1], out
