"""Fault campaign, security: where a forwarded secret goes. A secret in `forward_env` and an
HF_TOKEN are given to `orch launch` (only it: `orch watch` and the pull run without them), over
a real sshd + tmux; the run's stand-in worker checks it received both (by hash) and succeeds;
the watcher judges and pulls it. Meanwhile every process's argv and environ is scanned, and
afterwards every log, the store, the pulled run and the box's disk: the secrets may appear only
in the run's 0600 secrets file while it exists, and in the environ of `orch launch` itself
(the researcher's shell gave them) and of the run's own process (which must have them)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import wrapper
from orchestrator.context import Context
from orchestrator.targets.factory import make_target
from state import names
from tests.conftest import REPO
from tests.faults.campaign import Scenario
from tests.faults.test_worker_faults import _stop, _watch
from tests.integration.monitor_harness import Webhook, orch_argv, wait_until, write_project
from tests.integration.test_monitor import FAST
from tests.sshd import SshServer

pytestmark = pytest.mark.integration

SECRET = "orch-s3cr3t-" + "7c1e9a4b2d"
HF = "hf_" + "QmZ8xT2vW9kL4pR7yN3bH6"

WORKER = """
import hashlib, os, time
from pathlib import Path
from state import names
from state.models import RunComplete
from state.protocol import atomic_write_json, build_manifest
rd = Path(os.environ["ORCH_RUN_DIR"])
h = lambda k: hashlib.sha256(os.environ.get(k, "").encode()).hexdigest()
(rd / "result.txt").write_text(f"secret={h('ORCH_T_SECRET') == '@S@'} hf={h('HF_TOKEN') == '@HF@'}\\n")
time.sleep(3.0)
atomic_write_json(rd / names.MANIFEST, build_manifest(rd, rd.name))
atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=rd.name))
"""


class Scanner:
    """Every process's /proc/PID/cmdline and environ, scanned every 0.1 s for the needles."""

    def __init__(self, needles: list[str]) -> None:
        self.needles = [n.encode() for n in needles]
        self.cmdline: list[str] = []
        self.environ: dict[int, str] = {}
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == me:
                    continue
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if any(n in argv for n in self.needles):
                        self.cmdline.append(argv.replace(b"\0", b" ").decode(errors="replace"))
                with contextlib.suppress(OSError):
                    env = Path(f"/proc/{pid}/environ").read_bytes()
                    if any(n in env for n in self.needles):
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                        self.environ[int(pid)] = argv.replace(b"\0", b" ").decode(errors="replace")
            self.scans += 1
            self._stop.wait(0.1)

    def __enter__(self) -> Scanner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def files_containing(root: Path, needles: list[str]) -> list[Path]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if not p.is_symlink() and any(n.encode() in p.read_bytes() for n in needles):
                    hits.append(p)
    return hits


@pytest.fixture
def hook() -> Iterator[Webhook]:
    h = Webhook()
    yield h
    h.close()


def test_secrets_grep(
    tmp_path: Path, sshd_server: SshServer, hook: Webhook, small_model: str, isolated_home: Path
) -> None:
    sc = Scenario(
        name="secrets grep",
        injected="a secret in forward_env and an HF_TOKEN through launch + watch + pull; argv "
        "and environ of every process scanned every 0.1 s, then logs, store, runs/ and the box",
        report="the run's process has both; they appear nowhere else but `orch launch`'s own "
        "environ and the 0600 secrets file while it exists",
        within_s=120,
        survives="the secrets (not in any argv, other environ, log, store row, pulled file or "
        "file on the box)",
    )
    needles = [SECRET, HF]
    box = tmp_path / "box-work"
    toml = sshd_server.toml("box", workdir=box)
    toml += 'forward_env = ["ORCH_T_SECRET"]\nforward_hf_token = true\n'
    root = write_project(
        tmp_path / "project",
        toml,
        hook_url=hook.url,
        monitor=FAST,
        extra='\n[experiment]\nprofile = "tiny"\n',
    )
    code = box / names.CODE_DIR
    (code / "worker").mkdir(parents=True)
    (code / "state").symlink_to(REPO / "state")
    (code / "worker" / "__init__.py").write_text("")
    digest = {k: hashlib.sha256(k.encode()).hexdigest() for k in needles}
    (code / "worker" / "__main__.py").write_text(
        WORKER.replace("@S@", digest[SECRET]).replace("@HF@", digest[HF])
    )
    ctx = Context(cwd=root)
    target = make_target(ctx, "box")
    target.put_bytes(
        wrapper.wrapper_script(), wrapper.wrapper_remote_path(target.workdir), mode=0o755
    )
    target.close()
    env = {k: v for k, v in os.environ.items() if k not in ("ORCH_T_SECRET", "HF_TOKEN")}
    secret_file_modes: set[int] = set()
    watcher = _watch(root, tmp_path / "watch.log")
    try:
        with Scanner(needles) as scan:
            sc.start()
            launch = subprocess.Popen(
                orch_argv("launch", "stage3b", "--no-sync", "--set", f"model={small_model}"),
                cwd=root,
                env={**env, "ORCH_T_SECRET": SECRET, "HF_TOKEN": HF},
                stdout=open(tmp_path / "launch.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            assert launch.wait(120) == 0, (tmp_path / "launch.log").read_text()
            [rec] = ctx.store.list_runs(stage="stage3b")
            rd = box / rec.run_dir
            pid = int(wait_until(lambda: (rd / names.PID).exists() and (rd / names.PID).read_text().strip(), 30, what="pid"))  # fmt: skip
            sf = rd / wrapper.SECRETS_FILE
            with contextlib.suppress(FileNotFoundError):
                secret_file_modes.add(stat.S_IMODE(sf.stat().st_mode))
            wait_until(
                lambda: pid in scan.environ, 30, what="the run's process seen with the secret"
            )
            wait_until(
                lambda: (g := ctx.store.get_run(rec.stage_dir, rec.run_id)) and g.pulled_at,
                sc.within_s,
                what="the run judged and pulled",
            )
            sc.detected()
        assert (rd / "result.txt").read_text() == "secret=True hf=True\n"
        assert not sf.exists(), "the secrets file outlived the start"
        assert secret_file_modes <= {0o600}, secret_file_modes
        assert scan.cmdline == [], scan.cmdline
        others = {p: a for p, a in scan.environ.items() if p not in (pid, launch.pid)}
        assert others == {}, others
        assert hook.matching("succeeded", rec.run_id)
        _stop(watcher)
        roots = [tmp_path, isolated_home, sshd_server.root]  # project, store, logs, box, sshd
        leaked = [p for r in roots for p in files_containing(r, needles)]
        assert leaked == [], leaked
        db = ctx.store.path
        for p in db.parent.glob(db.name + "*"):
            assert not any(n.encode() in p.read_bytes() for n in needles), p
        sc.note(
            f"{scan.scans} scans of /proc; the secret seen in the environ of the run's process "
            f"and of `orch launch` only; secrets file seen with modes {sorted(map(oct, secret_file_modes))} "
            "(the wrapper deletes it once read)"
        )
    finally:
        _stop(watcher)
        from orchestrator.launch import kill_session

        t = make_target(ctx, "box")
        for r in ctx.store.list_runs(stage="stage3b"):
            kill_session(t, r.session)
        t.close()
        ctx.close()
    sc.record()
