"""The tiny profile: synthetic multiple-choice tasks, and a small Mistral-architecture model with
its own tokenizer, built offline, deterministically, and cached like a hub download.

`resolve("tiny://default")` returns a normal `save_pretrained` directory (config, weights,
tokenizer) under `$ORCH_CACHE_DIR/tiny/<hash>` (default `~/.cache/orch/tiny/<hash>`), where the
hash covers the whole build recipe (`TinySpec` + `RECIPE_VERSION`). The first caller builds it
under a file lock, into a temp dir renamed into place, so concurrent processes neither race nor
see a half-written model.

Tasks (`tiny:<name>` data sources, 4 choices each; `tiny:a+b` mixes tasks row by row):
    dup      the item before the repeat: "dup : v3 v7 v1 v8 v7 v9 ." -> " v8"
    arith    addition facts: "sum : 3 plus 4 is" -> " 7"
    succ     successor in a counting run: "count : 4 5 6 7 next" -> " 8"
    recall   key-value recall: "recall : k3 = v7 , k1 = v2 ... . k1 ?" -> " v2" (not learned
             by the tiny model; kept as a data source)
Each yields multiple-choice rows (context, choices, label) and SFT rows (prompt, response), with
disjoint random streams per split. `dup` is the task a bidirectional prompt breaks in any causal
solution (see `_dup`); arith and succ are solved by the last token alone and barely notice it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from state.errors import WorkerError

RECIPE_VERSION = 1
SCHEME = "tiny://"

# ---------------------------------------------------------------------------------------------
# Synthetic tasks. A generator maps a random.Random to (context, choices, label).

Row = tuple[str, list[str], int]

N_KEYS = 12
N_NUM = 20


def _choices(rng: random.Random, answer: str, pool: list[str]) -> tuple[list[str], int]:
    others = rng.sample([p for p in pool if p != answer], 3)
    label = rng.randrange(4)
    others.insert(label, answer)
    return others, label


def _recall(rng: random.Random) -> Row:
    keys = rng.sample(range(N_KEYS), 4)
    vals = rng.sample(range(N_KEYS), 4)
    pairs = " , ".join(f"k{k} = v{v}" for k, v in zip(keys, vals, strict=True))
    i = rng.randrange(4)
    answer = f"v{vals[i]}"
    # distractors are the other values in the context: copying any value is not enough
    label = rng.randrange(4)
    choices = [f"v{v}" for j, v in enumerate(vals) if j != i]
    rng.shuffle(choices)
    choices.insert(label, answer)
    return f"recall : {pairs} . k{keys[i]} ?", choices, label


def _arith(rng: random.Random) -> Row:
    a, b = rng.randrange(10), rng.randrange(10)
    choices, label = _choices(rng, str(a + b), [str(n) for n in range(19)])
    return f"sum : {a} plus {b} is", choices, label


def _succ(rng: random.Random) -> Row:
    n = rng.randrange(3, 6)
    start = rng.randrange(N_NUM - n)
    run = " ".join(str(start + j) for j in range(n))
    choices, label = _choices(rng, str(start + n), [str(x) for x in range(N_NUM + 1)])
    return f"count : {run} next", choices, label


def _dup(rng: random.Random) -> Row:
    # Which item came right before the repeat: "dup : v3 v7 v1 v8 v7 v9 ." -> " v8" (v7 repeats;
    # the item before its second occurrence). A causal model marks each position "my token
    # occurred earlier" (a duplicate-token head: content, looking back) and copies the token
    # before the marked one. Under a bidirectional prompt the first occurrence sees the second
    # one too and is marked as well, so the item before the first occurrence (v3, always among
    # the choices) competes with the answer.
    items = rng.sample(range(N_KEYS), 5)
    i = rng.randrange(1, 3)  # first occurrence, with an item before it
    j = rng.randrange(i + 2, 6)  # second occurrence, not adjacent
    seq = items[:j] + [items[i]] + items[j:]
    seq = seq[:6]
    answer = seq[j - 1]
    decoys = [seq[i - 1], seq[i]]
    rest = [v for v in seq if v not in decoys and v != answer]
    decoys.append(rng.choice(rest))
    rng.shuffle(decoys)
    label = rng.randrange(4)
    decoys.insert(label, answer)
    listed = " ".join(f"v{v}" for v in seq)
    return f"dup : {listed} .", [f"v{v}" for v in decoys], label


TASKS: dict[str, Callable[[random.Random], Row]] = {
    "dup": _dup,
    "recall": _recall,
    "arith": _arith,
    "succ": _succ,
}
SPLITS = ("train", "validation", "test")


def _rng(task: str, split: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{task}|{split}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _mixture(task: str) -> Callable[[random.Random], Row]:
    """`a+b+c`: each row drawn from one of the named tasks, in turn (equal shares)."""
    parts = task.split("+")
    state = {"i": 0}

    def draw(rng: random.Random) -> Row:
        gen = TASKS[parts[state["i"] % len(parts)]]
        state["i"] += 1
        return gen(rng)

    return draw


def _generator(task: str) -> Callable[[random.Random], Row]:
    return TASKS[task] if task in TASKS else _mixture(task)


def _check_task(task: str, split: str) -> None:
    if not all(t in TASKS for t in task.split("+")):
        raise WorkerError(
            f"unknown tiny task {task!r}",
            hint=f"use one of {', '.join(f'tiny:{t}' for t in TASKS)}",
        )
    if split not in SPLITS:
        raise WorkerError(
            f"unknown split {split!r} for tiny:{task}", hint=f"use one of {', '.join(SPLITS)}"
        )


def mc_rows(task: str, split: str = "test", n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """`n` multiple-choice rows in the generic `mc` schema (context, choices, label)."""
    _check_task(task, split)
    rng = _rng(task, split, seed)
    gen = _generator(task)
    out = []
    for _ in range(n):
        ctx, choices, label = gen(rng)
        out.append({"context": ctx, "choices": choices, "label": label})
    return out


def sft_rows(task: str, split: str = "train", n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/response rows: the context, and the correct choice with its leading space."""
    return [
        {"prompt": r["context"], "response": " " + r["choices"][r["label"]]}
        for r in mc_rows(task, split, n, seed)
    ]


