"""SFT data as a researcher means it (worker.data): multi-turn rows formatted with their roles and
the prefix boundary exactly at the assistant marker; a separator where a prompt and a response
would touch, and the tiny tasks' tokens unchanged; the chat template only when asked; rows over
max_length dropped, cut or refused by an explicit policy, with the counts in the run's events
and summary.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from state import names
from state.errors import WorkerError
from state.protocol import read_events
from state.worker_config import TaskSource, TrainArgs
from worker import data, lifecycle

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a haiku."},
    {"role": "assistant", "content": "Leaves drift."},
    {"role": "user", "content": "Another one, about snow."},
    {"role": "assistant", "content": "Snow settles softly."},
]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Any:
    """A small byte-level BPE tokenizer (merges across spaces and colons like real ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [data.format_messages(CHAT)[0] + data.format_messages(CHAT)[1]] * 20
    corpus += ["What is two plus two?\nFour.", "Sure, here it is."] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _enc(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write(path: Path, rows: list[dict[str, Any]]) -> TaskSource:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskSource(name=path.stem, source=str(path), format="sft")


# ---- formatting -------------------------------------------------------------------------------


def test_multi_turn_rows_are_rendered_with_their_roles() -> None:
    prompt, response = data.format_messages(CHAT)
    assert prompt == (
        "System: You are terse.\n\nUser: Write a haiku.\n\nAssistant: Leaves drift.\n\n"
        "User: Another one, about snow.\n\nAssistant:"
    )
    assert response == " Snow settles softly."  # the last assistant turn only
    single = data.format_messages([{"role": "user", "content": "Hi"}, CHAT[-1]])
    assert single == ("User: Hi\n\nAssistant:", " Snow settles softly.")
    ex = data.SftExample("ignored", "ignored", messages=CHAT)
    assert data.format_sft(ex) == (prompt, response)


def test_the_prefix_boundary_is_the_assistant_marker_exactly(bpe_tokenizer: Any) -> None:
    tok = bpe_tokenizer
    (t,) = data.tokenize_sft([data.SftExample("", "", messages=CHAT)], tok, 512)
    prompt, response = data.format_messages(CHAT)
    assert t.prompt_ids == [tok.bos_token_id] + _enc(tok, prompt)
    assert tok.decode(t.prompt_ids[1:]).endswith("\n\nAssistant:")
    assert t.response_ids[-1] == tok.eos_token_id
    assert tok.decode(t.response_ids[:-1]) == response
    # prompt + response tokens are the tokens of the whole conversation text
    assert t.prompt_ids[1:] + t.response_ids[:-1] == _enc(tok, prompt + response)
    # loss on the last assistant turn only (the earlier one sits in the prompt)
    batch = data.collate_sft([t], tok)
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tok.decode(labels[:-1]) == " Snow settles softly."


def test_a_separator_goes_between_a_prompt_and_a_response_that_would_touch(
    bpe_tokenizer: Any, tiny_tokenizer: Any
) -> None:
    sep = data.PROMPT_RESPONSE_SEPARATOR
    assert data.with_separator("What is two plus two?", "Four.") == (
        "What is two plus two?",
        sep + "Four.",
    )
    for prompt, response in [("a ", "b"), ("a\n", "b"), ("a", " b"), ("a", "\nb"), ("", "b")]:
        assert data.with_separator(prompt, response) == (prompt, response)
    (t,) = data.tokenize_sft([data.SftExample("What is two plus two?", "Four.")], bpe_tokenizer, 64)
    assert bpe_tokenizer.decode(t.prompt_ids[1:] + t.response_ids[:-1]) == (
        "What is two plus two?\nFour."
    )
    # without it the tiny tokenizer would read "is7" as one unknown word
    (t,) = data.tokenize_sft([data.SftExample("sum : 3 plus 4 is", "7")], tiny_tokenizer, 32)
    assert tiny_tokenizer.convert_ids_to_tokens(t.prompt_ids[-1:] + t.response_ids[:1]) == [
        "is",
        "7",
    ]


@pytest.mark.parametrize("task", ["dup", "arith", "succ", "recall"])
def test_the_tiny_tasks_tokens_are_unchanged(tiny_tokenizer: Any, task: str) -> None:
    """The tiny responses begin with a space: no separator, byte-identical tokens (the tiny
    study's numbers do not move). The old rule: BOS + enc(prompt), enc(prompt + response)
    after the prompt's tokens, EOS."""
    tok = tiny_tokenizer
    src = TaskSource(name=task, source=f"tiny:{task}", format="sft", split="train", limit=200)
    examples = data.load_sft(src)
    for ex, t in zip(examples, data.load_sft(src, tok, max_length=512), strict=True):
        assert ex.response.startswith(" ") and data.format_sft(ex) == (ex.prompt, ex.response)
        p = _enc(tok, ex.prompt)
        assert t.prompt_ids == [tok.bos_token_id] + p
        assert t.response_ids == _enc(tok, ex.prompt + ex.response)[len(p) :] + [tok.eos_token_id]


def test_the_chat_template_only_when_asked(tiny_tokenizer: Any, tmp_path: Path) -> None:
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    rows = [{"messages": [{"role": "user", "content": "sum : 1 plus 1 is"}, CHAT[-1]]}]
    src = _write(tmp_path / "chat.jsonl", rows)
    base = {"model": "m", "data": src.model_dump(), "eval_fraction": 0}
    plain, _ = data.sft_splits(TrainArgs(**base), tok)  # default: chat_template=False
    (t,) = plain
    assert tok.convert_ids_to_tokens(t.prompt_ids)[-1] == "<unk>"  # "Assistant:" (not in vocab)
    assert tok.convert_ids_to_tokens(t.prompt_ids[:3]) == [tok.bos_token, "<unk>", "sum"]
    templ, _ = data.sft_splits(TrainArgs(**base, chat_template=True), tok)
    assert tok.convert_ids_to_tokens(templ[0].prompt_ids)[-2:] == ["<unk>", ":"]  # "assistant :"
    assert templ[0].prompt_ids != t.prompt_ids
    with pytest.raises(WorkerError, match="has no chat template"):
        data.sft_splits(TrainArgs(**base, chat_template=True), tiny_tokenizer)
    # recorded with the args (jobs puts model_dump(mode="json") into spec.json)
    dumped = TrainArgs(**base).model_dump(mode="json")
    assert dumped["chat_template"] is False and dumped["long_rows"] == "drop"


# ---- rows over max_length ---------------------------------------------------------------------

SHORT = data.SftExample("sum : 1 plus 2 is", " 3")  # BOS + 5 + 1 + EOS = 8 tokens
LONG = data.SftExample("recall : k1 = v2 , k3 = v4 . k1 ?", " v2")  # BOS + 12 + 1 + EOS = 15
HUGE_RESPONSE = data.SftExample("count :", " 1 2 3 4 5 6 7 8 9 10")  # response alone 11


@pytest.mark.parametrize("policy", ["drop", "truncate_prompt_left", "error"])
def test_each_long_rows_policy(tiny_tokenizer: Any, policy: str) -> None:
    tok = tiny_tokenizer
    st = data.LongRowStats(policy, 10)
    rows = [SHORT, LONG, HUGE_RESPONSE, SHORT]
    if policy == "error":
        with pytest.raises(WorkerError, match=r"SFT example 1: .* longer than max_length 10"):
            data.tokenize_sft(rows, tok, 10, long_rows=policy, stats=st)
        return
    out = data.tokenize_sft(rows, tok, 10, long_rows=policy, stats=st)
    assert all(len(t) <= 10 for t in out)
    assert st.rows == 4 and st.longest == 15
    if policy == "drop":
        assert len(out) == 2 and (st.kept, st.dropped, st.truncated) == (2, 2, 0)
        assert "2 of 4 rows longer than max_length 10" in st.describe()
    else:  # the prompt loses its left end, BOS kept; a response that cannot fit is dropped
        assert len(out) == 3 and (st.kept, st.dropped, st.truncated) == (3, 1, 1)
        cut = out[1]
        assert len(cut) == 10 and cut.prompt_ids[0] == tok.bos_token_id
        assert (
            tok.convert_ids_to_tokens(cut.prompt_ids[1:])
            == ["v2", ",", "k3", "=", "v4", ".", "k1", "?"][-7:]
        )
        assert st.prompt_tokens_cut == 5
    assert st.as_dict()["policy"] == policy


def test_an_unknown_policy_is_refused_by_the_args_model() -> None:
    src = {"name": "d", "source": "tiny:dup", "format": "sft"}
    with pytest.raises(ValidationError, match="'drop', 'truncate_prompt_left' or 'error'"):
        TrainArgs(model="m", data=src, long_rows="cut")  # type: ignore[arg-type]
    with pytest.raises(WorkerError, match=r"invalid train args: long_rows: Input should be"):
        lifecycle.parse_args("train", {"model": "m", "data": src, "long_rows": "cut"})
    with pytest.raises(WorkerError, match="unknown long_rows policy"):
        data.tokenize_sft([SHORT], None, 10, long_rows="cut")


def _long_rows_run(tmp_path: Path, model: str, policy: str) -> tuple[dict[str, Any], list]:
    from tests.worker.test_train import train_args

    rows = [{"prompt": "sum : 1 plus 2 is", "response": " 3"}] * 16
    rows += [{"prompt": "recall : k1 = v2 , k3 = v4 . k1 ?", "response": " v2"}] * 4
    src = _write(tmp_path / "mixed.jsonl", rows).model_dump()
    args = train_args(
        model, data=src, eval_data=src, max_length=10, long_rows=policy, max_steps=2,
        eval_every=100, probe_every=100,
    )  # fmt: skip
    rd = tmp_path / policy
    assert lifecycle.execute(rd, "train", args) == 0, (rd / names.RUN_FAILED).read_text()
    summary = json.loads((rd / names.SUMMARY).read_text())
    return summary["sft_rows"], [e for e in read_events(rd) if "long_rows" in e.data]


@pytest.mark.parametrize("policy", ["drop", "truncate_prompt_left"])
def test_the_counts_reach_events_and_summary(tmp_path: Path, small_model: str, policy: str) -> None:
    rows, events = _long_rows_run(tmp_path, small_model, policy)
    assert rows["policy"] == policy and rows["max_length"] == 10 and rows["chat_template"] is False
    for key in ("data", "eval_data"):
        want = (4, 0) if policy == "drop" else (0, 4)
        assert (rows[key]["dropped"], rows[key]["truncated"]) == want
        assert rows[key]["rows"] == 20 and rows[key]["longest"] == 15
    assert [e.kind for e in events] == ["warning", "warning"]
    assert "4 of 20 rows longer than max_length 10" in events[0].message


def test_all_rows_dropped_says_why(tmp_path: Path, small_model: str) -> None:
    from tests.worker.test_train import train_args

    rd = tmp_path / "r"
    assert lifecycle.execute(rd, "train", train_args(small_model, max_length=8)) == 2
    reason = json.loads((rd / names.RUN_FAILED).read_text())["reason"]
    assert "no usable examples" in reason and "longer than max_length 8" in reason
    assert "long_rows=drop" in reason and "truncate_prompt_left" in reason
