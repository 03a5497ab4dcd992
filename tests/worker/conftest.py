"""Fixtures of the worker tests: the tiny model, built once per session into a session cache
dir that every worker test (and any `python -m worker` child) sees through ORCH_CACHE_DIR."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def orch_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the same dir tests/integration/test_pipeline_tiny.py uses: one tiny build per session;
    # ORCH_TEST_CACHE_DIR reuses a cache across sessions (entries are keyed by their recipe)
    fixed = os.environ.get("ORCH_TEST_CACHE_DIR")
    path = Path(fixed) if fixed else tmp_path_factory.getbasetemp() / "orch-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _tiny_cache_env(orch_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_CACHE_DIR", str(orch_cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(orch_cache_dir: Path) -> Iterator[Path]:
    """`tiny://default` as a save_pretrained directory (built on first use)."""
    from worker import tiny

    old = os.environ.get("ORCH_CACHE_DIR")
    os.environ["ORCH_CACHE_DIR"] = str(orch_cache_dir)
    try:
        path = tiny.resolve("tiny://default")
    finally:
        if old is None:
            os.environ.pop("ORCH_CACHE_DIR", None)
        else:
            os.environ["ORCH_CACHE_DIR"] = old
    yield path


def _load(model_dir: Path, impl: str):
    from state.worker_config import EvalArgs
    from worker import modeling

    return modeling.load(
        EvalArgs(model=str(model_dir), attn_implementation=impl, device="cpu", dtype="float32")
    )


@pytest.fixture(scope="session")
def tiny_sdpa(tiny_model_dir: Path):
    """modeling.Loaded for the tiny model with sdpa attention (shared: do not train it)."""
    return _load(tiny_model_dir, "sdpa")


@pytest.fixture(scope="session")
def tiny_eager(tiny_model_dir: Path):
    return _load(tiny_model_dir, "eager")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_sdpa):
    return tiny_sdpa.tokenizer