def task_words() -> list[str]:
    """Every word any task can produce (the tiny tokenizer's vocabulary)."""
    words = {"recall", ":", "=", ",", ".", "?", "sum", "plus", "is", "count", "next", "dup"}
    words |= {f"k{i}" for i in range(N_KEYS)} | {f"v{i}" for i in range(N_KEYS)}
    words |= {str(i) for i in range(max(19, N_NUM + 1))}
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Model recipe


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the built model; its hash names the cache directory."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    train_tasks: tuple[str, ...] = ("dup", "arith", "succ")
    train_rows: int = 6000  # per task
    # `dup` needs a two-layer circuit that forms late: measured on seeds 0-1, 1500 steps left
    # it at 0.64-0.76, 4000 at 0.90-1.00 (causal); arith and succ are learned by step 500
    steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-3
    loss_on: str = "response"  # "response": answer tokens only (learns the tasks fastest); "all"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Hash of the recipe: this spec, this module's source (task generators, training
        loop) and the library versions, so a cached model never outlives its recipe."""
        # lazy, for start-up time: pulls in tokenizers; pulls in torch; pulls in transformers
        import tokenizers
        import torch
        import transformers

        blob = json.dumps(
            {
                "v": RECIPE_VERSION,
                "spec": asdict(self),
                "src": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
                "libs": [torch.__version__, transformers.__version__, tokenizers.__version__],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SPECS: dict[str, TinySpec] = {"default": TinySpec()}


def cache_root() -> Path:
    base = os.environ.get("ORCH_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "orch"
    return root / "tiny"


def parse_uri(uri: str) -> TinySpec:
    """`tiny://NAME` or `tiny://NAME?seed=N` -> its TinySpec. The seed drives everything random
    in the build (initial weights, pre-training rows, batch order), so `--seeds` varies the
    tiny model's pre-training as well as the fine-tune."""
    if not uri.startswith(SCHEME):
        raise WorkerError(f"{uri!r} is not a tiny model id", hint="use tiny://default")
    name, _, query = uri[len(SCHEME) :].partition("?")
    if name not in SPECS:
        raise WorkerError(
            f"unknown tiny model {uri!r}", hint=f"use one of {', '.join(SCHEME + n for n in SPECS)}"
        )
    spec = SPECS[name]
    if not query:
        return spec
    key, _, value = query.partition("=")
    if key != "seed" or not value.lstrip("-").isdigit():
        raise WorkerError(
            f"bad tiny model id {uri!r}", hint=f"the only option is seed: {SCHEME}{name}?seed=3"
        )
    return replace(spec, seed=int(value))


