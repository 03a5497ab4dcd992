"""Targets against the real thing: subprocesses for `local`, a real OpenSSH sshd on loopback for
`ssh` (paramiko for commands, real rsync over real ssh for trees). The same behaviour is asserted
for both wherever the interface promises it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.codesync import code_files, sync_code
from orchestrator.context import Context
from orchestrator.sshcmd import PARTIAL_DIR
from orchestrator.targets.base import Target
from orchestrator.targets.factory import make_target
from orchestrator.targets.local import LocalTarget
from orchestrator.targets.ssh import SshTarget
from state import names
from state.errors import (
    ConfigError,
    HostKeyError,
    RemoteCommandError,
    TargetError,
    UnreachableError,
)
from tests.sshd import SshServer, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def ssh_target(server: SshServer, tmp: Path, name: str = "box", **kw) -> SshTarget:
    return SshTarget(
        name,
        host=server.host,
        port=server.port,
        user=server.user,
        identity_file=kw.pop("identity_file", server.client_key),
        known_hosts=kw.pop("known_hosts", tmp / "known_hosts"),
        workdir=kw.pop("workdir", str(tmp / "wd")),
        python=kw.pop("python", None) or sys.executable,
        **kw,
    )


@pytest.fixture(params=["local", "ssh"])
def target(request, tmp_path: Path) -> Iterator[Target]:
    if request.param == "local":
        t: Target = LocalTarget("local", workdir=tmp_path / "wd")
    else:
        t = ssh_target(request.getfixturevalue("sshd_server"), tmp_path)
    try:
        yield t
    finally:
        t.close()


# -- run --------------------------------------------------------------------------------------
def test_run_argv_stdin_cwd(target: Target, tmp_path: Path) -> None:
    res = target.run(["printf", "%s|", "a b", "$HOME", "it's"], timeout=20)
    assert res.ok and res.stdout == "a b|$HOME|it's|"
    assert target.run(["cat"], timeout=20, stdin=b"from stdin\x00bin").stdout == "from stdin\x00bin"
    big = os.urandom(600_000).hex().encode()  # bigger than one ssh window chunk
    assert target.run(["wc", "-c"], timeout=30, stdin=big).stdout.strip() == str(len(big))
    target.run(["mkdir", "-p", f"{target.workdir}/sub dir"], timeout=20, check=True)
    assert (
        target.run(["pwd"], timeout=20, cwd="sub dir").stdout.strip() == f"{target.workdir}/sub dir"
    )
    res = target.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=20)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert target.run(["definitely-not-a-program-xyz"], timeout=20).returncode == 127


def test_deadline_raises_unreachable_then_recovers(target: Target) -> None:
    with pytest.raises(UnreachableError, match="did not finish within"):
        target.run(["sleep", "30"], timeout=1.0)
    assert target.run(["echo", "alive"], timeout=20).stdout == "alive\n"


def test_check_raises_remote_command_error(target: Target) -> None:
    with pytest.raises(RemoteCommandError) as exc:
        target.run(["sh", "-c", "echo boom >&2; exit 7"], timeout=20, check=True)
    assert exc.value.returncode == 7 and "boom" in exc.value.stderr and "boom" in str(exc.value)


# -- files ------------------------------------------------------------------------------------
def test_put_bytes_atomic_with_mode_and_get_file(target: Target, tmp_path: Path) -> None:
    target.put_bytes(b"token-123\n", "secrets/api key", mode=0o600)
    p = Path(target.workdir) / "secrets" / "api key"  # loopback: the box's disk is ours
    assert p.read_bytes() == b"token-123\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    target.put_bytes(b'{"a": 1}', "runs/s/r/spec.json")
    q = Path(target.workdir) / "runs/s/r/spec.json"
    assert stat.S_IMODE(q.stat().st_mode) == 0o644
    target.put_bytes(b'{"a": 2}', "runs/s/r/spec.json")  # replace
    assert os.listdir(q.parent) == ["spec.json"]  # no temp file left behind
    target.get_file("runs/s/r/spec.json", tmp_path / "got" / "spec.json")
    assert json.loads((tmp_path / "got" / "spec.json").read_text()) == {"a": 2}
    with pytest.raises(RemoteCommandError):
        target.get_file("runs/s/r/nope.json", tmp_path / "nope.json")
    assert not (tmp_path / "nope.json").exists()


# -- trees ------------------------------------------------------------------------------------
def _project(root: Path) -> Path:
    """A small git project with ignored files, runs/, .orch/, a venv and awkward names."""
    root.mkdir()
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "pkg" / "[weird]*name?.py").write_text("y = 2\n")
    (root / "a file with spaces.txt").write_text("spaces\n")
    (root / ".gitignore").write_text("ignored.txt\n*.log\n")
    (root / "ignored.txt").write_text("no\n")
    (root / "train.log").write_text("no\n")
    for d in ("runs/s/r", ".orch", ".venv/lib", "venv2/lib", "pkg/__pycache__"):
        (root / d).mkdir(parents=True)
    (root / "runs/s/r/out.bin").write_bytes(b"x")
    (root / ".orch/state.db").write_bytes(b"x")
    (root / ".venv/lib/big.py").write_text("no\n")
    (root / "venv2/pyvenv.cfg").write_text("home = /usr\n")
    (root / "venv2/lib/site.py").write_text("no\n")
    (root / "pkg/__pycache__/mod.cpython-311.pyc").write_bytes(b"x")
    git = ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "pkg/mod.py", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (root / "untracked_new.py").write_text("z = 3\n")  # untracked, not ignored: synced
    return root


EXPECTED = {
    ".gitignore",
    "a file with spaces.txt",
    "pkg/[weird]*name?.py",
    "pkg/mod.py",
    "untracked_new.py",
}


def _tree(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() or p.is_symlink()}


def test_sync_code_respects_gitignore_and_is_a_noop_when_unchanged(
    target: Target, tmp_path: Path
) -> None:
    root = _project(tmp_path / "proj")
    assert set(code_files(root)) == EXPECTED
    first = sync_code(target, root)
    code = Path(target.workdir) / "code"
    assert _tree(code) == EXPECTED
    assert first.literal_bytes > 0 and first.files_transferred == len(EXPECTED)
    again = sync_code(target, root)
    assert again.literal_bytes == 0 and again.files_transferred == 0
    # A change moves only that file; a deleted file and a stray remote file disappear.
    (root / "pkg" / "mod.py").write_text("x = 42\n")
    (root / "a file with spaces.txt").unlink()
    (code / "stray.txt").write_text("left over\n")
    third = sync_code(target, root)
    assert third.files_transferred == 1
    assert _tree(code) == EXPECTED - {"a file with spaces.txt"}
    assert (code / "pkg" / "mod.py").read_text() == "x = 42\n"


def test_sync_code_without_git_walks_the_tree(target: Target, tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    subprocess.run(["rm", "-rf", str(root / ".git")], check=True)
    sync_code(target, root)
    got = _tree(Path(target.workdir) / "code")
    # No git: .gitignore cannot be asked, but runs/, .orch/, venvs and caches never go.
    assert got >= EXPECTED
    assert not any(
        p.startswith(("runs/", ".orch/", ".venv/", "venv2/")) or "__pycache__" in p for p in got
    )


def test_sync_down_copies_and_never_deletes_locally(target: Target, tmp_path: Path) -> None:
    target.put_bytes(b"m" * 5000, "runs/s/r/metrics.json")
    target.put_bytes(b"c", "runs/s/r/checkpoints/step1.pt")
    local = tmp_path / "pulled"
    local.mkdir()
    (local / "mine.txt").write_text("keep")
    stats = target.sync_down("runs/s/r", local, excludes=["checkpoints/"], timeout=60)
    assert (local / "metrics.json").read_bytes() == b"m" * 5000
    assert not (local / "checkpoints").exists()
    assert (local / "mine.txt").read_text() == "keep"
    assert stats.files_transferred == 1 and stats.literal_bytes == 5000


def test_rsync_missing_on_the_box_is_not_unreachable(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    t = ssh_target(sshd_server, tmp_path)
    t.put_bytes(b"x", "a/f")
    t.rsync_extra = ["--rsync-path=rsync-not-installed-here"]  # what a box without rsync answers
    with pytest.raises(RemoteCommandError, match="rsync could not start on the other side"):
        t.sync_down("a", tmp_path / "down", timeout=60)
    t.close()


def test_sync_down_missing_dir_is_an_error(target: Target, tmp_path: Path) -> None:
    with pytest.raises(TargetError):
        target.sync_down("runs/none/such", tmp_path / "x", timeout=60)


# -- the agent --------------------------------------------------------------------------------
def test_agent_ping_and_observe(target: Target) -> None:
    sync_code(target, REPO)
    rd = Path(target.workdir) / "runs" / "stage1" / "20260101-000000"
    rd.mkdir(parents=True)
    (rd / names.EXIT_CODE).write_text("3\n")
    agent = target.agent()
    assert agent.request({"op": "ping"}, timeout=20)["ok"] is True
    obs = agent.request(
        {"op": "observe", "runs": [{"run_dir": "runs/stage1/20260101-000000"}], "gpus": False},
        timeout=20,
    )
    assert obs["ok"] is True and obs["runs"][0]["exit_code"] == 3
    assert agent.request({"op": "bogus"}, timeout=20) == {
        "ok": False,
        "error": "unknown op 'bogus'",
    }
    assert target.agent() is agent  # one persistent agent per target
    assert target.ping(timeout=10) is True


def test_agent_that_cannot_start_says_why(target: Target) -> None:
    target.python = "/nonexistent/python3"  # type: ignore[attr-defined]
    with pytest.raises(TargetError):
        target.agent().request({"op": "ping"}, timeout=10)
    assert target.ping(timeout=5) is False


# -- ssh failure modes ------------------------------------------------------------------------
def test_tofu_pin_then_changed_key_is_refused(fresh_sshd: SshServer, tmp_path: Path) -> None:
    kh = tmp_path / "kh"
    t = ssh_target(fresh_sshd, tmp_path, known_hosts=kh)
    assert t.run(["true"], timeout=20).ok
    assert f"[127.0.0.1]:{fresh_sshd.port} ssh-ed25519" in kh.read_text()
    t.close()
    fresh_sshd.rotate_host_key()
    with pytest.raises(HostKeyError, match="changed"):
        t.run(["true"], timeout=20)
    with pytest.raises(HostKeyError):
        t.sync_down("x", tmp_path / "x", timeout=30)
    # The OpenSSH client (what rsync runs) refuses it too: it checks the same pin file.
    from orchestrator.sshcmd import ssh_argv

    out = subprocess.run(
        ssh_argv(t.endpoint, ["true"]), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 255 and "Host key verification failed" in out.stderr
    # After the user drops the pin on purpose, the new key is learned.
    assert t.forget_host_key() == 1
    assert t.run(["echo", "ok"], timeout=20).stdout == "ok\n"
    t.close()


def test_missing_identity_file_is_a_config_error(sshd_server: SshServer, tmp_path: Path) -> None:
    t = ssh_target(sshd_server, tmp_path, identity_file=tmp_path / "no_such_key")
    with pytest.raises(ConfigError, match="identity_file"):
        t.run(["true"], timeout=10)


def test_wrong_key_is_refused_clearly(sshd_server: SshServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    t = ssh_target(sshd_server, tmp_path, identity_file=other)
    with pytest.raises(TargetError, match="refused the key"):
        t.run(["true"], timeout=20)


def test_closed_port_is_unreachable(tmp_path: Path, sshd_server: SshServer) -> None:
    t = SshTarget(
        "gone",
        host="127.0.0.1",
        port=free_port(),
        identity_file=sshd_server.client_key,
        known_hosts=tmp_path / "kh",
        workdir="/tmp/x",
    )
    with pytest.raises(UnreachableError, match="cannot connect"):
        t.run(["true"], timeout=5)
    assert t.ping(timeout=2) is False
    with pytest.raises(UnreachableError):
        t.sync_down("x", tmp_path / "x", timeout=10)


def test_reconnects_after_the_connection_is_killed(fresh_sshd: SshServer, tmp_path: Path) -> None:
    t = ssh_target(fresh_sshd, tmp_path)
    sync_code(t, REPO)
    agent = t.agent()
    assert agent.request({"op": "ping"}, timeout=20)["ok"]
    assert fresh_sshd.signal_connections(signal.SIGKILL)
    time.sleep(0.3)
    # The dead connection is noticed and replaced, for commands and for the agent.
    assert t.run(["echo", "again"], timeout=20).stdout == "again\n"
    try:
        agent.request({"op": "ping"}, timeout=10)
    except UnreachableError:
        pass  # allowed once; the next request must restart it
    assert agent.request({"op": "ping"}, timeout=20)["ok"]
    t.close()


def test_frozen_box_hits_the_deadline(fresh_sshd: SshServer, tmp_path: Path) -> None:
    t = ssh_target(fresh_sshd, tmp_path)
    sync_code(t, REPO)
    assert t.agent().request({"op": "ping"}, timeout=20)["ok"]
    frozen = fresh_sshd.signal_connections(signal.SIGSTOP)  # the box stops answering
    try:
        with pytest.raises(UnreachableError, match="did not answer"):
            t.agent().request({"op": "ping"}, timeout=1.5)
        # The frozen connection was dropped, not reused: a new one (the listener is alive) works.
        assert t.run(["echo", "new connection"], timeout=20).stdout == "new connection\n"
        frozen += fresh_sshd.signal_connections(signal.SIGSTOP)
        with pytest.raises(UnreachableError, match="within"):
            t.run(["true"], timeout=1.5)  # a command on a frozen connection hits its deadline
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert t.run(["echo", "thawed"], timeout=20).stdout == "thawed\n"
    t.close()


def test_a_command_past_its_deadline_does_not_live_on_on_the_box(
    sshd_server: SshServer, tmp_path: Path
) -> None:
    """orch drops the connection at the deadline; the box's own `timeout` then ends the
    command, so a hung remote command is not left running on a box billed by the hour."""
    t = ssh_target(sshd_server, tmp_path)
    marker = f"orch-deadline-{os.getpid()}-{time.monotonic_ns()}"
    argv = ["sh", "-c", f"sleep 60 # {marker}"]
    try:
        t0 = time.monotonic()
        with pytest.raises(UnreachableError, match="within"):
            t.run(argv, timeout=1.5)
        assert time.monotonic() - t0 < 10
        alive = lambda: subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0  # noqa: E731
        deadline = time.monotonic() + 20
        while alive():
            assert time.monotonic() < deadline, "the command outlived its deadline on the box"
            time.sleep(0.2)
        # A command within its deadline is not affected: output, exit code and stdin pass.
        res = t.run(["sh", "-c", "cat; exit 3"], timeout=20, stdin=b"in\n")
        assert (res.returncode, res.stdout) == (3, "in\n")
    finally:
        subprocess.run(["pkill", "-f", marker], capture_output=True)
        t.close()


def test_sync_down_resumes_after_the_link_is_cut(fresh_sshd: SshServer, tmp_path: Path) -> None:
    t = ssh_target(fresh_sshd, tmp_path)
    art = Path(t.workdir) / "runs" / "s" / "r"
    art.mkdir(parents=True)
    data = os.urandom(6 * 1024 * 1024)
    (art / "model.bin").write_bytes(data)
    local = tmp_path / "pulled"
    local.mkdir()
    t.rsync_extra = ["--bwlimit=1500"]  # KiB/s: slow enough to cut mid-way
    import threading

    errors: list[BaseException] = []

    def pull() -> None:
        try:
            t.sync_down("runs/s/r", local, timeout=120)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=pull)
    th.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = [p for p in local.glob(".model.bin.*") if p.stat().st_size > 1_000_000]
        if parts:
            break
        time.sleep(0.05)
    fresh_sshd.signal_connections(signal.SIGKILL)
    th.join(60)
    assert errors and isinstance(errors[0], UnreachableError), errors
    partial = local / PARTIAL_DIR / "model.bin"
    assert partial.exists() and 0 < partial.stat().st_size < len(data)
    assert not (local / "model.bin").exists()  # never a half file under the final name
    t.rsync_extra = []
    stats = t.sync_down("runs/s/r", local, timeout=120)
    assert (
        hashlib.sha256((local / "model.bin").read_bytes()).hexdigest()
        == hashlib.sha256(data).hexdigest()
    )
    assert stats.extra["matched_bytes"] > 0  # the partial file was reused, not re-sent
    assert stats.literal_bytes < len(data)
    assert not (local / PARTIAL_DIR).exists()  # rsync drops the emptied partial dir
    t.close()


# -- factory ----------------------------------------------------------------------------------
def _ctx(tmp_path: Path, toml: str) -> Context:
    (tmp_path / "orch.toml").write_text(toml)
    return Context(cwd=tmp_path)


def test_factory_builds_local_by_default(tmp_path: Path) -> None:
    ctx = Context(cwd=tmp_path)
    t = make_target(ctx, None)
    assert isinstance(t, LocalTarget)
    assert t.workdir == str(ctx.state_dir / "local")
    assert t.run(["echo", "x"], timeout=10).stdout == "x\n"


def test_factory_builds_ssh_from_config(sshd_server: SshServer, tmp_path: Path) -> None:
    ctx = _ctx(
        tmp_path, sshd_server.toml("box", workdir=tmp_path / "wd") + 'python = "/usr/bin/python3"\n'
    )
    t = make_target(ctx, "box")
    assert isinstance(t, SshTarget)
    assert t.known_hosts == ctx.state_dir / "known_hosts"  # orch's own file by default
    assert t.python == "/usr/bin/python3"
    assert t.run(["echo", "via config"], timeout=20).stdout == "via config\n"
    assert (
        (ctx.state_dir / "known_hosts").read_text().startswith(f"[127.0.0.1]:{sshd_server.port} ")
    )
    t.close()
    with pytest.raises(ConfigError, match="unknown target"):
        make_target(ctx, "nope")


def test_factory_uses_the_python_bootstrap_recorded(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, '[targets.local]\nkind = "local"\n')
    ctx.store.upsert_target("local", "local", python="/opt/venv/bin/python")
    assert make_target(ctx, "local").python == "/opt/venv/bin/python"  # type: ignore[attr-defined]
    ctx.close()


def test_factory_vast_without_vast_support(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An install without orchestrator/targets/vast.py: Python's own "module not available" path.
    monkeypatch.setitem(sys.modules, "orchestrator.targets.vast", None)
    ctx = _ctx(tmp_path, '[targets.gpu]\nkind = "vast"\n')
    with pytest.raises(ConfigError, match="vast support is not installed"):
        make_target(ctx, "gpu")


def test_no_identity_file_uses_ssh_agent(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without identity_file both paramiko and rsync's ssh log in with the user's ssh-agent."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run(
            ["ssh-add", "-q", str(sshd_server.client_key)], check=True, capture_output=True
        )
        t = ssh_target(sshd_server, tmp_path, identity_file=None)
        assert t.run(["echo", "agent"], timeout=20).stdout == "agent\n"
        t.put_bytes(b"x" * 10, "a/f.bin")
        assert t.sync_down("a", tmp_path / "down", timeout=60).files_transferred == 1
        t.close()
    finally:
        agent.terminate()
        agent.wait(5)
