"""Mask construction (pure), the structural leak check, and mask behaviour on the real tiny
model: perturbation tests, implementation agreement, padding, and the runtime mask check."""

from __future__ import annotations

import pytest
import torch

from state.errors import WorkerError
from state.phases import MaskMode
from worker import masks

# --- pure construction ------------------------------------------------------------------------


def test_prefix_mask_by_hand_right_and_left_padding() -> None:
    # row 0: 5 real tokens then 1 pad, prompt 3; row 1: 1 pad then 5 real tokens, prompt 2
    am = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    allowed = masks.allowed_matrix(am, torch.tensor([3, 2]), MaskMode.PREFIX).int()
    assert allowed[0].tolist() == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padded query: sees only itself (no empty softmax row)
    ]
    assert allowed[1].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
    ]


def test_causal_and_full_bidir_by_hand() -> None:
    am = torch.tensor([[1, 1, 1, 0]])
    causal = masks.allowed_matrix(am, torch.tensor([2]), "causal").int()[0].tolist()
    assert causal == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    bidir = masks.allowed_matrix(am, torch.tensor([2]), "full_bidir").int()[0].tolist()
    assert bidir == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]]


def test_forms_per_implementation() -> None:
    am = torch.tensor([[1, 1, 1, 0]])
    sdpa = masks.build_mask(am, torch.tensor([2]), "prefix", "sdpa")
    assert sdpa.value.dtype == torch.bool and sdpa.value.shape == (1, 1, 4, 4)
    eager = masks.build_mask(am, torch.tensor([2]), "prefix", "eager", torch.bfloat16)
    assert eager.value.dtype == torch.bfloat16
    assert set(eager.value.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}
    assert torch.equal(masks.dense_allowed(eager.value), sdpa.allowed)


def test_bad_inputs_are_worker_errors() -> None:
    am = torch.tensor([[1, 1, 0]])
    with pytest.raises(WorkerError, match="unknown mask mode"):
        masks.allowed_matrix(am, torch.tensor([1]), "sideways")
    with pytest.raises(WorkerError, match="longer than its row"):
        masks.allowed_matrix(am, torch.tensor([3]), "prefix")
    with pytest.raises(WorkerError, match="no real tokens"):
        masks.allowed_matrix(torch.tensor([[0, 0]]), torch.tensor([0]), "prefix")
    for impl in ("flash_attention_2", "flash_attention_3"):
        with pytest.raises(WorkerError, match="cannot take a custom"):
            masks.check_impl(impl)
    with pytest.raises(WorkerError, match="CUDA"):
        masks.check_impl("flex_attention", "cpu")


# --- structural leak check --------------------------------------------------------------------

AM = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
PLENS = torch.tensor([3, 4])


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_structural_check_passes_causal_and_prefix(mode: str) -> None:
    for impl in ("sdpa", "eager"):
        built = masks.build_mask(AM, PLENS, mode, impl)
        masks.check_no_leak(built, PLENS, AM)
        masks.check_no_leak(built.value, PLENS, AM)  # the raw 4D form works too


def test_structural_check_refuses_full_bidir() -> None:
    built = masks.build_mask(AM, PLENS, "full_bidir", "sdpa")
    with pytest.raises(WorkerError, match="label leakage"):
        masks.check_no_leak(built, PLENS, AM)


def test_structural_check_catches_prefix_off_by_one() -> None:
    # the classic bug: `kv <= prompt_len` (a count used as an inclusive index)
    allowed = masks.allowed_matrix(AM, PLENS, "prefix").clone()
    for b, (start, plen) in enumerate([(0, 3), (2, 4)]):
        allowed[b, start : start + plen, start + plen] = True
    with pytest.raises(WorkerError, match=r"position 0 \(prompt\) can attend to later position"):
        masks.check_no_leak(allowed[:, None], PLENS, AM)


def test_structural_check_catches_padding_visible() -> None:
    allowed = masks.allowed_matrix(AM, PLENS, "causal").clone()
    allowed[1, 3, 0] = True  # a real token sees a left-padding token
    with pytest.raises(WorkerError, match="padding"):
        masks.check_no_leak(allowed[:, None], PLENS, AM)


# --- on the real tiny model -------------------------------------------------------------------


def _batch(tok, side: str = "right"):
    prompts = [
        "recall : k1 = v2 , k3 = v4 , k5 = v6 . k3 ?",
        "sum : 3 plus 4 is",
        "count : 4 5 6 next",
    ]
    responses = [" v4 v2 v6", " 7 7", " 7 8 9 10"]
    rows = []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, tok(r, add_special_tokens=False)["input_ids"]))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    am = torch.zeros((len(rows), width), dtype=torch.long)
    starts = []
    for i, (p, r) in enumerate(rows):
        s = 0 if side == "right" else width - len(p) - len(r)
        ids[i, s : s + len(p) + len(r)] = torch.tensor(p + r)
        am[i, s : s + len(p) + len(r)] = 1
        starts.append(s)
    plens = torch.tensor([len(p) for p, _ in rows])
    return ids, am, plens, starts


def _logits(loaded, ids, am, plens, mode):
    with torch.no_grad():
        return masks.forward(loaded.model, ids, am, plens, mode)


