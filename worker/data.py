"""Data: multiple-choice tasks for evaluation and prompt/response pairs for SFT.

Sources (`TaskSource.source`):
    tiny:<task>              synthetic tasks of `worker.tiny` (offline, deterministic)
    hf:<dataset id>          `datasets.load_dataset(id, subset, split=split)`
    <file>.jsonl / .json     one object per line / a list of objects (or {"data": [...]})
    <file>.parquet           via `datasets.load_dataset("parquet", ...)`
    <directory>              saved with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`

Schemas (`TaskSource.format`), adapters follow lm-evaluation-harness's prompts:
    arc        question, choices{text, label}, answerKey      "Question: {q}\\nAnswer:"
    hellaswag  activity_label, ctx_a, ctx_b (or ctx), endings, label (str)
    piqa       goal, sol1, sol2, label                         "Question: {goal}\\nAnswer:"
    boolq      question, passage, answer (bool)                "{passage}\\nQuestion: {q}?\\nAnswer:"
    mc         context (or question), choices [str], label int (or answer)
    sft        prompt, response  |  messages [{role, content}] (last = assistant)

A row that does not fit its adapter is a WorkerError naming the row, the field and the source.

SFT formatting (`format_sft`), plain text unless the stage asks for the chat template:

- a `messages` row: every turn but the last as `Role: content`, turns separated by a blank line,
  then the assistant role marker; the response is the last (assistant) turn after one space:

      System: You are terse.            <- prompt (no loss; earlier assistant turns too)
      <blank line>
      User: Write a haiku.
      <blank line>
      Assistant:                        <- the prompt ends with the marker
       Leaves drift ...                 <- response (" " + content), then EOS

  Roles print as `System`, `User`, `Assistant` (any other role capitalised);
- a prompt/response row: the two texts, with a `"\n"` between them when the prompt does not end
  with whitespace and the response does not begin with it (rows whose response begins with a
  space, like the tiny tasks', are unchanged);
- `use_chat_template=True` (TrainArgs `chat_template`): the tokenizer's chat template; the prompt
  is the conversation up to the assistant turn (`add_generation_prompt=True`), the response the
  rest of the rendered conversation. Never used unless asked.

Plain text is split the lm-eval way (response tokens are `enc(prompt + response)[len(enc(prompt)
):]`, whitespace at the prompt's end moving to the response), then EOS: the prefix boundary is
the end of the prompt text exactly (the role marker for `messages` rows).

Rows longer than `max_length` (`long_rows`, TrainArgs): `drop` them, `truncate_prompt_left`
(the prompt loses tokens from its left, a BOS is kept; the response is never cut, a row whose
response alone does not fit is dropped), or `error`. `LongRowStats` counts what was dropped or
cut; the trainer writes it to events and summary.json.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from state.errors import WorkerError
from state.worker_config import TaskSource
from worker import tiny


@dataclass(frozen=True)
class McExample:
    """One multiple-choice question: score `context + choices[i]`, `label` is the right i."""

    context: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class SftExample:
    """One SFT row as loaded: `prompt`/`response` texts (a `messages` row: the earlier turns'
    contents joined by newlines, and the last turn's), and the turns themselves, which the
    role format and the chat template render (`format_sft`)."""

    prompt: str
    response: str
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class TokenizedSft:
    prompt_ids: list[int]
    response_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


#: `long_rows` policies for SFT rows over `max_length` (TrainArgs.long_rows).
LONG_ROW_POLICIES = ("drop", "truncate_prompt_left", "error")


@dataclass
class LongRowStats:
    """What `tokenize_sft` did with rows longer than `max_length` under `policy`."""

    policy: str
    max_length: int
    rows: int = 0  # rows tokenized
    kept: int = 0  # rows returned (cut ones included)
    dropped: int = 0  # rows over max_length left out (`drop`, or a response that cannot fit)
    truncated: int = 0  # rows whose prompt lost tokens from its left
    prompt_tokens_cut: int = 0
    longest: int = 0  # tokens of the longest row before any cut

    @property
    def long(self) -> int:
        return self.dropped + self.truncated

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "max_length": self.max_length,
            "rows": self.rows,
            "kept": self.kept,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "prompt_tokens_cut": self.prompt_tokens_cut,
            "longest": self.longest,
        }

    def describe(self) -> str:
        """One line: how many rows were over the limit and what happened to them."""
        if not self.long:
            return f"{self.rows} rows, none longer than max_length {self.max_length}"
        what = []
        if self.dropped:
            what.append(f"{self.dropped} dropped")
        if self.truncated:
            what.append(f"{self.truncated} cut ({self.prompt_tokens_cut} prompt tokens)")
        return (
            f"{self.long} of {self.rows} rows longer than max_length {self.max_length} "
            f"(longest {self.longest} tokens): {', '.join(what)} (long_rows={self.policy})"
        )


# ---------------------------------------------------------------------------------------------
# Raw rows


def load_rows(src: TaskSource) -> tuple[list[dict[str, Any]], str]:
    """(rows, where) for any source; `where` names it in error messages."""
    s = src.source
    if s.startswith("tiny:"):
        task = s[len("tiny:") :]
        n = src.limit or (4000 if src.split == "train" else 300)
        if src.format == "sft":
            return list(tiny.sft_rows(task, src.split, n, src.seed)), s
        if src.format != "mc":
            raise WorkerError(f"{s}: tiny tasks come in formats 'mc' or 'sft', not {src.format!r}")
        return tiny.mc_rows(task, src.split, n, src.seed), s
    if s.startswith("hf:"):
        return _load_hf(s[len("hf:") :], src), s
    path = Path(s).expanduser()
    if not path.exists():
        raise WorkerError(
            f"data source {s!r} does not exist",
            hint="use tiny:<task>, hf:<dataset id>, or a path to .jsonl/.json/.parquet or a save_to_disk dir",
        )
    if path.is_dir():
        return _load_disk(path, src.split), str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path), str(path)
    if suffix == ".json":
        return _read_json(path), str(path)
    if suffix == ".parquet":
        return _load_parquet(path), str(path)
    raise WorkerError(
        f"unsupported data file {path}", hint="use .jsonl, .json, .parquet or a save_to_disk dir"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkerError(f"{path} line {n} is not valid JSON: {exc.msg}") from exc
            if not isinstance(row, dict):
                raise WorkerError(f"{path} line {n} is not a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WorkerError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise WorkerError(f"{path} must hold a list of objects (or {{'data': [...]}})")
    return data


def _load_parquet(path: Path) -> list[dict[str, Any]]:
    # lazy, for start-up time: pulls in datasets
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:
        raise WorkerError(f"cannot read parquet file {path}: {exc}") from exc
    return list(ds)


def _load_disk(path: Path, split: str) -> list[dict[str, Any]]:
    # lazy, for start-up time: pulls in datasets
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise WorkerError(
            f"{path} is not a directory saved with save_to_disk: {exc}",
            hint="give a file path, or a dir written by Dataset.save_to_disk",
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise WorkerError(f"{path} has no split {split!r} (has: {', '.join(ds)})")
        ds = ds[split]
    return list(ds)


def _load_hf(dataset_id: str, src: TaskSource) -> list[dict[str, Any]]:
    # lazy, for start-up time: pulls in datasets
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, src.subset, split=src.split, revision=src.revision)
    except Exception as exc:
        raise WorkerError(
            f"cannot load hf:{dataset_id} (subset {src.subset!r}, split {src.split!r}, "
            f"revision {src.revision or 'default branch'}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="check the id/subset/split, or download it and point `source` at local files",
        ) from exc
    return list(ds)


# ---------------------------------------------------------------------------------------------
# Schema adapters (row -> McExample)


def _field(row: dict[str, Any], name: str, where: str, i: int, schema: str) -> Any:
    if name not in row or row[name] is None:
        raise WorkerError(
            f"{where}: row {i} has no field {name!r} required by schema {schema!r} "
            f"(fields: {', '.join(sorted(row)) or 'none'})",
            hint="set `format` to the schema the file is in",
        )
    return row[name]


def _label_index(
    value: Any, n: int, where: str, i: int, labels: Sequence[str] | None = None
) -> int:
    if labels is not None and str(value) in [str(x) for x in labels]:
        return [str(x) for x in labels].index(str(value))
    try:
        idx = int(value)
    except (TypeError, ValueError):
        raise WorkerError(f"{where}: row {i} has label {value!r}, not one of the choices") from None
    if not 0 <= idx < n:
        raise WorkerError(f"{where}: row {i} has label {idx}, outside 0..{n - 1}")
    return idx


def _arc(row: dict[str, Any], where: str, i: int) -> McExample:
    q = _field(row, "question", where, i, "arc")
    ch = _field(row, "choices", where, i, "arc")
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
        raise WorkerError(
            f"{where}: row {i} field 'choices' must be {{'text': [...], 'label': [...]}}"
        )
    key = _field(row, "answerKey", where, i, "arc")
    label = _label_index(key, len(ch["text"]), where, i, ch["label"])
    return McExample(f"Question: {q}\nAnswer:", [f" {t}" for t in ch["text"]], label)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any], where: str, i: int) -> McExample:
    endings = _field(row, "endings", where, i, "hellaswag")
    if "ctx_a" in row:
        ctx = row["ctx_a"] + " " + str(_field(row, "ctx_b", where, i, "hellaswag")).capitalize()
    else:
        ctx = _field(row, "ctx", where, i, "hellaswag")
    act = row.get("activity_label")
    query = _hellaswag_clean(f"{act}: {ctx}" if act else ctx)
    label = _label_index(_field(row, "label", where, i, "hellaswag"), len(endings), where, i)
    return McExample(query, [" " + _hellaswag_clean(e) for e in endings], label)


def _piqa(row: dict[str, Any], where: str, i: int) -> McExample:
    goal = _field(row, "goal", where, i, "piqa")
    sols = [_field(row, "sol1", where, i, "piqa"), _field(row, "sol2", where, i, "piqa")]
    label = _label_index(_field(row, "label", where, i, "piqa"), 2, where, i)
    return McExample(f"Question: {goal}\nAnswer:", [f" {s}" for s in sols], label)


def _boolq(row: dict[str, Any], where: str, i: int) -> McExample:
    q = _field(row, "question", where, i, "boolq")
    passage = _field(row, "passage", where, i, "boolq")
    ans = _field(row, "answer", where, i, "boolq")
    if isinstance(ans, str) and ans.lower() in {"true", "false"}:
        ans = ans.lower() == "true"
    if not isinstance(ans, bool | int):
        raise WorkerError(f"{where}: row {i} field 'answer' must be a boolean, got {ans!r}")
    return McExample(f"{passage}\nQuestion: {q}?\nAnswer:", [" no", " yes"], int(bool(ans)))


def _mc(row: dict[str, Any], where: str, i: int) -> McExample:
    ctx = row.get("context", row.get("question"))
    if ctx is None:
        _field(row, "context", where, i, "mc")
    choices = _field(row, "choices", where, i, "mc")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) for c in choices)
    ):
        raise WorkerError(f"{where}: row {i} field 'choices' must be a list of at least 2 strings")
    label_value = row.get("label", row.get("answer"))
    if label_value is None:
        _field(row, "label", where, i, "mc")
    label = _label_index(label_value, len(choices), where, i)
    # generic rows follow the tiny tasks' convention: a choice without a leading space gets one
    return McExample(str(ctx), [c if c[:1].isspace() else " " + c for c in choices], label)


ADAPTERS: dict[str, Callable[[dict[str, Any], str, int], McExample]] = {
    "arc": _arc,
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "boolq": _boolq,
    "mc": _mc,
}


def _sample(rows: list[Any], src: TaskSource) -> list[Any]:
    if src.limit is not None and len(rows) > src.limit:
        rng = random.Random(src.seed)
        keep = sorted(rng.sample(range(len(rows)), src.limit))
        rows = [rows[i] for i in keep]
    return rows


def load_mc_task(src: TaskSource) -> list[McExample]:
    """The multiple-choice examples of one task (at most `src.limit`, a seeded sample)."""
    if src.format == "sft":
        raise WorkerError(
            f"task {src.name!r} has format 'sft'; evaluation needs a multiple-choice schema"
        )
    rows, where = load_rows(src)
    if not rows:
        raise WorkerError(
            f"task {src.name!r}: {where} has no rows", hint="check the source, split and subset"
        )
    adapter = ADAPTERS[src.format]
    return [adapter(r, where, i) for i, r in enumerate(_sample(rows, src))]


# ---------------------------------------------------------------------------------------------
# SFT


def _sft_row(row: dict[str, Any], where: str, i: int) -> SftExample:
    if "messages" in row:
        msgs = row["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
        )
        if not ok or msgs[-1]["role"] != "assistant":
            raise WorkerError(
                f"{where}: row {i} field 'messages' must be a list of {{role, content}} ending "
                "with an assistant turn"
            )
        prompt = "\n".join(str(m["content"]) for m in msgs[:-1])
        return SftExample(prompt, str(msgs[-1]["content"]), messages=msgs)
    prompt = _field(row, "prompt", where, i, "sft")
    response = _field(row, "response", where, i, "sft")
    return SftExample(str(prompt), str(response))


def load_sft(
    src: TaskSource,
    tokenizer: Any = None,
    *,
    max_length: int | None = None,
    truncate: str | None = None,
    long_rows: str = "error",
    chat_template: bool = False,
    stats: LongRowStats | None = None,
) -> list[Any]:
    """Prompt/response pairs: schema `sft` (prompt, response, or chat `messages`), or any
    multiple-choice schema turned into (context, correct choice).

    Without a tokenizer: list[SftExample]. With one: list[TokenizedSft] (`tokenize_sft` with
    `max_length`, default the tokenizer's model_max_length, the `long_rows` policy, the chat
    template only if `chat_template`; `stats` gets the long-row counts)."""
    examples = _load_sft_examples(src)
    if tokenizer is None:
        return examples
    limit = max_length or int(min(getattr(tokenizer, "model_max_length", 2048), 1 << 20))
    return tokenize_sft(
        examples,
        tokenizer,
        limit,
        truncate=truncate,
        long_rows=long_rows,
        use_chat_template=chat_template,
        stats=stats,
    )


def _load_sft_examples(src: TaskSource) -> list[SftExample]:
    rows, where = load_rows(src)
    if not rows:
        raise WorkerError(
            f"SFT data {src.name!r}: {where} has no rows", hint="check the source and split"
        )
    rows = _sample(rows, src)
    if src.format == "sft":
        return [_sft_row(r, where, i) for i, r in enumerate(rows)]
    mc = [ADAPTERS[src.format](r, where, i) for i, r in enumerate(rows)]
    return [SftExample(e.context, e.choices[e.label]) for e in mc]


def split_train_eval(
    examples: list[Any], fraction: float, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """A seeded split: (train, held-out). The held-out part has at least one row if fraction > 0."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(examples) * fraction)))
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def sft_splits(
    args: Any, tokenizer: Any, stats: dict[str, LongRowStats] | None = None
) -> tuple[list[TokenizedSft], list[TokenizedSft]]:
    """(train, held-out) tokenized SFT rows for TrainArgs: `eval_data` when given, else a
    seeded `eval_fraction` of `data`; with the args' `long_rows` policy and `chat_template`.
    `stats` (a dict) gets the long-row counts of `data` and, when given, `eval_data`."""
    policy = getattr(args, "long_rows", "error")
    chat = bool(getattr(args, "chat_template", False))

    def load(key: str) -> list[TokenizedSft]:
        st = LongRowStats(policy, args.max_length)
        rows = load_sft(
            getattr(args, key),
            tokenizer,
            max_length=args.max_length,
            long_rows=policy,
            chat_template=chat,
            stats=st,
        )
        if stats is not None:
            stats[key] = st
        return rows

    train = load("data")
    if args.eval_data is not None:
        return train, load("eval_data")
    return split_train_eval(train, args.eval_fraction, args.seed)


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_pair(
    tokenizer: Any,
    context: str,
    continuation: str,
    *,
    add_bos: bool = True,
) -> tuple[list[int], list[int]]:
    """lm-eval split: trailing spaces of the context move to the continuation, and the
    continuation tokens are enc(context + continuation)[len(enc(context)):].

    `add_bos`: a BOS (when the tokenizer has one) starts the context. The default (True) is
    SFT's rule; evaluation passes the stage's rule (`worker.evaluate.resolve_add_bos`), which
    is lm-evaluation-harness's `add_bos_token` (0.4.13, models/huggingface.py `tok_encode`:
    `add_special_tokens=add_bos_token`, or the tokenizer's own default when it is None; the same
    tokens for a tokenizer whose only special token is a leading BOS; an explicit BOS here also
    stays right for one that appends EOS).

    An empty context is the prefix token alone, BOS (or EOS when there is no BOS), whatever
    `add_bos`, and the continuation is encoded on its own without special tokens, as lm-eval's
    `TemplateLM.loglikelihood` (0.4.9.2+: `tok_encode(continuation, add_special_tokens=False)`;
    0.4.9 gave it a second BOS of its own)."""
    bos = _bos(tokenizer) if add_bos else []
    if not context:
        prefix = _bos(tokenizer) or [tokenizer.eos_token_id]
        return prefix, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx) :]
    if not ctx:  # an all-space context: the prefix token, as for an empty one
        return _bos(tokenizer) or [tokenizer.eos_token_id], cont
    return bos + ctx, cont


