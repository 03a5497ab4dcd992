"""`[monitor] launch_next_stage`: when a run succeeds, the watcher launches the stages waiting
for it, on the same target, with the upstream run's artifacts as input; never after a failure.

Real everything on the `local` target: the project's code synced by rsync, tmux sessions, the
real worker (stage 3A: a 2-step SFT on CPU of a small tiny model built offline; stage 4A: its
eval on a few questions), `orch launch --watch` (the watcher's APScheduler jobs), pull +
manifest verification, and the completion action itself. Sizes come from `[experiment] overrides`, the same mechanism a
researcher uses, and are what the next stage is resolved with too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from orchestrator.monitor import ledger
from orchestrator.monitor.actions import Actions
from state import names
from state.models import RunRecord
from state.phases import Phase
from state.protocol import atomic_write_json, build_manifest
from tests.conftest import REPO, require_tools
from tests.integration.monitor_harness import wait_until

pytestmark = pytest.mark.integration

PACKAGES = ("state", "worker", "jobs", "orchestrator")
UPSTREAM, DOWNSTREAM = "stage3a", "stage4a"  # stage 4A evaluates stage 3A's checkpoint


def _overrides(model: Path) -> dict[str, object]:
    train = {
        "max_steps": 2,
        "batch_size": 4,
        "warmup_steps": 0,
        "eval_every": 2,
        "eval_batches": 1,
        "save_every": 2,
        "log_every": 1,
        "probe_every": 2,
        "probe_batch_size": 2,
    }
    out: dict[str, object] = {f"{UPSTREAM}.{k}": v for k, v in train.items()}
    out[f"{UPSTREAM}.model"] = str(model)  # stage 3A starts from the small model...
    out[f"{UPSTREAM}.eval_data.limit"] = 8
    for i in range(3):  # ...and stage 4A's model is never set here: it must come from 3A
        out[f"{DOWNSTREAM}.tasks.{i}.limit"] = 8
    return out


@pytest.fixture
def project(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    small_model: str,
) -> Iterator[Path]:
    require_tools("tmux", "rsync")
    fixed = os.environ.get("ORCH_TEST_CACHE_DIR")
    cache = Path(fixed) if fixed else tmp_path_factory.getbasetemp() / "orch-cache"
    model = Path(small_model)
    root = tmp_path / "proj"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    overrides = ", ".join(
        f"{json.dumps(k)} = {json.dumps(v)}" for k, v in _overrides(model).items()
    )
    (root / "orch.toml").write_text(
        "[targets.local]\n"
        'kind = "local"\n'
        f'python = "{sys.executable}"\n'
        f'env = {{ ORCH_CACHE_DIR = "{cache}", HF_HUB_OFFLINE = "1", HF_DATASETS_OFFLINE = "1" }}\n'
        "[targets.local.monitor]\n"
        "interval_s = 0.5\n"
        "jitter_s = 0.1\n"
        "launch_next_stage = true\n"  # off by default: the action under test
        "[experiment]\n"
        'profile = "tiny"\n'
        f"overrides = {{ {overrides} }}\n"
    )
    monkeypatch.chdir(root)
    yield root
    ctx = Context(cwd=root)
    try:  # nothing may outlive the test in tmux
        for rec in ctx.store.list_runs(active_only=True):
            from orchestrator.launch import kill_session
            from orchestrator.targets.factory import make_target

            target = make_target(ctx, rec.target)
            kill_session(target, rec.session)
            target.close()
    finally:
        ctx.close()


def _runs(ctx: Context, stage: str) -> list[RunRecord]:
    return ctx.store.list_runs(stage=stage)


def test_next_stage_runs_on_the_upstream_checkpoint_and_never_after_a_failure(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two upstream runs side by side on the box: one fails (its data names a task that does
    # not exist), one succeeds. `orch launch --watch` watches the box until nothing is left:
    # both runs, their completion actions (pull, next stage), and the next stage it launched.
    assert main(["launch", UPSTREAM, "--set", "data.source=tiny:no_such_task"]) == 0, (
        capsys.readouterr().err
    )
    rc = main(["launch", UPSTREAM, "--watch"])
    out = capsys.readouterr().out
    assert rc == 1, out  # 1: a run it watched (the failed upstream) ended badly

    ctx = Context(cwd=project)
    try:
        bad, good = sorted(_runs(ctx, UPSTREAM), key=lambda r: r.created_at)
        assert bad.phase is Phase.FAILED and "no_such_task" in bad.reason
        assert good.phase is Phase.SUCCEEDED, good.reason
        # Exactly one stage 4A, launched by the watcher after the success, on the same box.
        (child,) = _runs(ctx, DOWNSTREAM)
        assert child.target == good.target == "local"
        assert f"{good.key}: launched next stage {DOWNSTREAM} as {child.key}" in " ".join(
            out.split()
        )
        # Its input is the successful upstream run's checkpoint on the box (not the failed
        # run's, not the base model), and the worker really evaluated that checkpoint.
        spec = json.loads(child.spec_json or "{}")
        model = spec["task"]["args"]["model"]
        assert model.endswith(f"{good.run_dir}/checkpoints/final"), model
        assert (Path(model) / "config.json").is_file()
        assert child.phase is Phase.SUCCEEDED, child.reason
        workdir = Path(model).parents[len(Path(good.run_dir).parts) + 1]
        assert json.loads((workdir / child.run_dir / names.METRICS).read_text())
        # Every completion action is recorded (a restarted watcher repeats none), and none
        # was run for the failure: no next stage after a failed upstream.
        assert {"pull", "next"} <= ledger.actions_done(ctx.store, good.stage_dir, good.run_id)
        assert {"pull", "next"} <= ledger.actions_done(ctx.store, child.stage_dir, child.run_id)
        assert ledger.actions_done(ctx.store, bad.stage_dir, bad.run_id) == set()
        assert {r.stage for r in ctx.store.list_runs()} == {UPSTREAM, DOWNSTREAM}
        assert ctx.store.list_runs(active_only=True) == []
    finally:
        ctx.close()


def test_a_slow_pull_is_not_started_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher's actions thread and its periodic retry job both run completion actions; a
    pull can take minutes, and a retry meanwhile must not start a second one (nor, after it,
    launch the next stage twice). The real rsync runs behind a gate that holds it until told."""
    require_tools("rsync")
    real = shutil.which("rsync")
    assert real is not None
    gate = tmp_path / "gate"
    gate.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "rsync"
    wrapper.write_text(
        "#!/bin/sh\n"
        'echo started >> "$ORCH_TEST_GATE/started"\n'
        # only the first pull is held: a second one (the bug) would run through and be seen
        'if [ "$(wc -l < "$ORCH_TEST_GATE/started")" -eq 1 ]; then\n'
        '  while [ ! -e "$ORCH_TEST_GATE/open" ]; do sleep 0.05; done\n'
        "fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ORCH_TEST_GATE", str(gate))

    box = tmp_path / "box"
    root = tmp_path / "proj"
    root.mkdir()
    (root / "orch.toml").write_text(f'[targets.local]\nkind = "local"\nworkdir = "{box}"\n')
    ctx = Context(cwd=root)
    now = datetime.now(timezone.utc)
    rec = RunRecord(
        run_id="20260101-000000",
        stage=UPSTREAM,
        stage_dir="s3a",
        target="local",
        phase=Phase.SUCCEEDED,
        session="orch-s3a-20260101-000000",
        run_dir=f"{names.RUNS_DIR}/s3a/20260101-000000",
        created_at=now,
        updated_at=now,
    )
    ctx.store.insert_run(rec)
    run_dir = box / rec.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / names.METRICS).write_text('{"acc": 1.0}\n')
    atomic_write_json(
        run_dir / names.MANIFEST,
        build_manifest(run_dir, rec.run_id).model_dump(mode="json"),
    )
    actions = Actions(ctx)
    first = threading.Thread(target=actions.on_final, args=(rec,))
    first.start()
    try:
        wait_until((gate / "started").exists, 20, 0.02, what="the first pull to start")
        actions.retry_pending()  # the periodic retry, while the first pull is under way
        actions.on_final(rec)  # and the actions thread again (e.g. after a restart race)
        assert (gate / "started").read_text().splitlines() == ["started"]  # one pull only
        assert ledger.actions_done(ctx.store, rec.stage_dir, rec.run_id) == set()
    finally:
        (gate / "open").touch()
        first.join(30)
    assert ledger.actions_done(ctx.store, rec.stage_dir, rec.run_id) == {"pull"}
    row = ledger.monitor_row(ctx.store, rec.stage_dir, rec.run_id)
    assert row["action_attempts"] == 0 and not row["action_error"]
    pulled = ctx.store.get_run(rec.stage_dir, rec.run_id)
    assert pulled is not None and pulled.pulled_at is not None
    assert (root / rec.run_dir / names.METRICS).read_text() == '{"acc": 1.0}\n'
    # Once done, nothing runs again.
    actions.on_final(rec)
    assert (gate / "started").read_text().splitlines() == ["started"]
    ctx.close()
