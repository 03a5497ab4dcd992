"""Shared fixtures. Every test runs with HOME and the orch state dir in a temp dir, so no test
touches the user's files. Integration fixtures start real OpenSSH sshd on loopback; in CI
(`CI=true`) a missing sshd/tmux/rsync is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd import SshServer, find_sshd, make_server

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_configure(config: pytest.Config) -> None:
    """A tmux server of the suite's own, one per test process (`TMUX_TMPDIR`): runs launched
    here, on the local target and on the loopback sshd "boxes" alike, never meet the
    researcher's own tmux sessions, and two pytest-xdist workers never share a server (their
    run ids are timestamps, so session names of one stage can coincide)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    # short, in /tmp: the socket path (TMUX_TMPDIR/tmux-UID/default) must fit in sun_path
    os.environ["TMUX_TMPDIR"] = tempfile.mkdtemp(prefix=f"orch-tmux-{worker}-")


def pytest_unconfigure(config: pytest.Config) -> None:
    tmpdir = os.environ.get("TMUX_TMPDIR", "")
    if os.path.basename(tmpdir).startswith("orch-tmux-") and shutil.which("tmux"):
        subprocess.run(["tmux", "kill-server"], capture_output=True, check=False)
        shutil.rmtree(tmpdir, ignore_errors=True)


def require_tools(*tools: str) -> None:
    """Skip locally, fail in CI, when a system tool the test needs is missing."""
    missing = [t for t in tools if (find_sshd() if t == "sshd" else shutil.which(t)) is None]
    if missing:
        msg = (
            f"missing system tools: {', '.join(missing)} (run scripts/test.sh, which installs them)"
        )
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


#: A tiny model small enough to fine-tune in seconds on CPU, with its own tokenizer and barely
#: pre-trained: the worker, next-stage and relaunch tests share it (built once per session).
SMALL_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "steps": 2,
    "train_rows": 300,
    "batch_size": 16,
}


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the SMALL_TINY model dir (worker.tiny builds it offline, under a file lock)."""
    from worker import tiny

    spec = tiny.TinySpec(**SMALL_TINY)  # type: ignore[arg-type]
    return str(tiny.ensure_built(spec, root=tmp_path_factory.getbasetemp() / "tiny-cache"))


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("ORCH_STATE_DIR", str(home / ".orch-state"))
    monkeypatch.delenv("ORCH_CONFIG", raising=False)
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("VAST_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """One real sshd for the session (tests that break it use `fresh_sshd`)."""
    require_tools("sshd", "ssh", "ssh-keygen", "rsync", "tmux")
    server = make_server(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A private sshd for tests that freeze, kill or re-key it."""
    require_tools("sshd", "ssh", "ssh-keygen", "rsync", "tmux")
    server = make_server(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