def _chat_split(tokenizer: Any, ex: SftExample) -> tuple[str, str]:
    msgs = ex.messages or [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": ex.response},
    ]
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise WorkerError(
            "the tokenizer's chat template renders the prompt differently inside the full "
            "conversation; cannot tell prompt tokens from response tokens"
        )
    return prompt, full[len(prompt) :]


#: How roles print in the plain role format (any other role: capitalised).
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
#: Between turns of a `messages` row.
TURN_SEPARATOR = "\n\n"
#: Between a plain prompt and a response that would otherwise touch it.
PROMPT_RESPONSE_SEPARATOR = "\n"


def _role(role: Any) -> str:
    name = str(role).strip()
    return ROLE_NAMES.get(name.lower(), name.capitalize() or "User")


def format_messages(messages: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(prompt, response) of a `messages` row in the plain role format (module docstring): the
    prompt ends with the assistant role marker, the response is the last turn after a space."""
    turns = [f"{_role(m['role'])}: {m['content']}" for m in messages[:-1]]
    prompt = TURN_SEPARATOR.join([*turns, f"{_role(messages[-1]['role'])}:"])
    reply = str(messages[-1]["content"])
    return prompt, reply if reply[:1].isspace() else " " + reply


def with_separator(prompt: str, response: str) -> tuple[str, str]:
    """(prompt, response) with `PROMPT_RESPONSE_SEPARATOR` before the response when the two
    would touch (the prompt does not end with whitespace, the response does not begin with
    it); unchanged otherwise, so rows that bring their own space keep their exact tokens."""
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        return prompt, PROMPT_RESPONSE_SEPARATOR + response
    return prompt, response


def format_sft(ex: SftExample) -> tuple[str, str]:
    """The (prompt, response) texts of one row as the model sees them without a chat template."""
    if ex.messages:
        return format_messages(ex.messages)
    return with_separator(ex.prompt, ex.response)


_LEGACY_TRUNCATE = {"error": "error", "prompt_left": "truncate_prompt_left"}


def tokenize_sft(
    examples: list[SftExample],
    tokenizer: Any,
    max_length: int,
    *,
    long_rows: str = "error",
    truncate: str | None = None,
    use_chat_template: bool = False,
    stats: LongRowStats | None = None,
) -> list[TokenizedSft]:
    """Token ids of each pair (see the module docstring for the formats and the policies).

    `long_rows`: `drop`, `truncate_prompt_left` or `error` for rows over `max_length`
    (`truncate="prompt_left"|"error"` is the older spelling); `use_chat_template`: render with
    the tokenizer's chat template (it must have one); `stats`: filled with the counts."""
    if truncate is not None:
        if truncate not in _LEGACY_TRUNCATE:
            raise WorkerError(
                f"unknown truncation policy {truncate!r}", hint="use 'error' or 'prompt_left'"
            )
        long_rows = _LEGACY_TRUNCATE[truncate]
    if long_rows not in LONG_ROW_POLICIES:
        raise WorkerError(
            f"unknown long_rows policy {long_rows!r}", hint=f"use one of {LONG_ROW_POLICIES}"
        )
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise WorkerError(
            f"chat_template=true but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
            "has no chat template",
            hint="set chat_template=false (the plain role format) or use a tokenizer with one",
        )
    st = stats if stats is not None else LongRowStats(long_rows, max_length)
    st.policy, st.max_length = long_rows, max_length
    out = []
    for i, ex in enumerate(examples):
        if use_chat_template:
            prompt_text, response_text = _chat_split(tokenizer, ex)
            # the rendered template carries its own BOS/special tokens
            p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            whole = tokenizer(prompt_text + response_text, add_special_tokens=False)["input_ids"]
            if whole[: len(p_ids)] == p_ids:
                r_ids = whole[len(p_ids) :]
            else:  # a token across the boundary: keep the prompt's own tokens exactly
                r_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        else:
            p_ids, r_ids = encode_pair(tokenizer, *format_sft(ex))
            if tokenizer.eos_token_id is not None:
                r_ids = r_ids + [tokenizer.eos_token_id]
        if not r_ids:
            raise WorkerError(f"SFT example {i} has an empty response")
        st.rows += 1
        n = len(p_ids) + len(r_ids)
        st.longest = max(st.longest, n)
        if n > max_length:
            if long_rows == "error":
                raise WorkerError(
                    f"SFT example {i}: prompt ({len(p_ids)} tokens) + response ({len(r_ids)}) is "
                    f"longer than max_length {max_length}",
                    hint="raise max_length, or set long_rows to 'drop' or 'truncate_prompt_left'",
                )
            if long_rows == "drop" or len(r_ids) >= max_length:
                st.dropped += 1  # truncate_prompt_left never cuts a response: the row goes
                continue
            keep = max_length - len(r_ids)
            head = p_ids[:1] if p_ids[:1] == _bos(tokenizer) and keep > 1 else []
            st.truncated += 1
            st.prompt_tokens_cut += len(p_ids) - keep
            p_ids = head + p_ids[len(p_ids) - (keep - len(head)) :]
        out.append(TokenizedSft(p_ids, r_ids))
    st.kept += len(out)
    return out


def collate_sft(
    batch: list[TokenizedSft], pad_id: Any, padding_side: str = "right"
) -> dict[str, Any]:
    """input_ids, attention_mask, labels (-100 on prompt and padding), prompt_lens (real prompt
    tokens per row): the batch the masks and the trainer expect. `labels` are aligned with
    `input_ids` (HF convention): the loss shifts them, logits[:, t] predicts labels[:, t + 1]."""
    # lazy, for start-up time: pulls in torch
    import torch

    if not isinstance(pad_id, int):  # a tokenizer
        pad_id = pad_id.pad_token_id
    if padding_side not in {"right", "left"}:
        raise WorkerError(f"unknown padding side {padding_side!r}", hint="use 'right' or 'left'")
    if not batch:
        raise WorkerError("cannot collate an empty batch")
    width = max(len(b) for b in batch)
    n = len(batch)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    am = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        row = b.prompt_ids + b.response_ids
        s = 0 if padding_side == "right" else width - len(row)
        ids[i, s : s + len(row)] = torch.tensor(row)
        am[i, s : s + len(row)] = 1
        labels[i, s + len(b.prompt_ids) : s + len(row)] = torch.tensor(b.response_ids)
    prompt_lens = torch.tensor([len(b.prompt_ids) for b in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "prompt_lens": prompt_lens}
