"""Fault campaign: 30 orch processes at once (10 `orch status`, 10 `orch pull` of one run, 10
`orch launch`) against one store while `orch watch` runs, over a real sshd + tmux. The box's
code dir holds the real `state` package (the poll agent) and a stand-in `worker` that exits at
once, so 10 launches cost no training. No command may hit `database is locked`; no run row
may be lost or doubled."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator import wrapper
from orchestrator.context import Context
from orchestrator.targets.factory import make_target
from state import names
from state.models import RunComplete, RunRecord
from state.phases import Phase
from state.protocol import atomic_write_json, build_manifest
from tests.conftest import REPO
from tests.faults.campaign import Scenario
from tests.faults.test_worker_faults import _stop, _watch
from tests.integration.monitor_harness import Webhook, orch_argv, wait_until, write_project
from tests.integration.test_monitor import FAST
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

RID = "20260103-000000"
N = 10


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def test_thirty_concurrent_commands(
    tmp_path: Path, sshd_server: SshServer, hook: Webhook, small_model: str
) -> None:
    sc = Scenario(
        name="30 concurrent commands",
        injected=f"{N} `orch status`, {N} `orch pull` of one run and {N} `orch launch` started "
        "at once against one store while `orch watch` runs",
        report="every command exits 0; no `database is locked`",
        within_s=240,
        survives=f"every row: {N} new runs with distinct ids, each judged once with one alert; "
        "the pulled run verified once per pull",
    )
    box = tmp_path / "box-work"
    root = write_project(
        tmp_path / "project",
        sshd_server.toml("box", workdir=box),
        hook_url=hook.url,
        monitor=FAST,
        extra='\n[experiment]\nprofile = "tiny"\n',
    )
    code = box / names.CODE_DIR
    (code / "worker").mkdir(parents=True)
    (code / "state").symlink_to(REPO / "state")
    (code / "worker" / "__init__.py").write_text("")
    (code / "worker" / "__main__.py").write_text("import time\ntime.sleep(0.5)\n")
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    target.put_bytes(
        wrapper.wrapper_script(), wrapper.wrapper_remote_path(target.workdir), mode=0o755
    )
    rd = box / "runs" / "s1" / RID
    rd.mkdir(parents=True)
    (rd / "metrics.json").write_text('{"acc": 0.5}')
    (rd / "big.bin").write_bytes(os.urandom(4 << 20))
    atomic_write_json(rd / names.MANIFEST, build_manifest(rd, RID))
    atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=RID))
    now = datetime.now(timezone.utc)
    ctx.store.insert_run(
        RunRecord(
            run_id=RID, stage="stage1", stage_dir="s1", target="box", phase=Phase.SUCCEEDED,
            session="", run_dir=f"runs/s1/{RID}", created_at=now, updated_at=now,
        )
    )  # fmt: skip
    watcher = _watch(root, tmp_path / "watch.log")
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    try:
        time.sleep(1.0)
        launch = ["launch", "stage3b", "--no-sync", "--set", f"model={small_model}"]
        argvs = [["status"], ["pull", f"s1/{RID}"], launch] * N
        sc.start()
        for argv in argvs:
            p = subprocess.Popen(
                orch_argv(*argv), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            procs.append((argv[0], p))
        outs = []
        for what, p in procs:
            out, _ = p.communicate(timeout=sc.within_s)
            outs.append((what, p.returncode, out))
        sc.detected()
        for what, rc, out in outs:
            assert "locked" not in out.lower(), out
            assert rc == 0, f"orch {what}: exit {rc}: {out}"
            if what == "pull":  # each pull checked the run against its manifest
                assert "2 file(s) verified" in " ".join(out.split()), out
        new = ctx.store.list_runs(stage="stage3b")
        assert len(new) == N and len({r.run_id for r in new}) == N, [r.key for r in new]
        for r in new:
            history = [ph for ph, _, _ in ctx.store.phase_history(r.stage_dir, r.run_id)]
            assert history[:3] == ["pending", "launching", "running"], (r.key, history)
        wait_until(
            lambda: all(
                (g := ctx.store.get_run(r.stage_dir, r.run_id)) and g.phase.is_terminal for r in new
            ),
            120,
            what="every launched run judged",
        )
        wait_until(lambda: len(hook.posts) >= N, 60, what="one alert per run")
        time.sleep(2.0)
        per_run = {r.run_id: len(hook.matching(r.run_id)) for r in new}
        assert set(per_run.values()) == {1}, per_run
        stored = ctx.store.recent_alerts(100)
        assert len({a["dedup_key"] for a in stored}) == len(stored)
        assert ctx.store.get_run("s1", RID).pulled_at is not None  # type: ignore[union-attr]
        assert len(ctx.store.list_runs()) == N + 1
        phases = sorted({str(ctx.store.get_run(r.stage_dir, r.run_id).phase.value) for r in new})  # type: ignore[union-attr]
        sc.note(f"{len(argvs)} commands, {N} runs ({', '.join(phases)}), {len(hook.posts)} alerts")
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
        _stop(watcher)
        from orchestrator.launch import kill_session

        for r in ctx.store.list_runs(stage="stage3b"):
            kill_session(target, r.session)
        target.close()
        ctx.close()
    sc.record()
