"""The worker's causal evaluation against lm-evaluation-harness (the `dev` extra's pin, 0.4.13),
offline on CPU: a small local model and local data sets (one in the worker's `mc` schema, with
empty contexts; one in ARC's schema scored through lm-eval's own arc_easy YAML), given to lm-eval
as task YAMLs in a local directory (`TaskManager(include_path=...)`). With and without BOS, and
with both defaults: lm-eval's `add_bos_token` unset (the tokenizer's own default since 0.4.9.2)
against the worker's `add_bos` unset. Per-choice log-likelihoods equal within 1e-4, acc and
acc_norm equal; and the metrics the worker names as lm-eval counterparts are those in lm-eval's
task YAMLs. Offline throughout (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, tests/worker/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from state.phases import MaskMode
from state.worker_config import EvalArgs, TaskSource
from worker import evaluate as ev
from worker import modeling, tiny
from worker.data import load_mc_task


def _import_lm_eval() -> Any:
    return pytest.importorskip("lm_eval", reason="lm_eval is in the dev extra")


#: trained a little (arith and succ), so choices have clearly different scores
SPEC = tiny.TinySpec(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    train_tasks=("arith", "succ"),
    train_rows=300,
    steps=150,
    batch_size=32,
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ "bos": the tiny build (its tokenizer adds BOS by default); "nobos": the same weights
    with a tokenizer that adds nothing by default (BOS token still defined)."""
    from transformers import AutoTokenizer

    built = tiny.ensure_built(SPEC, root=tmp_path_factory.mktemp("lm-eval-tiny"))
    nobos = tmp_path_factory.mktemp("lm-eval-nobos")
    for f in built.iterdir():
        if f.name.startswith("tokenizer"):
            continue
        (nobos / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(built)
    tok.backend_tokenizer.post_processor = None
    tok.save_pretrained(nobos)
    return {"bos": built, "nobos": nobos}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lm-eval-data")
    mc = tiny.mc_rows("arith", "test", 16, 0) + tiny.mc_rows("succ", "test", 16, 0)
    mc[3] = {**mc[3], "context": ""}  # lm-eval scores an empty context after its prefix token
    mc[20] = {**mc[20], "context": ""}
    arc = [
        {
            "id": str(i),
            "question": r["context"],
            "choices": {"text": r["choices"], "label": list("ABCD")},
            "answerKey": "ABCD"[r["label"]],
        }
        for i, r in enumerate(tiny.mc_rows("succ", "test", 24, 1))
    ]
    out = {}
    for name, rows in (("mc", mc), ("arc", arc)):
        out[name] = d / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory, data_files: dict[str, Path]) -> Path:
    """The two tasks as lm-eval task YAMLs in a local directory, lm-eval's supported way to add
    tasks (`TaskManager(include_path=...)`; in 0.4.13 `simple_evaluate` resolves every task,
    a `ConfigurableTask` object too, through the manager's index). orch_arc includes lm-eval's
    own arc_easy.yaml and only points it at the local file."""
    lm_eval = _import_lm_eval()
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    local = {
        "dataset_path": "json",
        "dataset_name": None,
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
    }
    mean = {"aggregation": "mean", "higher_is_better": True}
    mc = {
        **local,
        "task": "orch_mc",
        "dataset_kwargs": {"data_files": {"test": str(data_files["mc"])}},
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}],
    }
    arc = {
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"),
        **local,
        "task": "orch_arc",
        "tag": [],
        "dataset_kwargs": {"data_files": {"test": str(data_files["arc"])}},
    }
    for cfg in (mc, arc):  # JSON is YAML
        (d / f"{cfg['task']}.yaml").write_text(json.dumps(cfg, indent=1) + "\n")
    return d