def uri_for(name: str = "default", seed: int | None = None) -> str:
    """The id `parse_uri` reads back: the plain name for the spec's own seed."""
    if seed is None or seed == SPECS[name].seed:
        return SCHEME + name
    return f"{SCHEME}{name}?seed={seed}"


def resolve(uri: str, progress: Callable[[str], None] | None = None) -> Path:
    """`tiny://NAME[?seed=N]` -> a save_pretrained directory, built on first use. `progress`
    gets a line now and then while a build runs (steps, loss, ETA)."""
    return ensure_built(parse_uri(uri), progress=progress)


_DONE = "tiny_spec.json"  # written last: its presence means the directory is complete


def ensure_built(
    spec: TinySpec, root: Path | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    root = root or cache_root()
    dest = root / spec.key()
    if (dest / _DONE).exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{spec.key()}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"tiny model {spec.key()}: another process is building it; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (dest / _DONE).exists():  # another process built it while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=root))
        try:
            build(spec, tmp, progress=progress)
            if dest.exists():
                shutil.rmtree(dest)  # a partial leftover without the done marker
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def build_tokenizer(texts: Iterator[str] | list[str]) -> Any:
    """A word-level tokenizer trained with `tokenizers` on the tasks' text, wrapped as a
    PreTrainedTokenizerFast (loads with AutoTokenizer)."""
    # lazy, for start-up time: pulls in tokenizers; pulls in transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=512,
    )


def build(spec: TinySpec, dest: Path, progress: Callable[[str], None] | None = None) -> None:
    """Build, pre-train and save the tiny model into `dest` (deterministic for a spec)."""
    # lazy, for start-up time: pulls in torch
    import torch

    t0 = time.monotonic()
    threads = torch.get_num_threads()
    # One thread: this model is so small that per-op overhead dominates, and extra threads
    # only fight over shared cores (measured: 2 threads ran 7x slower on a busy 2-core box).
    torch.set_num_threads(1)
    try:
        _train_and_save(spec, dest, t0, progress or (lambda _line: None))
    finally:
        torch.set_num_threads(threads)


def _train_and_save(spec: TinySpec, dest: Path, t0: float, progress: Callable[[str], None]) -> None:
    # lazy, for start-up time: pulls in torch; pulls in transformers
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(spec.seed)
    # Vocabulary: every word the tasks use (listed, so no split's sample can miss a word).
    tokenizer = build_tokenizer([" ".join(task_words())])
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = MistralForCausalLM(config)
    rows = [
        r for task in spec.train_tasks for r in sft_rows(task, "train", spec.train_rows, spec.seed)
    ]
    enc = tokenizer([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"]
    width = max(len(e) for e in enc) + 2
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    for i, (e, r) in enumerate(zip(enc, rows, strict=True)):
        answer = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        row = e + answer + [tokenizer.eos_token_id]
        ids[i, : len(row)] = torch.tensor(row)
        first = len(e) if spec.loss_on == "response" else 0
        labels[i, first : len(row)] = torch.tensor(row[first:])
    am = (ids != tokenizer.pad_token_id).long()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    progress(f"building the tiny model (seed {spec.seed}): pre-training {spec.steps} steps")
    every = max(1, spec.steps // 10)
    for step in range(1, spec.steps + 1):
        idx = torch.randint(0, len(enc), (spec.batch_size,), generator=gen)
        out = model(input_ids=ids[idx], attention_mask=am[idx], labels=labels[idx])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == spec.steps:
            took = time.monotonic() - t0
            eta = took / step * (spec.steps - step)
            progress(
                f"building the tiny model (seed {spec.seed}): step {step}/{spec.steps}, "
                f"loss {float(out.loss.detach()):.3f}, {took:.0f} s, ETA {eta:.0f} s"
            )
    model.eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    meta = {
        "spec": asdict(spec),
        "recipe_version": RECIPE_VERSION,
        "final_train_loss": float(out.loss.detach()),
        "build_seconds": round(time.monotonic() - t0, 2),
    }
    (dest / _DONE).write_text(json.dumps(meta, indent=2))