@pytest.mark.parametrize("mode", ["causal", "prefix"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_changing_response_tokens_never_reaches_earlier_positions(
    tiny_sdpa, mode: str, side: str
) -> None:
    ids, am, plens, starts = _batch(tiny_sdpa.tokenizer, side)
    base = _logits(tiny_sdpa, ids, am, plens, mode)
    for b in range(ids.shape[0]):
        s, p = starts[b], int(plens[b])
        n = int(am[b].sum())
        for j in range(p, n):  # perturb response token j of row b
            pert = ids.clone()
            pert[b, s + j] = (pert[b, s + j] + 7) % tiny_sdpa.model.config.vocab_size
            out = _logits(tiny_sdpa, pert, am, plens, mode)
            # positions before j (prompt and earlier response) are untouched...
            torch.testing.assert_close(out[b, s : s + j], base[b, s : s + j], rtol=0, atol=1e-5)
            # ...and the perturbation did reach position j itself (the test can fail)
            assert (out[b, s + j] - base[b, s + j]).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_later_prompt_tokens_reach_earlier_prompt_positions_in_prefix_only(
    tiny_sdpa, side: str
) -> None:
    ids, am, plens, starts = _batch(tiny_sdpa.tokenizer, side)
    pert = ids.clone()
    for b in range(ids.shape[0]):
        last_prompt = starts[b] + int(plens[b]) - 1
        pert[b, last_prompt] = (pert[b, last_prompt] + 5) % tiny_sdpa.model.config.vocab_size
    for mode, should_move in (("prefix", True), ("causal", False)):
        base = _logits(tiny_sdpa, ids, am, plens, mode)
        out = _logits(tiny_sdpa, pert, am, plens, mode)
        for b in range(ids.shape[0]):
            early = slice(starts[b], starts[b] + int(plens[b]) - 1)  # prompt positions before it
            moved = (out[b, early] - base[b, early]).abs().max().item()
            assert (moved > 1e-4) is should_move, (mode, b, moved)


@pytest.mark.parametrize("mode", ["causal", "prefix", "full_bidir"])
def test_eager_and_sdpa_agree_with_padding_on_both_sides(tiny_sdpa, tiny_eager, mode: str) -> None:
    for side in ("right", "left"):
        ids, am, plens, _ = _batch(tiny_sdpa.tokenizer, side)
        a = _logits(tiny_sdpa, ids, am, plens, mode)
        b = _logits(tiny_eager, ids, am, plens, mode)
        real = am.bool()
        torch.testing.assert_close(a[real], b[real], rtol=1e-4, atol=1e-4)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()  # padded rows too: no NaN


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_left_and_right_padding_give_the_same_logits(tiny_sdpa, mode: str) -> None:
    r_ids, r_am, plens, _ = _batch(tiny_sdpa.tokenizer, "right")
    l_ids, l_am, _, _ = _batch(tiny_sdpa.tokenizer, "left")
    right = _logits(tiny_sdpa, r_ids, r_am, plens, mode)[r_am.bool()]
    left = _logits(tiny_sdpa, l_ids, l_am, plens, mode)[l_am.bool()]
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loaded", ["tiny_sdpa", "tiny_eager"])
def test_causal_mode_equals_the_models_own_forward(
    loaded: str, request: pytest.FixtureRequest
) -> None:
    lm = request.getfixturevalue(loaded)
    ids, am, plens, _ = _batch(lm.tokenizer, "right")
    ours = _logits(lm, ids, am, plens, "causal")
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(ours[am.bool()], ref[am.bool()], rtol=1e-5, atol=1e-5)
    masks.verify_mask_path(lm.model)  # the one-off runtime check passes on a healthy model


def test_a_dropped_mask_is_caught_not_silently_causal(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    am = torch.ones_like(ids)
    masks.forward(model, ids, am, torch.tensor([3]), "prefix")  # fine before the sabotage

    def drop_mask(module, args, kwargs):
        kwargs["attention_mask"] = None  # what a model that rebuilds its own mask amounts to
        return args, kwargs

    model.model.register_forward_pre_hook(drop_mask, with_kwargs=True)
    with pytest.raises(WorkerError, match="not the one built"):
        masks.forward(model, ids, am, torch.tensor([3]), "prefix")
    with pytest.raises(WorkerError):
        masks.verify_mask_path(model)


def test_runtime_check_passes_in_bf16(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, attn_implementation=impl, dtype=torch.bfloat16
        )
        masks.verify_mask_path(model)
        eager = masks.build_mask(AM, PLENS, "prefix", impl, torch.bfloat16)
        masks.check_no_leak(eager, PLENS, AM)


def test_mask_built_for_another_implementation_is_refused(tiny_sdpa) -> None:
    ids, am, plens, _ = _batch(tiny_sdpa.tokenizer)
    with pytest.raises(WorkerError, match="runs 'sdpa'"):
        masks.forward(tiny_sdpa.model, ids, am, plens, "prefix", impl="eager")


def test_block_mask_matches_the_dense_mask() -> None:
    """The flex_attention form, checked with the uncompiled flex kernel against SDPA on the
    dense bool mask (the compiled CPU kernel is what check_impl refuses)."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    am, plens = AM, PLENS
    for mode in ("causal", "prefix", "full_bidir"):
        built = masks.build_mask(am, plens, mode, "sdpa")
        block = masks.to_impl_form(built.allowed, "flex_attention")
        q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=built.value)
        out = fa.flex_attention(q, k, v, block_mask=block)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