def _lm_eval_scores(
    task_dir: Path,
    model_dir: Path,
    add_bos_token: bool | None,
    max_length: int | None = None,
) -> dict[str, tuple[list[list[float]], dict[str, float]]]:
    """{task: (per-choice log-likelihoods in document order, {acc, acc_norm})} from lm-eval.
    `add_bos_token=None` leaves it unset: HFLM's default."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    bos = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    lm = HFLM(
        pretrained=str(model_dir),
        device="cpu",
        batch_size=8,
        dtype="float32",
        max_length=max_length,
        **bos,
    )
    res = simple_evaluate(
        model=lm,
        tasks=["orch_mc", "orch_arc"],
        num_fewshot=0,
        log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    assert res is not None
    out = {}
    for ours, theirs in (("mc", "orch_mc"), ("arc", "orch_arc")):
        samples = sorted(res["samples"][theirs], key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        metrics = res["results"][theirs]
        out[ours] = (lls, {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]})
    return out


def _worker_scores(
    model_dir: Path, files: dict[str, Path], add_bos: bool | None, max_length: int | None = None
) -> tuple[dict[str, list[list[float]]], dict[str, Any]]:
    tasks = [
        TaskSource(name="mc", source=str(files["mc"]), format="mc"),
        TaskSource(name="arc", source=str(files["arc"]), format="arc"),
    ]
    args = EvalArgs(
        model=str(model_dir),
        tasks=tasks,
        device="cpu",
        dtype="float32",
        batch_size=8,
        add_bos=add_bos,
        max_length=max_length,
        mask=MaskMode.CAUSAL,
    )
    loaded = modeling.load(args)
    tok = loaded.tokenizer
    bos, _ = ev.resolve_add_bos(tok, add_bos)
    limit, _ = ev.context_limit(loaded.model, tok, max_length)
    scores = {}
    for t in tasks:
        qs, _ = ev.prepare(load_mc_task(t), tok, limit, bos)
        scores[t.name] = ev.score_task(
            loaded.model, qs, MaskMode.CAUSAL, tok.pad_token_id, 8, True, ev.Counter()
        )
    return scores, ev.evaluate(args, loaded=loaded)


@pytest.mark.parametrize(
    ("tokenizer", "add_bos", "add_bos_token", "applied", "source"),
    [
        ("bos", True, True, True, "stage"),
        ("bos", False, False, False, "stage"),
        # both defaults (the point): lm-eval's add_bos_token unset, the worker's add_bos
        # unset; each follows the tokenizer, which adds a BOS here and none in "nobos"
        ("bos", None, None, True, "tokenizer default"),
        ("nobos", None, None, False, "tokenizer default"),
        ("nobos", True, True, True, "stage"),  # lm-eval: from_pretrained(add_bos_token=True)
    ],
)
def test_worker_scores_equal_lm_eval(
    model_dirs: dict[str, Path],
    data_files: dict[str, Path],
    task_dir: Path,
    tokenizer: str,
    add_bos: bool | None,
    add_bos_token: bool | None,
    applied: bool,
    source: str,
) -> None:
    theirs = _lm_eval_scores(task_dir, model_dirs[tokenizer], add_bos_token)
    ours, metrics = _worker_scores(model_dirs[tokenizer], data_files, add_bos)
    assert (metrics["add_bos"], metrics["add_bos_source"]) == (applied, source)
    for task in ("mc", "arc"):
        lls, acc = theirs[task]
        assert len(ours[task]) == len(lls)
        for i, (a, b) in enumerate(zip(ours[task], lls, strict=True)):
            assert a == pytest.approx(b, abs=1e-4), (task, i)
        got = metrics["tasks"][task]
        assert {"acc": got["acc"], "acc_norm": got["acc_norm"]} == pytest.approx(acc, abs=1e-9)
        assert 0.0 < got["acc"] < 1.0 or task == "mc"  # a real spread of answers
    assert metrics["tasks"]["arc"]["lm_eval_metrics"] == ["acc", "acc_norm"]
    assert metrics["max_length"] == 512 and metrics["tasks"]["arc"]["truncated"] == 0


def test_bos_rule_changes_the_scores(
    model_dirs: dict[str, Path], data_files: dict[str, Path]
) -> None:
    # the equality above is not vacuous: with and without BOS the log-likelihoods differ
    with_bos, _ = _worker_scores(model_dirs["nobos"], data_files, True)
    without, _ = _worker_scores(model_dirs["nobos"], data_files, None)
    pairs = zip(with_bos["arc"], without["arc"], strict=True)
    assert max(abs(a - b) for q, r in pairs for a, b in zip(q, r, strict=True)) > 1e-3


def test_truncated_contexts_equal_lm_eval(
    model_dirs: dict[str, Path], data_files: dict[str, Path], task_dir: Path
) -> None:
    # max_length 8: most contexts lose their left end (and the BOS), as in lm-eval
    theirs = _lm_eval_scores(task_dir, model_dirs["bos"], True, max_length=8)
    ours, metrics = _worker_scores(model_dirs["bos"], data_files, True, max_length=8)
    assert (metrics["max_length"], metrics["max_length_source"]) == (8, "stage")
    assert metrics["tasks"]["arc"]["truncated"] > 10
    for task in ("mc", "arc"):
        lls, acc = theirs[task]
        for i, (a, b) in enumerate(zip(ours[task], lls, strict=True)):
            assert a == pytest.approx(b, abs=1e-4), (task, i)
        got = metrics["tasks"][task]
        assert {"acc": got["acc"], "acc_norm": got["acc_norm"]} == pytest.approx(acc, abs=1e-9)


def test_lm_eval_counterparts_are_lm_evals_task_metrics() -> None:
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    # 0.4.13's YAML loader (includes resolved); 0.4.9 had it as lm_eval.utils.load_yaml_config
    from lm_eval.tasks._yaml_loader import load_yaml

    index = TaskManager().task_index
    names = {
        "arc": ["arc_easy", "arc_challenge"],
        "hellaswag": ["hellaswag"],
        "piqa": ["piqa"],
        "boolq": ["boolq"],
    }
    for schema, tasks in names.items():
        for name in tasks:
            path = index[name].yaml_path
            assert path is not None, name
            cfg = load_yaml(path, resolve_func=False)
            assert [m["metric"] for m in cfg["metric_list"]] == ev.LM_EVAL_METRICS[schema], name
    assert ev.LM_EVAL_METRICS["boolq"] == ["acc"]
