"""Multiple-choice evaluation: the lm-eval split, shared-context scoring equal to per-choice
scoring in both modes, acc vs acc_norm by hand, and the tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from state import names
from state.errors import WorkerError
from state.models import RunStatus
from state.phases import MaskMode, WorkerPhase
from state.protocol import read_model
from state.worker_config import EvalArgs, TaskSource
from worker import evaluate as ev
from worker import lifecycle
from worker.data import McExample, encode_pair


def test_trailing_space_moves_to_the_continuation(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    ctx, cont = encode_pair(tok, "sum : 3 plus 4 is ", "7")
    assert (
        ctx == [tok.bos_token_id] + tok("sum : 3 plus 4 is", add_special_tokens=False)["input_ids"]
    )
    assert cont == tok(" 7", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "sum : 3 plus 4 is", " 7") == (ctx, cont)


def test_acc_and_acc_norm_by_hand() -> None:
    # question 1: raw log-likelihoods favour the short choice 0 (-2.0 vs -3.0), but per
    # character (2 chars vs 6 chars) choice 1 wins: -1.0 vs -0.5.
    # question 2: both metrics pick choice 1 (label 0): wrong for both.
    scores = [[-2.0, -3.0], [-5.0, -1.0]]
    char_lens = [[2, 6], [1, 1]]
    res = ev.accuracy(scores, labels=[1, 0], char_lens=char_lens)
    assert res == {"acc": 0.0, "acc_norm": 0.5, "n": 2}
    res = ev.accuracy(scores, labels=[0, 1], char_lens=char_lens)
    assert res == {"acc": 1.0, "acc_norm": 0.5, "n": 2}
    assert ev.accuracy([[-1.0, -1.0]], [0], [[1, 1]])["acc"] == 1.0  # ties: first choice


def test_char_lengths_exclude_the_delimiter_space(tiny_tokenizer) -> None:
    (q,), _ = ev.prepare(
        [McExample("sum : 1 plus 1 is", [" 2", " 11", " 3"], 0)], tiny_tokenizer, 64
    )
    assert q.char_lens == [1, 2, 1]


EXAMPLES = [
    McExample(
        "recall : k1 = v2 , k3 = v4 . k1 ?", [" v2 v4", " v4", " v2 , k3", " k1 = v2 . ?"], 0
    ),
    McExample("sum : 3 plus", [" 4 is 7", " 5"], 1),
    McExample("count : 1 2 3 4 5 6 next", [" 7", " 8", " 9 10"], 0),
]


@pytest.mark.parametrize("mode", [MaskMode.CAUSAL, MaskMode.PREFIX])
@pytest.mark.parametrize("loaded", ["tiny_sdpa", "tiny_eager"])
def test_shared_context_scores_equal_per_choice_scores(
    mode: MaskMode, loaded: str, request: pytest.FixtureRequest
) -> None:
    lm = request.getfixturevalue(loaded)
    qs, _ = ev.prepare(EXAMPLES, lm.tokenizer, 64)
    shared_count, naive_count = ev.Counter(), ev.Counter()
    shared = ev.score_shared(lm.model, qs, mode, lm.tokenizer.pad_token_id, shared_count)
    naive = ev.score_naive(lm.model, qs, mode, lm.tokenizer.pad_token_id, naive_count)
    for s, n in zip(shared, naive, strict=True):
        assert s == pytest.approx(n, abs=1e-4)
    assert shared_count.tokens < naive_count.tokens
    # and each choice scored alone, unbatched, gives the same numbers again
    for q, row in zip(qs, shared, strict=True):
        for j, cont in enumerate(q.conts):
            alone = ev.score_naive(
                lm.model, [ev.Question(q.ctx, [cont], 0, [1])], mode, 0, ev.Counter()
            )
            assert alone[0][0] == pytest.approx(row[j], abs=1e-4)


def test_prefix_mode_changes_the_scores(tiny_sdpa) -> None:
    qs, _ = ev.prepare(EXAMPLES, tiny_sdpa.tokenizer, 64)
    causal = ev.score_shared(tiny_sdpa.model, qs, MaskMode.CAUSAL, 1, ev.Counter())
    prefix = ev.score_shared(tiny_sdpa.model, qs, MaskMode.PREFIX, 1, ev.Counter())
    assert causal[0] != pytest.approx(prefix[0], abs=1e-3)


def test_long_contexts_are_left_truncated(tiny_tokenizer) -> None:
    # lm-eval's rule: the model is fed (context + continuation)[:-1], at most max_length tokens,
    # so context + continuation may be max_length + 1 tokens; plain left truncation (no BOS kept)
    ex = McExample("count : " + " ".join(str(i % 19) for i in range(40)) + " next", [" 1", " 2"], 0)
    (q,), truncated = ev.prepare([ex], tiny_tokenizer, 16)
    assert truncated == 1 and len(q.ctx) + 1 == 16 + 1
    assert q.ctx[0] != tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(q.ctx[-2:]) == f"{39 % 19} next"  # the end is kept
    with pytest.raises(WorkerError, match="longer than max_length 8"):
        ev.prepare([McExample("count :", [" 1 2 3 4 5 6 7 8 9"], 0)], tiny_tokenizer, 8)


def _no_bos_tokenizer(tok):
    """A copy of `tok` whose default encoding adds nothing (no BOS), BOS token still defined."""
    import copy

    other = copy.deepcopy(tok)
    other.backend_tokenizer.post_processor = None
    assert other("sum : 3")["input_ids"][0] != tok.bos_token_id
    return other


def test_bos_follows_the_tokenizer_default_unless_the_stage_sets_it(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    bos = tok.bos_token_id
    plain = tok("sum : 3 plus 4 is", add_special_tokens=False)["input_ids"]
    ex = [McExample("sum : 3 plus 4 is", [" 7", " 8"], 0)]
    # the tiny tokenizer adds BOS by default (its post-processor): same tokens as always-BOS
    assert ev.resolve_add_bos(tok, None) == (True, "tokenizer default")
    assert ev.prepare(ex, tok, 64)[0][0].ctx == [bos, *plain]
    assert ev.prepare(ex, tok, 64, add_bos=False)[0][0].ctx == plain
    assert ev.resolve_add_bos(tok, False) == (False, "stage")
    # a tokenizer that adds nothing by default: no BOS unless the stage asks for it
    nobos = _no_bos_tokenizer(tok)
    assert ev.resolve_add_bos(nobos, None) == (False, "tokenizer default")
    assert ev.prepare(ex, nobos, 64)[0][0].ctx == plain
    assert ev.prepare(ex, nobos, 64, add_bos=True)[0][0].ctx == [bos, *plain]
    assert ev.resolve_add_bos(nobos, True) == (True, "stage")
    # an empty context is the prefix token (BOS) whatever the rule, and the continuation has
    # no BOS of its own (lm-eval >= 0.4.9.2: tok_encode(continuation, add_special_tokens=False))
    seven = tok(" 7", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "", " 7", add_bos=False) == ([bos], seven)
    assert encode_pair(tok, "", " 7", add_bos=True) == ([bos], seven)


def test_context_limit_is_the_models_own(tiny_sdpa) -> None:
    model, tok = tiny_sdpa.model, tiny_sdpa.tokenizer
    assert ev.context_limit(model, tok, 100) == (100, "stage")
    assert model.config.max_position_embeddings == 512 == tok.model_max_length
    assert ev.context_limit(model, tok, None)[0] == 512

    class Tok:
        model_max_length = int(1e30)  # transformers' "not set"

    assert ev.context_limit(model, Tok(), None) == (512, "config.max_position_embeddings")
    Tok.model_max_length = 128
    assert ev.context_limit(model, Tok(), None) == (128, "tokenizer.model_max_length")


def _args(**kw) -> EvalArgs:
    tasks = [
        TaskSource(name=t, source=f"tiny:{t}", split="test", limit=120)
        for t in ("arith", "succ", "recall")
    ]
    return EvalArgs(tasks=tasks, device="cpu", dtype="float32", batch_size=32, **kw)


def test_tiny_model_end_to_end_well_above_chance(tiny_sdpa) -> None:
    seen: list[tuple[int, int, int]] = []
    events: list[tuple[str, dict]] = []
    res = ev.evaluate(
        _args(),
        lambda d, t, k: seen.append((d, t, k)),
        lambda k, d: events.append((k, d)),
        loaded=tiny_sdpa,
    )
    assert set(res["tasks"]) == {"arith", "succ", "recall"}
    for name in ("arith", "succ"):
        # chance is 0.25; measured: stage 1's macro acc (dup, arith, succ) >= 0.968 on all 20
        # seed x CPU-kernel studies (docs/BENCHMARKS.md, tiny study), so every task >= 0.905
        assert res["tasks"][name]["acc"] >= 0.6, res["tasks"]
        assert res["tasks"][name]["n"] == 120
    assert res["macro_acc"] == pytest.approx(sum(t["acc"] for t in res["tasks"].values()) / 3)
    assert res["mask"] == "causal" and res["tokens_forwarded"] > 0
    assert seen[0] == (0, 360, 0) and seen[-1] == (360, 360, res["tokens_forwarded"])
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    # every batch forwards tokens: the running total goes up on every call after the first
    tokens = [k for _, _, k in seen]
    assert all(b > a for a, b in zip(tokens, tokens[1:], strict=False)), tokens
    assert [k for k, _ in events] == ["eval", "eval", "eval"]
    # what was applied, recorded: BOS rule, context limit, tokenizer, lm-eval counterparts
    assert res["add_bos"] is True and res["add_bos_source"] == "tokenizer default"
    assert (res["max_length"], res["max_length_source"]) == (512, "config.max_position_embeddings")
    assert res["tokenizer"]["class"] == "TokenizersBackend" and res["tokenizer"]["is_fast"]
    assert res["tokenizer"]["backend"] == res["tokenizer"]["requested"] == "hf"
    assert res["mask_check_tokens"] == "data"
    assert all(t["lm_eval_metrics"] == [] for t in res["tasks"].values())  # mc: none


def test_shared_and_naive_evaluate_agree_with_fewer_tokens(tiny_sdpa) -> None:
    args = _args(mask=MaskMode.PREFIX)
    args.tasks = args.tasks[:1]
    shared = ev.evaluate(args, loaded=tiny_sdpa)
    naive = ev.evaluate(args.model_copy(update={"shared_context": False}), loaded=tiny_sdpa)
    assert shared["tasks"] == naive["tasks"] and shared["mask"] == "prefix"
    assert naive["tokens_forwarded"] >= 2 * shared["tokens_forwarded"]


def test_bad_eval_args(tiny_sdpa) -> None:
    with pytest.raises(WorkerError, match="causal' or 'prefix"):
        ev.evaluate(_args(mask=MaskMode.FULL_BIDIR), loaded=tiny_sdpa)
    with pytest.raises(WorkerError, match="no tasks"):
        ev.evaluate(EvalArgs(tasks=[]), loaded=tiny_sdpa)
    with pytest.raises(WorkerError, match="task names repeat"):
        t = TaskSource(name="a", source="tiny:arith")
        ev.evaluate(EvalArgs(tasks=[t, t]), loaded=tiny_sdpa)


def test_eval_run_reports_tokens_per_second(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The real worker entry (`python -m worker eval` runs exactly this): the dashboard reads
    # tokens/s from status.json, which only moves if evaluation progress carries token counts.
    rd = tmp_path / "stage1" / "r1"
    args = _args(model=str(tiny_model_dir), heartbeat_s=0.5).model_copy(update={"batch_size": 8})
    for t in args.tasks:
        t.limit = 24
    assert lifecycle.execute(rd, "eval", args.model_dump(mode="json")) == 0
    metrics = json.loads((rd / names.METRICS).read_text())
    st = read_model(rd / names.STATUS, RunStatus).value
    assert st.phase == WorkerPhase.DONE
    assert st.step == st.total_steps == metrics["n_questions"] == 72
    assert st.tokens_per_s is not None and st.tokens_per_s > 0, st
    assert st.steps_per_s is not None and st.steps_per_s > 0  # questions/s here
    # Both rates span the whole evaluation (9 batches fit the rate window) over the same
    # seconds, so their ratio is exactly the tokens forwarded per question.
    per_question = metrics["tokens_forwarded"] / metrics["n_questions"]
    assert st.tokens_per_s / st.steps_per_s == pytest.approx(per_question, rel=1e-9)
