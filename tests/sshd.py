"""A real OpenSSH sshd on 127.0.0.1 for integration tests (no mocks).

Generates host and client keys in a temp dir, writes a config (high free port, `StrictModes no`,
`UsePAM no`, our authorized_keys), and runs `sshd -D -e -f CONFIG` as a child process. The login
user is the current user; its shell is used as is. Helpers let tests freeze (SIGSTOP) or kill the
per-connection sshd children and stop/start the listener, for fault injection.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

SSHD_CANDIDATES = ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]


def find_sshd() -> str | None:
    for c in SSHD_CANDIDATES:
        if os.path.exists(c):
            return c
    return shutil.which("sshd")


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class SshServer:
    root: Path
    port: int
    user: str
    client_key: Path
    host_key: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_config: list[str] = field(default_factory=list)
    #: sshd keeps the first LogLevel it reads, so extra_config cannot raise it: DEBUG1 logs each
    #: direct-tcpip forward with its originator (tests/integration/test_proxyjump.py)
    log_level: str = "ERROR"
    #: more variables for every session (sshd uses only its first `SetEnv` line: one line holds all)
    set_env: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def home(self) -> Path:
        """The login user's $HOME inside ssh sessions: empty, private to this server."""
        return self.root / "home"

    def session_env(self) -> dict[str, str]:
        """What every ssh session gets: the private HOME, the test process's tmux dir (so the
        "box" and the test share one tmux server, the suite's own: tests/conftest.py), then
        `set_env`."""
        env = {"HOME": str(self.home)}
        if os.environ.get("TMUX_TMPDIR"):
            env["TMUX_TMPDIR"] = os.environ["TMUX_TMPDIR"]
        return {**env, **self.set_env}

    def write_config(self) -> None:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin yes",
            "MaxSessions 50",
            "MaxStartups 50:30:100",
            f"LogLevel {self.log_level}",
            "Subsystem sftp internal-sftp",
            # The login shell reads $HOME/.bashrc for ssh commands; this machine's root .bashrc
            # runs `pyenv rehash`, which takes a lock and hangs every later login for up to a
            # minute when a killed session leaves it behind. A home of our own keeps the tests
            # off the machine's dotfiles (the remote side uses absolute interpreter paths).
            " ".join(["SetEnv", *(f"{k}={v}" for k, v in self.session_env().items())]),
            *self.extra_config,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError("sshd not found: install openssh-server")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.write_config()
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(self.config)],
            stdout=open(self.log, "ab"),  # noqa: SIM115 - lives as long as the server
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5) as s,
            ):
                if s.recv(4).startswith(b"SSH-"):
                    return
            time.sleep(0.05)
        raise RuntimeError(
            f"sshd did not answer on port {self.port}: {self.log.read_text()[-2000:]}"
        )

    def stop(self) -> None:
        """Stop the listener and every connection child."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.connection_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def connection_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes (children of the listener)."""
        if self.proc is None:
            return []
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def signal_connections(self, sig: int) -> list[int]:
        pids = self.connection_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def rotate_host_key(self) -> None:
        """Give the server a new host key (a 'changed host key' for clients that pinned the old)."""
        self.stop()
        for p in (self.host_key, self.host_key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        keygen(self.host_key)
        self.start()

    def toml(
        self, name: str = "box", workdir: Path | None = None, known_hosts: Path | None = None
    ) -> str:
        """A `[targets.NAME]` section for orch.toml pointing at this server."""
        lines = [
            f"[targets.{name}]",
            'kind = "ssh"',
            f'host = "{self.host}"',
            f"port = {self.port}",
            f'user = "{self.user}"',
            f'identity_file = "{self.client_key}"',
        ]
        if known_hosts is not None:
            lines.append(f'known_hosts = "{known_hosts}"')
        if workdir is not None:
            lines.append(f'workdir = "{workdir}"')
        return "\n".join(lines) + "\n"


def make_server(root: Path) -> SshServer:
    root.mkdir(parents=True, exist_ok=True)
    host_key = keygen(root / "ssh_host_ed25519_key")
    client_key = keygen(root / "client_key")
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    return SshServer(
        root=root,
        port=free_port(),
        user=getpass.getuser(),
        client_key=client_key,
        host_key=host_key,
        config=root / "sshd_config",
        log=root / "sshd.log",
    )
