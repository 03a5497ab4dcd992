"""`python -m worker`: every subcommand documented; `run` dispatches spec.json; bad input -> exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from state import names
from state.errors import WorkerError
from state.models import RunFailed, RunSpec, RunStatus, WorkerTask
from state.phases import WorkerExit
from state.protocol import read_model
from worker import cli

REPO = Path(__file__).resolve().parents[2]


def worker(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_documents_every_subcommand() -> None:
    r = worker("--help")
    assert r.returncode == 0
    for sub in ("run", "eval", "train", "probe", "exec"):
        assert f"    {sub} " in r.stdout, sub
    assert "3=LEAKAGE" in r.stdout and "2=BAD_INPUT" in r.stdout
    expected = {
        "run": ["--run-dir", "spec.json"],
        "train": [
            "--args-json",
            "--args-file",
            "--set",
            "max_steps",
            "grad_accum",
            "allow_leaky",
            "structural_check",
            "cosine|linear|constant",
        ],
        "eval": ["--args-json", "tasks", "shared_context", "causal"],
        "probe": ["--args-json", "leak_ratio", "samples"],
        "exec": ["ORCH_RUN_DIR", "argv"],
    }
    for sub, needles in expected.items():
        out = worker(sub, "--help")
        assert out.returncode == 0
        for n in needles:
            assert n in out.stdout, (sub, n)


def test_overrides_and_args_merge(tmp_path: Path) -> None:
    assert cli.parse_overrides(["mask=prefix", "data.limit=5", "lr=0.001", "wandb=true"]) == {
        "mask": "prefix",
        "data": {"limit": 5},
        "lr": 0.001,
        "wandb": True,
    }
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"data": {"name": "x", "source": "tiny:recall"}, "mask": "causal"}))
    ns = cli.build_parser().parse_args(
        [
            "train",
            "--run-dir",
            "d",
            "--args-file",
            str(f),
            "--set",
            "data.limit=7",
            "--set",
            "mask=prefix",
        ]
    )
    assert cli.direct_args(ns) == {
        "data": {"name": "x", "source": "tiny:recall", "limit": 7},
        "mask": "prefix",
    }
    with pytest.raises(WorkerError):
        cli.parse_overrides(["novalue"])


def test_run_dispatches_spec(tmp_path: Path) -> None:
    rd = tmp_path / "runs" / "adhoc" / "20260101-000000"
    rd.mkdir(parents=True)
    spec = RunSpec(
        run_id="20260101-000000",
        stage="adhoc",
        stage_dir="adhoc",
        task=WorkerTask(
            command="exec", args={"argv": [sys.executable, "-c", "print('hi from the stage')"]}
        ),
    )
    (rd / names.SPEC).write_text(spec.model_dump_json())
    r = worker("run", "--run-dir", str(rd))
    assert r.returncode == 0, r.stderr
    assert "hi from the stage" in r.stdout
    assert (rd / names.RUN_COMPLETE).exists()
    st = read_model(rd / names.STATUS, RunStatus).value
    assert st.run_id == "20260101-000000" and st.stage == "adhoc"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run"], "no spec.json"),
        (["train", "--args-json", "{not json"], "cannot read the args"),
        (["train", "--args-json", "{}"], "data"),
        (["probe", "--args-json", "[1, 2]"], "JSON object"),
    ],
)
def test_bad_input_exits_2_with_reason(tmp_path: Path, argv: list[str], needle: str) -> None:
    rd = tmp_path / "r"
    r = worker(*argv[:1], "--run-dir", str(rd), *argv[1:])
    assert r.returncode == WorkerExit.BAD_INPUT, r.stderr
    failed = read_model(rd / names.RUN_FAILED, RunFailed).value
    assert needle in failed.reason
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one clear line, no traceback


def test_unusable_spec_is_bad_input(tmp_path: Path) -> None:
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / names.SPEC).write_text(
        json.dumps(
            {
                "run_id": "x",
                "stage": "s",
                "stage_dir": "s",
                "task": {"command": "train", "args": {}},
                "typo": 1,
            }
        )
    )
    r = worker("run", "--run-dir", str(rd))
    assert r.returncode == WorkerExit.BAD_INPUT
    assert "unusable spec" in read_model(rd / names.RUN_FAILED, RunFailed).value.reason
