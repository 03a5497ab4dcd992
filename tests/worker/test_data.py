"""Data loading on local files in the real data sets' schemas, the tiny tasks, and SFT
tokenization/collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from state.errors import WorkerError
from state.worker_config import TaskSource
from worker import data

ARC = [
    {
        "id": "Mercury_1",
        "question": "Which gas do plants absorb?",
        "choices": {
            "text": ["Oxygen", "Carbon dioxide", "Helium", "Neon"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "B",
    },
    {
        "id": "Mercury_2",
        "question": "How many legs has a spider?",
        "choices": {"text": ["six", "eight", "ten"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    },
]
HELLASWAG = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car.",
        "ctx_b": "then",
        "ctx": "Then, the man writes over the snow covering the window of a car. then",
        "endings": [
            ", the man adds wax to the windshield.",
            ", a person board a ski lift.",
            ", the man puts on a christmas coat.",
            ", the man continues removing the snow [title] on his car.",
        ],
        "label": "3",
        "split": "val",
    }
]
PIQA = [
    {
        "goal": "To make ice cubes",
        "sol1": "freeze water in a tray",
        "sol2": "boil water in a pot",
        "label": 0,
    }
]
BOOLQ = [
    {"question": "is the sky blue", "passage": "The sky appears blue by day.", "answer": True},
    {"question": "is ice hot", "passage": "Ice is frozen water.", "answer": False},
]
MC = [{"context": "sum : 2 plus 2 is", "choices": ["4", "5", "6"], "label": 0}]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _src(path: Path | str, fmt: str, **kw) -> TaskSource:
    return TaskSource(name="t", source=str(path), format=fmt, **kw)


def test_arc_jsonl(tmp_path: Path) -> None:
    ex = data.load_mc_task(_src(_write_jsonl(tmp_path / "arc.jsonl", ARC), "arc"))
    assert ex[0].context == "Question: Which gas do plants absorb?\nAnswer:"
    assert ex[0].choices == [" Oxygen", " Carbon dioxide", " Helium", " Neon"] and ex[0].label == 1
    assert ex[1].label == 1 and len(ex[1].choices) == 3  # numeric answer keys


def test_hellaswag_parquet(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "hs.parquet"
    datasets.Dataset.from_list(HELLASWAG).to_parquet(str(path))
    (ex,) = data.load_mc_task(_src(path, "hellaswag"))
    assert (
        ex.context
        == "Removing ice from car: Then, the man writes over the snow covering the window of a car. Then"
    )
    assert ex.label == 3
    assert ex.choices[3] == " , the man continues removing the snow. on his car."


def test_piqa_json(tmp_path: Path) -> None:
    path = tmp_path / "piqa.json"
    path.write_text(json.dumps(PIQA))
    (ex,) = data.load_mc_task(_src(path, "piqa"))
    assert ex.context == "Question: To make ice cubes\nAnswer:"
    assert ex.choices == [" freeze water in a tray", " boil water in a pot"] and ex.label == 0


def test_boolq_save_to_disk_dir(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_list(BOOLQ)})
    dd.save_to_disk(str(tmp_path / "boolq"))
    ex = data.load_mc_task(_src(tmp_path / "boolq", "boolq", split="validation"))
    assert ex[0].context == "The sky appears blue by day.\nQuestion: is the sky blue?\nAnswer:"
    assert ex[0].choices == [" no", " yes"] and [e.label for e in ex] == [1, 0]
    with pytest.raises(WorkerError, match="no split 'test'"):
        data.load_mc_task(_src(tmp_path / "boolq", "boolq", split="test"))


def test_hf_source_through_load_dataset_on_a_local_repo_dir(tmp_path: Path) -> None:
    repo = tmp_path / "my_mc"
    repo.mkdir()
    _write_jsonl(repo / "test.jsonl", MC * 3)
    ex = data.load_mc_task(TaskSource(name="m", source=f"hf:{repo}", format="mc", split="test"))
    assert len(ex) == 3 and ex[0].choices == [" 4", " 5", " 6"]
    with pytest.raises(WorkerError, match="cannot load hf:"):
        data.load_mc_task(TaskSource(name="m", source=f"hf:{tmp_path / 'nope'}", format="mc"))


def test_schema_mismatch_names_field_and_file(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "piqa.jsonl", PIQA)
    with pytest.raises(
        WorkerError, match=r"piqa\.jsonl: row 0 has no field 'question' required by schema 'arc'"
    ) as e:
        data.load_mc_task(_src(path, "arc"))
    assert "format" in str(e.value)
    bad = _write_jsonl(
        tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a", "b"], "label": 5}]
    )
    with pytest.raises(WorkerError, match="label 5, outside"):
        data.load_mc_task(_src(bad, "mc"))


def test_empty_and_missing_sources(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(WorkerError, match="has no rows"):
        data.load_mc_task(_src(empty, "mc"))
    with pytest.raises(WorkerError, match="has no rows"):
        data.load_sft(_src(empty, "sft"))
    with pytest.raises(WorkerError, match="does not exist"):
        data.load_mc_task(_src(tmp_path / "nope.jsonl", "mc"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(WorkerError, match="line 2 is not valid JSON"):
        data.load_mc_task(_src(broken, "mc"))


def test_limit_is_a_seeded_sample(tmp_path: Path) -> None:
    rows = [{"context": f"c{i}", "choices": ["a", "b"], "label": i % 2} for i in range(50)]
    path = _write_jsonl(tmp_path / "mc.jsonl", rows)
    a = data.load_mc_task(_src(path, "mc", limit=10, seed=1))
    b = data.load_mc_task(_src(path, "mc", limit=10, seed=1))
    c = data.load_mc_task(_src(path, "mc", limit=10, seed=2))
    assert a == b and a != c and len(a) == 10


def test_tiny_sources_are_deterministic_and_split() -> None:
    src = TaskSource(name="r", source="tiny:recall", format="mc", split="test", limit=50)
    a, b = data.load_mc_task(src), data.load_mc_task(src)
    assert a == b and len(a) == 50
    assert all(len(e.choices) == 4 and e.choices[e.label].strip() in e.context for e in a)
    train = data.load_mc_task(src.model_copy(update={"split": "train"}))
    assert [e.context for e in train[:50]] != [e.context for e in a]  # its own random stream
    sft = data.load_sft(
        TaskSource(name="s", source="tiny:arith", format="sft", split="train", limit=20)
    )
    assert all(s.response.startswith(" ") for s in sft)
    assert all(int(s.response) == sum(int(w) for w in s.prompt.split() if w.isdigit()) for s in sft)
    with pytest.raises(WorkerError, match="unknown tiny task"):
        data.load_mc_task(TaskSource(name="x", source="tiny:nope", format="mc"))


# --- SFT -------------------------------------------------------------------------------------


def test_sft_tokenization_and_collate(tiny_tokenizer, tmp_path: Path) -> None:
    tok = tiny_tokenizer
    rows = [
        {"prompt": "sum : 3 plus 4 is", "response": " 7"},
        {"prompt": "count : 1 2 next ", "response": "3"},
    ]
    src = _src(_write_jsonl(tmp_path / "sft.jsonl", rows), "sft")
    tk = data.load_sft(src, tok, max_length=32)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tk[0].prompt_ids == [tok.bos_token_id] + enc("sum : 3 plus 4 is")
    assert tk[0].response_ids == enc(" 7") + [tok.eos_token_id]
    # the trailing space of a prompt moves to the response (lm-eval's split)
    assert tk[1].prompt_ids == [tok.bos_token_id] + enc("count : 1 2 next")
    for side in ("right", "left"):
        batch = data.collate_sft(tk, tok, side)
        assert batch["prompt_lens"].tolist() == [len(t.prompt_ids) for t in tk]
        for i, t in enumerate(tk):
            real = batch["attention_mask"][i].bool()
            assert batch["input_ids"][i][real].tolist() == t.prompt_ids + t.response_ids
            kept = batch["labels"][i][batch["labels"][i] != -100].tolist()
            assert kept == t.response_ids  # loss on response tokens only
        assert (batch["labels"][~batch["attention_mask"].bool()] == -100).all()
    assert data.collate_sft(tk, tok, "left")["attention_mask"][1, 0] == 0


def test_prompt_longer_than_max_length(tiny_tokenizer) -> None:
    ex = [data.SftExample("recall : k1 = v2 , k3 = v4 . k1 ?", " v2")]
    with pytest.raises(WorkerError, match="longer than max_length 8"):
        data.tokenize_sft(ex, tiny_tokenizer, 8)
    (t,) = data.tokenize_sft(ex, tiny_tokenizer, 8, truncate="prompt_left")
    assert len(t) == 8 and t.prompt_ids[0] == tiny_tokenizer.bos_token_id
    assert t.response_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.convert_ids_to_tokens(t.prompt_ids[1:]) == ["=", "v4", ".", "k1", "?"]


def test_messages_rows_with_a_chat_template(tiny_tokenizer, tmp_path: Path) -> None:
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": "sum : 1 plus 1 is"},
                {"role": "assistant", "content": "2"},
            ]
        }
    ]
    sft = data.load_sft(_src(_write_jsonl(tmp_path / "chat.jsonl", rows), "sft"))
    (t,) = data.tokenize_sft(sft, tok, 64, use_chat_template=True)  # only when asked
    assert tok.convert_ids_to_tokens(t.prompt_ids)[-3:] == [
        ".",
        "<unk>",
        ":",
    ]  # "assistant" is not in the tiny vocab
    assert tok.decode(t.response_ids) == "2 ."
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(WorkerError, match="ending with an assistant turn"):
        data.load_sft(_src(bad, "sft"))


def test_split_train_eval_is_seeded_and_disjoint() -> None:
    items = list(range(100))
    train, held = data.split_train_eval(items, 0.1, seed=3)
    assert len(held) == 10 and set(train).isdisjoint(held) and sorted(train + held) == items
    assert data.split_train_eval(items, 0.1, seed=3) == (train, held)
