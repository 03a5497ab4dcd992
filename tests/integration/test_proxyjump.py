"""An ssh target behind a jump host, configured by an ssh_config file alone (orch.toml names only
the `Host` alias): `orch launch` syncs the code (rsync), starts a short `exec` stage, one poll
watches it (the persistent agent channel), and the pull (rsync) brings the run home. Two real
OpenSSH sshd on loopback: the jump host allows forwarding only to the target (`PermitOpen`).

The proof that every path goes through the jump host: the jump sshd logs (LogLevel DEBUG1) each
direct-tcpip forward to the target with its originator, so the code sync and the pull are seen
as OpenSSH's `ssh -W` forwards (rsync's ssh, through its ProxyCommand) and the command and agent
connections as orch's own paramiko forwards (`SshTarget._open_socket` sends originator ("", 0));
the agent's channel runs on that forwarded connection; both hosts' keys are pinned in orch's
known_hosts; with the jump sshd stopped the target (still up) is unreachable from orch and from
rsync's ssh; and a changed jump host key is refused by both, as a direct box's would be.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

from jobs.spec import StageSpec
from orchestrator import launch as launch_mod
from orchestrator.context import Context
from orchestrator.monitor.refresh import refresh_once
from orchestrator.pull import pull_run
from orchestrator.sshcmd import ssh_argv
from orchestrator.targets.factory import make_target
from orchestrator.targets.ssh import SshTarget
from state.errors import HostKeyError, UnreachableError
from state.models import WorkerTask
from state.phases import Phase
from tests.conftest import REPO, require_tools
from tests.sshd import SshServer, make_server

pytestmark = pytest.mark.integration

PACKAGES = ("state", "worker", "jobs", "orchestrator")
WRITE_RESULT = (
    "import os, pathlib; d = pathlib.Path(os.environ['ORCH_RUN_DIR']);"
    "(d / 'result.txt').write_text('through the jump\\n'); print('ran', flush=True)"
)


@pytest.fixture
def jump_and_box(tmp_path: Path):
    require_tools("sshd", "ssh", "ssh-keygen", "rsync", "tmux")
    box = make_server(tmp_path / "box")
    jump = make_server(tmp_path / "jump")
    jump.extra_config = ["AllowTcpForwarding yes", f"PermitOpen 127.0.0.1:{box.port}"]
    jump.log_level = "DEBUG1"  # one `server_request_direct_tcpip` line per forward
    box.start()
    jump.start()
    try:
        yield jump, box
    finally:
        jump.stop()
        box.stop()


def ssh_config_for(path: Path, jump: SshServer, box: SshServer) -> Path:
    path.write_text(
        "Host gpu-box\n"
        f"    HostName {box.host}\n"
        f"    Port {box.port}\n"
        f"    User {box.user}\n"
        f"    IdentityFile {box.client_key}\n"
        "    ProxyJump bastion\n"
        "Host bastion\n"
        f"    HostName {jump.host}\n"
        f"    Port {jump.port}\n"
        f"    User {jump.user}\n"
        f"    IdentityFile {jump.client_key}\n"
    )
    return path


_FORWARD = re.compile(
    r"server_request_direct_tcpip: originator (\S*) port (\d+), target \S+ port (\d+)"
)


def forwards(jump: SshServer, box: SshServer) -> tuple[int, int]:
    """(forwards by OpenSSH's ssh -W: rsync and ssh_argv; forwards by orch's paramiko: commands
    and the agent) the jump sshd made to the box so far. OpenSSH's sshd logs the originator the
    client sent (serverloop.c, server_request_direct_tcpip); orch sends ("", 0), OpenSSH's -W
    sends its own stand-in address."""
    by_ssh = by_orch = 0
    for found in _FORWARD.finditer(jump.log.read_text(errors="replace")):
        originator, originator_port, port = found.groups()
        if int(port) != box.port:
            continue
        if (originator, originator_port) == ("", "0"):
            by_orch += 1
        else:
            by_ssh += 1
    return by_ssh, by_orch


def box_toml(config: Path, workdir: Path) -> str:
    """orch.toml of a target known only by its ssh_config alias (`gpu-box`, behind the jump)."""
    return (
        'default_target = "box"\n[targets.box]\nkind = "ssh"\nhost = "gpu-box"\n'
        f'ssh_config = "{config}"\nworkdir = "{workdir}"\npython = "{sys.executable}"\n'
    )


def ssh_true(endpoint) -> subprocess.CompletedProcess[str]:
    """`true` through OpenSSH's ssh with the argv rsync uses (orch's `ssh_argv`)."""
    return subprocess.run(
        ssh_argv(endpoint, ["true"]),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def make_project(root: Path, toml: str) -> Path:
    root.mkdir(parents=True)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "orch.toml").write_text(toml)
    return root


def wait_exit(ctx: Context, rec, timeout: float = 90.0) -> int:
    target = make_target(ctx, rec.target)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = launch_mod.read_remote_exit_code(target, rec)
            if code is not None:
                return code
            time.sleep(0.2)
    finally:
        target.close()
    raise AssertionError(f"{rec.key}: no exit_code after {timeout}s")


def test_launch_watch_and_pull_through_proxyjump(jump_and_box, tmp_path, monkeypatch):
    jump, box = jump_and_box
    config = ssh_config_for(tmp_path / "ssh_config", jump, box)
    monkeypatch.chdir(make_project(tmp_path / "proj", box_toml(config, tmp_path / "remote")))
    ctx = Context()
    try:
        target = make_target(ctx, "box")
        assert isinstance(target, SshTarget) and target.jump is not None
        assert (target.host, target.port, target.user) == (box.host, box.port, box.user)
        assert (target.jump.port, target.jump.user) == (jump.port, jump.user)

        stage = StageSpec(
            name="t-jump",
            stage_dir="t-jump_dir",
            task=WorkerTask(command="exec", args={"argv": [sys.executable, "-c", WRITE_RESULT]}),
            timeout_s=300,
        )
        assert forwards(jump, box) == (0, 0)
        rec = launch_mod.launch_stage(ctx, stage)  # code sync (rsync) + tmux over the jump
        assert rec.phase == Phase.RUNNING
        synced = forwards(jump, box)
        assert synced[0] >= 1 and synced[1] >= 1, synced  # rsync's ssh and orch's connection
        assert wait_exit(ctx, rec) == 0
        before_poll = forwards(jump, box)
        refresh_once(ctx, ["box"])  # one poll: the agent channel, through the jump
        polled = forwards(jump, box)
        assert polled[1] > before_poll[1], (before_poll, polled)
        final = ctx.store.get_run(rec.stage_dir, rec.run_id)
        assert final is not None and final.phase == Phase.SUCCEEDED, final
        result = pull_run(ctx, final)  # rsync through the jump, verified against the manifest
        assert (result.local_dir / "result.txt").read_text() == "through the jump\n"
        pulled = forwards(jump, box)
        assert pulled[0] > polled[0], (polled, pulled)  # the pull's rsync went through the jump

        # Both hops pinned in orch's own known_hosts.
        pins = (ctx.state_dir / "known_hosts").read_text()
        assert f"[127.0.0.1]:{jump.port} " in pins and f"[127.0.0.1]:{box.port} " in pins

        live = make_target(ctx, "box")
        try:
            assert live.run(["true"], timeout=20).ok
            assert jump.connection_pids(), "the jump sshd carries the connection"
            answer = live.agent().request({"op": "ping"}, timeout=20)
            assert answer.get("pong") is not None, answer
            # The agent's channel is a session of the box's connection, which itself runs in a
            # direct-tcpip channel of the jump host's connection.
            box_conn = live.current_transport
            assert box_conn is not None and isinstance(box_conn.sock, paramiko.Channel)
            assert live.jump is not None
            assert box_conn.sock.get_transport() is live.jump.current_transport
        finally:
            live.close()

        jump.stop()  # the target sshd stays up: only the path through the jump is gone
        cut = make_target(ctx, "box")
        try:
            with pytest.raises(UnreachableError, match="jump host"):
                cut.run(["true"], timeout=10)
        finally:
            cut.close()
        direct = ssh_true(cut.endpoint)
        assert direct.returncode != 0  # rsync's ssh goes through the jump as well
    finally:
        ctx.close()


def test_a_changed_jump_host_key_is_refused(jump_and_box, tmp_path, monkeypatch):
    """Pinning stays strict through the jump: once the jump host's key is pinned, a new key there
    stops orch's connection (HostKeyError, not unreachable) and rsync's ssh alike."""
    jump, box = jump_and_box
    config = ssh_config_for(tmp_path / "ssh_config", jump, box)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "orch.toml").write_text(box_toml(config, tmp_path / "remote"))
    monkeypatch.chdir(tmp_path / "proj")
    ctx = Context()
    try:
        first = make_target(ctx, "box")
        try:
            assert first.run(["true"], timeout=20).ok  # both keys pinned on first use
        finally:
            first.close()
        jump.rotate_host_key()
        again = make_target(ctx, "box")
        try:
            with pytest.raises(HostKeyError, match=str(jump.port)):
                again.run(["true"], timeout=20)
        finally:
            again.close()
        via_ssh = ssh_true(again.endpoint)
        assert via_ssh.returncode != 0
        assert "host key" in via_ssh.stderr.lower(), via_ssh.stderr
    finally:
        ctx.close()
