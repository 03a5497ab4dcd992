"""The mask self-check (`masks.verify_mask_path`) on real tokens, on a model whose low ids are
reserved with all-zero embedding rows (as Mistral's Tekken vocabulary keeps ids < 1000 for
control tokens): random low ids, what the check used to feed, give the same logits under any
mask and would call a correct prefix model a silent causal fallback; the stage's own data (or
the tokenizer's ordinary vocabulary) passes it, and a model that ignores the mask is still
caught."""

from __future__ import annotations

import pytest
import torch

from state.errors import WorkerError
from worker import masks

N_RESERVED = 1000
WORDS = [f"w{i}" for i in range(100)]


def _tokenizer(mark_reserved_special: bool = True):
    """Word-level: ids 0..999 reserved control tokens (<unk>, <s>, </s>, then <SPECIAL_n>), then
    100 words. `mark_reserved_special=False`: only the named three are special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reserved = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, N_RESERVED)]
    vocab = {t: i for i, t in enumerate(reserved + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(reserved if mark_reserved_special else reserved[:3])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def reserved_model():
    """A correct causal LM (the custom mask reaches its attention) with embedding rows 0..999
    all zero."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=N_RESERVED + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        sliding_window=None,
        attn_implementation="sdpa",
    )
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[:N_RESERVED] = 0.0
    return model


def _text_rows(tok) -> list[list[int]]:
    lines = ["w1 w5 w9 w2 w7 w3 w8 w4", "w10 w20 w30 w40 w50 w60", "w3 w3 w4"]
    return [[tok.bos_token_id, *tok(line, add_special_tokens=False)["input_ids"]] for line in lines]


def _ignore_the_mask(model) -> list:
    """Make every attention module run causally whatever mask it is given (after the probe
    has recorded the mask object, so only the numeric check can tell)."""

    def causal_only(module, args, kwargs):
        m = kwargs["attention_mask"]
        q, k = m.shape[-2:]
        kwargs["attention_mask"] = m & torch.ones(q, k, dtype=torch.bool).tril(k - q)
        return args, kwargs

    return [
        m.register_forward_pre_hook(causal_only, with_kwargs=True)
        for m in masks.attention_modules(model)
    ]


def test_random_low_ids_fool_the_check_on_a_correct_model(reserved_model) -> None:
    # what the check used to do: randint(3, min(vocab, 1000)), all reserved all-zero rows here
    gen = torch.Generator().manual_seed(0)
    low = torch.randint(3, N_RESERVED, (2, 12), generator=gen).tolist()
    with pytest.raises(WorkerError, match="silent causal fallback"):
        masks.verify_mask_path(reserved_model, sample=low)


def test_real_tokens_pass_a_correct_model_and_catch_one_that_ignores_the_mask(
    reserved_model,
) -> None:
    tok = _tokenizer()
    rows = _text_rows(tok)
    assert masks.verify_mask_path(reserved_model, sample=rows, tokenizer=tok) == "data"
    # no data at hand: the tokenizer's ordinary vocabulary, never a reserved id
    assert masks.ordinary_ids(tok, reserved_model.config.vocab_size) == list(
        range(N_RESERVED, N_RESERVED + len(WORDS))
    )
    assert masks.verify_mask_path(reserved_model, tokenizer=tok) == "tokenizer vocabulary"
    # reserved ids not marked special: the all-zero embedding rows are left out all the same
    loose = _tokenizer(mark_reserved_special=False)
    assert masks.verify_mask_path(reserved_model, tokenizer=loose) == "tokenizer vocabulary"
    assert masks.verify_mask_path(reserved_model) == "embedding rows"  # no tokenizer either

    hooks = _ignore_the_mask(reserved_model)
    try:
        for kw in ({"sample": rows}, {"tokenizer": tok}, {}):
            with pytest.raises(WorkerError, match="silent causal fallback"):
                masks.verify_mask_path(reserved_model, **kw)
    finally:
        for h in hooks:
            h.remove()
    masks.verify_mask_path(reserved_model, sample=rows)  # healthy again


def test_evaluation_checks_the_mask_on_its_own_questions(tiny_sdpa) -> None:
    from state.worker_config import EvalArgs, TaskSource
    from worker import evaluate as ev

    args = EvalArgs(
        tasks=[TaskSource(name="arith", source="tiny:arith", limit=8)],
        device="cpu",
        dtype="float32",
        mask="prefix",
    )
    assert ev.evaluate(args, loaded=tiny_sdpa)["mask_check_tokens"] == "data"
