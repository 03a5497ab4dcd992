"""`orch logs -f` streamed over the agent channel (issue 14), against a real OpenSSH sshd on
loopback: lines arrive while the run runs, a dropped connection loses and doubles nothing, an
agent that cannot stream is read the old way."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Context
from state import names
from state.models import RunRecord
from state.phases import Phase
from tests.integration.monitor_harness import REPO, wait_until, write_project
from tests.sshd import SshServer

pytestmark = pytest.mark.integration


class _Out:
    """A stdout that a thread writes and the test reads while it runs."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.lock = threading.Lock()

    def write(self, s: str) -> int:
        with self.lock:
            self.parts.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)


def _setup(
    tmp_path: Path, server: SshServer, monkeypatch: pytest.MonkeyPatch, code: Path = REPO
) -> tuple[Context, Path, RunRecord]:
    work = tmp_path / "box-work"
    root = write_project(
        tmp_path / "project",
        server.toml("box", workdir=work),
        hook_url="json://127.0.0.1:9/",
        monitor={},
    )
    monkeypatch.chdir(root)
    work.mkdir(parents=True)
    (work / "code").symlink_to(code)
    now = datetime.now(timezone.utc)
    rec = RunRecord(
        run_id="20260101-000000",
        stage="s",
        stage_dir="s_dir",
        target="box",
        phase=Phase.RUNNING,
        session=names.session_name("s", "20260101-000000"),
        run_dir=f"{names.RUNS_DIR}/s_dir/20260101-000000",
        created_at=now,
        updated_at=now,
    )
    ctx = Context(cwd=root)
    ctx.store.insert_run(rec)
    rd = work / rec.run_dir
    rd.mkdir(parents=True)
    return ctx, rd, rec


def _follow(
    out: _Out, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[threading.Thread, list[int]]:
    rc: list[int] = []
    monkeypatch.setattr("sys.stdout", out)
    t = threading.Thread(target=lambda: rc.append(main(["logs", "-f", *args])), daemon=True)
    t.start()
    return t, rc


def _append(path: Path, data: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)


def test_logs_follow_streams_live_and_survives_a_dropped_connection(
    tmp_path: Path, fresh_sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, rd, rec = _setup(tmp_path, fresh_sshd, monkeypatch)
    log = rd / names.STDOUT
    log.write_text("l1\nl2\nl3\npar")
    out = _Out()
    t, rc = _follow(out, monkeypatch, "-n", "2", "--interval", "30", rec.run_id)
    try:
        wait_until(lambda: out.text() == "l3\n", 30, what="the last lines")
        # Live: a line written now is printed within a moment, long before `--interval` (30 s,
        # the old per-command polling's period) and with the run still running.
        _append(log, "tial\nl5\n")
        t0 = time.monotonic()
        wait_until(lambda: out.text().endswith("l5\n"), 10, every=0.02, what="a live line")
        assert time.monotonic() - t0 < 5.0
        # The sshd child serving the stream dies; the command reconnects and goes on from the
        # last byte it printed.
        assert fresh_sshd.signal_connections(signal.SIGKILL)
        _append(log, "l6\n")
        wait_until(lambda: out.text().endswith("l6\n"), 30, what="a line after the reconnect")
        _append(log, "last words")
        (rd / names.EXIT_CODE).write_text("0\n")
        t.join(30)
        assert not t.is_alive() and rc == [0]
        assert out.text() == "l3\npartial\nl5\nl6\nlast words\n"  # nothing lost, nothing twice
    finally:
        (rd / names.EXIT_CODE).write_text("0\n")
        t.join(10)
        ctx.close()


def test_logs_follow_on_an_agent_that_cannot_stream(
    tmp_path: Path, sshd_server: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A box whose code predates `follow` and `watch`: its agent answers "unknown op".
    code = tmp_path / "old-code"
    shutil.copytree(REPO / "state", code / "state", ignore=shutil.ignore_patterns("__pycache__"))
    agent_py = code / "state" / "agent.py"
    text = agent_py.read_text()
    agent_py.write_text(text.replace('req.get("op") == "watch"', 'req.get("op") == "(none)"'))
    ctx, rd, rec = _setup(tmp_path, sshd_server, monkeypatch, code=code)
    log = rd / names.STDOUT
    log.write_text("a\nb\n")
    out = _Out()
    t, rc = _follow(out, monkeypatch, "--interval", "0.2", rec.run_id)
    try:
        wait_until(lambda: out.text() == "a\nb\n", 30, what="the start")
        _append(log, "c\nend")
        (rd / names.EXIT_CODE).write_text("1\n")
        t.join(30)
        assert not t.is_alive() and rc == [0]
        assert out.text() == "a\nb\nc\nend\n"
    finally:
        (rd / names.EXIT_CODE).write_text("0\n")
        t.join(10)
        ctx.close()
