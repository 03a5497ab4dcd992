"""The `ssh` target: one persistent paramiko connection per box, rsync over ssh for trees.

Why it is built this way (see /work/shared/reference/reliability-notes.md):
- Every call has a deadline, enforced by a watchdog that closes the transport: paramiko's
  `exec_command` waits for the server without a timeout and `recv_exit_status()` blocks past
  `exec_command(timeout=)`. A keepalive proves nothing, so liveness is a real answer in time.
- After any failure the connection is dropped and the next call reconnects (short backoff). A
  cached connection that turns out dead when opening a channel is replaced once, transparently,
  since nothing has started on the box yet.
- Host keys are pinned on first use into orch's own known_hosts (`orchestrator.hostkeys`); a
  changed key is a HostKeyError. rsync's ssh checks the same file with StrictHostKeyChecking=yes.
- Secrets go over stdin only: sshd drops `environment=` without AcceptEnv, and argv is public.
- Behind a ProxyJump host (`jump`, from the ssh_config: `sshconfig.py`) the connection runs in a
  direct-tcpip channel of the jump host's own connection, whose key is pinned the same way;
  rsync's ssh reaches it through a ProxyCommand with the same strict options (`sshcmd.py`).
- The poll agent is one long-lived `python -m state.agent` on a channel that stays open, so a
  status poll is one line each way instead of a new ssh channel and a new remote process.
"""

from __future__ import annotations

import posixpath
import select
import socket
import threading
import time
from pathlib import Path

import paramiko

from orchestrator import hostkeys
from orchestrator.sshcmd import SshEndpoint, include_list_file, quote_argv, rsync_argv, run_rsync
from orchestrator.targets.base import Agent, CommandResult, SyncStats, Target
from orchestrator.targets.ssh_agent import SshAgent
from orchestrator.targets.watchdog import Watchdog
from state.errors import (
    ConfigError,
    HostKeyError,
    RemoteCommandError,
    TargetError,
    UnreachableError,
)
from state.protocol import atomic_write_bytes

DEFAULT_WORKDIR = "orch-work"  # relative to the login user's home
_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
_BACKOFF_MIN, _BACKOFF_MAX = 0.2, 3.0

# put_bytes: a temp file created under umask 077 in the destination dir, filled from stdin, given
# its mode, then renamed over the destination: readers never see half a file, and a secret is
# never readable by anyone else, even for a moment.
# Every command runs under the box's own `timeout`, a little past the caller's deadline: when a
# deadline passes, orch drops the connection, but sshd does not kill an exec'd command whose
# client went away, so without this a hung command would live on, on a box billed by the hour.
# A box without `timeout` (not coreutils or busybox) runs the command as is.
_DEADLINE_SCRIPT = (
    'if command -v timeout >/dev/null 2>&1; then exec timeout -k 5 "$0" "$@"; fi; exec "$@"'
)
REMOTE_GRACE_S = 2  # the box's limit is the caller's deadline plus this


def with_remote_deadline(argv: list[str], timeout: float) -> list[str]:
    """`argv` wrapped so the box itself ends it shortly after `timeout` seconds."""
    limit = max(1, int(timeout + 0.999)) + REMOTE_GRACE_S
    return ["sh", "-c", _DEADLINE_SCRIPT, str(limit), *argv]


_PUT_SCRIPT = (
    'set -e; d=$(dirname -- "$1"); mkdir -p -- "$d"; umask 077; '
    't=$(mktemp "$d/.orch-put.XXXXXX"); trap \'rm -f -- "$t"\' EXIT; '
    'cat > "$t"; chmod "$2" "$t"; mv -f -- "$t" "$1"; trap - EXIT'
)


class SshTarget(Target):
    """A box reachable over ssh. Nothing connects until the first call."""

    kind = "ssh"

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int = 22,
        user: str = "root",
        identity_file: str | Path | None = None,
        known_hosts: str | Path,
        workdir: str | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 15.0,
        kind: str = "ssh",
        jump: SshTarget | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.host = host
        self.port = int(port)
        self.user = user
        self.identity_file = Path(identity_file).expanduser() if identity_file else None
        self.known_hosts = Path(known_hosts).expanduser()
        self.python = python or "python3"
        self.env = dict(env or {})
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        #: extra rsync flags (e.g. `--bwlimit=...`), appended to every tree sync
        self.rsync_extra: list[str] = []
        self._workdir_cfg = workdir or DEFAULT_WORKDIR
        self._workdir: str | None = self._workdir_cfg if self._workdir_cfg.startswith("/") else None
        self._transport: paramiko.Transport | None = None
        self._lock = threading.RLock()
        self._backoff = 0.0
        self._retry_at = 0.0
        self._agent: Agent | None = None
        self._made_dirs: set[str] = set()
        self._ssh_agent: paramiko.Agent | None = None
        #: the ProxyJump host: its own pinned connection, carrying ours in a direct-tcpip channel
        self.jump = jump

    def __repr__(self) -> str:
        return f"SshTarget({self.name!r}, {self.user}@{self.host}:{self.port})"

    @property
    def endpoint(self) -> SshEndpoint:
        return SshEndpoint(
            host=self.host,
            port=self.port,
            user=self.user,
            known_hosts=self.known_hosts,
            identity_file=self.identity_file,
            connect_timeout=self.connect_timeout,
            jump=self.jump.endpoint if self.jump is not None else None,
        )

    @property
    def workdir(self) -> str:
        """Absolute workdir (a relative or `~/` one is resolved against the remote home once)."""
        if self._workdir is None:
            home = self.run(
                ["pwd"], timeout=self.connect_timeout + self.command_timeout, check=True
            )
            rel = self._workdir_cfg.removeprefix("~").lstrip("/")
            self._workdir = posixpath.join(home.stdout.strip(), rel) if rel else home.stdout.strip()
        return self._workdir

    def path(self, p: str) -> str:
        return p if p.startswith("/") else posixpath.join(self.workdir, p)

    def forget_host_key(self) -> int:
        """Drop this box's pinned host key (a rebuilt box; the next connect pins the new one).
        Returns how many pins went."""
        self.close()
        return hostkeys.forget_host_key(self.known_hosts, self.host, self.port)

    def preflight(self) -> None:
        """A host to connect to and a key to log in with (identity_file present, readable,
        not passphrase-protected), checked without connecting."""
        if not self.host.strip():
            raise ConfigError(f"target {self.name}: host is empty", hint="set host in orch.toml")
        self._keys()
        if self.jump is not None:
            self.jump.preflight()

    # -- connection -------------------------------------------------------------------------
    def _keys(self) -> list[paramiko.PKey]:
        if self.identity_file is not None:
            if not self.identity_file.is_file():
                raise ConfigError(
                    f"target {self.name}: identity_file {self.identity_file} does not exist",
                    hint="fix identity_file in orch.toml (a private key whose .pub is on the box)",
                )
            try:
                return [paramiko.PKey.from_path(self.identity_file)]
            except paramiko.PasswordRequiredException as exc:
                raise ConfigError(
                    f"target {self.name}: identity_file {self.identity_file} is passphrase-protected",
                    hint="load it into ssh-agent and drop identity_file, or use a key without passphrase",
                ) from exc
            except (OSError, ValueError, paramiko.SSHException) as exc:
                raise ConfigError(
                    f"target {self.name}: cannot read identity_file {self.identity_file}: {exc}"
                ) from exc
        if self._ssh_agent is None:  # kept open: agent keys sign through it
            self._ssh_agent = paramiko.Agent()
        keys: list[paramiko.PKey] = list(self._ssh_agent.get_keys())
        for n in _DEFAULT_KEYS:
            p = Path.home() / ".ssh" / n
            if p.is_file():
                try:
                    keys.append(paramiko.PKey.from_path(p))
                except (paramiko.SSHException, OSError, ValueError):
                    continue
        if not keys:
            raise ConfigError(
                f"target {self.name}: no ssh key to log in with",
                hint="set identity_file in orch.toml or load a key into ssh-agent",
            )
        return keys

    def _connect(self, deadline: float) -> paramiko.Transport:
        keys = self._keys()
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if left <= 0:
            raise UnreachableError(
                f"target {self.name}: no time left to connect to {self._where()}"
            )
        sock = self._open_socket(deadline)
        t = paramiko.Transport(sock)
        t.banner_timeout = t.handshake_timeout = t.auth_timeout = max(0.1, left)
        self._prefer_pinned_types(t)
        with Watchdog(t, deadline) as dog:
            try:
                t.start_client(timeout=max(0.1, deadline - time.monotonic()))
                hostkeys.check_or_pin(
                    self.known_hosts,
                    self.host,
                    self.port,
                    t.get_remote_server_key(),
                    target=self.name,
                )
                self._auth(t, keys)
            except (HostKeyError, ConfigError, TargetError):
                t.close()
                raise
            except paramiko.SSHException as exc:
                t.close()
                self._failed()
                if "no acceptable host key" in str(exc):
                    raise HostKeyError(
                        f"target {self.name}: {self._where()} no longer offers the pinned host key type",
                        hint=f"if the box was rebuilt, run `ssh-keygen -R '{hostkeys.host_entry(self.host, self.port)}' -f {self.known_hosts}`",
                    ) from exc
                why = "timed out" if dog.fired else str(exc)
                raise UnreachableError(
                    f"target {self.name}: ssh handshake with {self._where()} failed: {why}"
                ) from exc
            except (OSError, EOFError) as exc:
                t.close()
                self._failed()
                raise UnreachableError(
                    f"target {self.name}: connection to {self._where()} dropped: {exc}"
                ) from exc
        t.set_keepalive(15)  # keeps NAT state alive; liveness itself is judged by real answers
        self._backoff = 0.0
        self._retry_at = 0.0
        return t

    def _open_socket(self, deadline: float) -> socket.socket | paramiko.Channel:
        """A TCP connection to host:port: direct, or a direct-tcpip channel opened on the jump
        host's own (pinned, authenticated) connection, as fabric's gateway does."""
        left = max(0.1, deadline - time.monotonic())
        if self.jump is None:
            try:
                return socket.create_connection((self.host, self.port), timeout=left)
            except OSError as exc:
                self._failed()
                raise UnreachableError(
                    f"target {self.name}: cannot connect to {self._where()}: {exc.strerror or exc}"
                ) from exc
        try:
            jt = self.jump.transport(deadline)
        except UnreachableError as exc:
            self._failed()
            raise UnreachableError(
                f"target {self.name}: cannot reach its jump host: {exc}", hint=exc.hint
            ) from exc
        try:
            return jt.open_channel("direct-tcpip", (self.host, self.port), ("", 0), timeout=left)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._failed()
            if not jt.is_active():
                self.jump.after_failure(jt)
            raise UnreachableError(
                f"target {self.name}: the jump host {self.jump._where()} cannot reach "
                f"{self._where()}: {exc}"
            ) from exc

    def _prefer_pinned_types(self, t: paramiko.Transport) -> None:
        """Negotiate only the pinned key type(s), so a server with several keys is checked
        against the one we pinned instead of offering another one that looks 'new'."""
        pinned = set(hostkeys.pinned_keys(self.known_hosts, self.host, self.port))
        if "ssh-rsa" in pinned:
            pinned |= {"rsa-sha2-512", "rsa-sha2-256"}
        opts = t.get_security_options()
        allowed = tuple(k for k in opts.key_types if k in pinned)
        if allowed:
            opts.key_types = allowed

    def _auth(self, t: paramiko.Transport, keys: list[paramiko.PKey]) -> None:
        last: Exception | None = None
        for key in keys:
            try:
                t.auth_publickey(self.user, key)
                if t.is_authenticated():
                    return
            except paramiko.AuthenticationException as exc:
                last = exc
        which = str(self.identity_file) if self.identity_file else "ssh-agent/default keys"
        raise TargetError(
            f"target {self.name}: {self.user}@{self._where()} refused the key {which} ({last})",
            hint="put the key's .pub into the box's ~/.ssh/authorized_keys, or fix user/identity_file",
        )

    def _failed(self) -> None:
        self._backoff = min(_BACKOFF_MAX, max(_BACKOFF_MIN, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    def _where(self) -> str:
        via = f" via {self.jump._where()}" if self.jump is not None else ""
        return f"{self.host}:{self.port}{via}"

    @property
    def current_transport(self) -> paramiko.Transport | None:
        """The connection in use now (None when not connected)."""
        return self._transport

    def transport(self, deadline: float) -> paramiko.Transport:
        """The live connection, connecting (or reconnecting) within `deadline`."""
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                self._drop()
                # connecting never takes longer than connect_timeout, whatever the call allows
                self._transport = self._connect(
                    min(deadline, time.monotonic() + self.connect_timeout)
                )
            return self._transport

    def _drop(self) -> None:
        t, self._transport = self._transport, None
        if t is not None:
            t.close()

    def open_channel(self, deadline: float) -> tuple[paramiko.Transport, paramiko.Channel]:
        """A new session channel on the live connection (reconnecting once if it was dead)."""
        for attempt in (0, 1):
            t = self.transport(deadline)
            try:
                return t, t.open_session(timeout=max(0.1, deadline - time.monotonic()))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                # The cached connection was dead; nothing ran yet, so one fresh try is safe.
                with self._lock:
                    if self._transport is t:
                        self._drop()
                self._failed()
                if time.monotonic() >= deadline:
                    raise UnreachableError(
                        f"target {self.name}: {self._where()} did not answer within the deadline "
                        f"(opening a channel: {exc})"
                    ) from exc
                if attempt:
                    raise UnreachableError(
                        f"target {self.name}: cannot open a channel to {self._where()}: {exc}"
                    ) from exc
        raise AssertionError("unreachable")

    def exec(
        self, command: str, *, timeout: float, stdin: bytes | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run one shell command line; returns (exit code, stdout, stderr) within `timeout`."""
        deadline = time.monotonic() + timeout
        t, chan = self.open_channel(deadline)
        out, err = bytearray(), bytearray()
        data = stdin or b""
        pos = 0
        with Watchdog(t, deadline) as dog:
            try:
                chan.settimeout(0.0)
                chan.exec_command(command)
                if not data:
                    chan.shutdown_write()
                while True:
                    if pos < len(data) and chan.exit_status_ready():
                        pos = len(data)  # the command ended without reading all its input
                    elif pos < len(data) and chan.send_ready():
                        pos += chan.send(data[pos : pos + 32768])
                        if pos >= len(data):
                            chan.shutdown_write()
                    while chan.recv_ready():
                        out += chan.recv(65536)
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                    if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                        if not (chan.recv_ready() or chan.recv_stderr_ready()):
                            break
                        continue
                    if dog.fired or not t.is_active():
                        raise EOFError("connection closed")
                    select.select([chan], [], [], 0.02)
                if (
                    dog.fired
                    or not chan.exit_status_ready()
                    or (chan.exit_status == -1 and not t.is_active())
                ):
                    raise EOFError("connection closed before the command ended")
                rc = chan.recv_exit_status()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self.after_failure(t)
                if dog.fired or time.monotonic() >= deadline:
                    raise UnreachableError(
                        f"target {self.name}: `{_short(command)}` did not finish within {timeout:g}s "
                        f"(connection to {self._where()} closed)"
                    ) from exc
                raise UnreachableError(
                    f"target {self.name}: connection to {self._where()} lost: {exc}"
                ) from exc
            finally:
                chan.close()
        return rc, bytes(out), bytes(err)

    def after_failure(self, t: paramiko.Transport) -> None:
        """Drop connection `t` after a failure on it; the next call reconnects (with backoff)."""
        with self._lock:
            if self._transport is t:
                self._drop()
            else:
                t.close()
        self._failed()

    # -- Target API -------------------------------------------------------------------------
    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        cwd: str | None = None,
        check: bool = False,
    ) -> CommandResult:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError(f"argv must be a non-empty list of str, got {argv!r}")
        line = quote_argv(with_remote_deadline(argv, timeout))
        if cwd:
            line = f"cd -- {quote_argv([self.path(cwd)])} && {line}"
        rc, out, err = self.exec(line, timeout=timeout, stdin=stdin)
        res = CommandResult(
            tuple(argv), rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        )
        if check and rc != 0:
            raise RemoteCommandError(
                f"target {self.name}: `{_short(quote_argv(argv))}` exited {rc}: "
                f"{' '.join(res.stderr.split())[-300:] or '(no stderr)'}",
                returncode=rc,
                stderr=res.stderr,
            )
        return res

    def put_bytes(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        argv = ["sh", "-c", _PUT_SCRIPT, "orch-put", self.path(remote_path), f"{mode & 0o7777:o}"]
        self.run(argv, timeout=self.command_timeout + len(data) / 1e6, stdin=data, check=True)

    def get_file(self, remote_path: str, local_path: Path, *, timeout: float = 300.0) -> None:
        """Fetch one (small) file; trees and big artifacts go through `sync_down`."""
        path = self.path(remote_path)
        rc, out, err = self.exec(quote_argv(["cat", "--", path]), timeout=timeout)
        if rc != 0:
            raise RemoteCommandError(
                f"target {self.name}: cannot read {path}: {err.decode('utf-8', 'replace').strip()}",
                returncode=rc,
                stderr=err.decode("utf-8", "replace"),
            )
        atomic_write_bytes(local_path, out)

    def sync_up(
        self,
        local_dir: Path,
        remote_dir: str,
        *,
        excludes: list[str],
        delete: bool = True,
        filter_files: list[Path] | None = None,
    ) -> SyncStats:
        """Mirror `local_dir` into `remote_dir` with rsync over ssh (same key, port, pins).
        With `filter_files` (relative paths) exactly those are mirrored."""
        dest = self.path(remote_dir)
        # Connects (and pins the host key) first, so rsync's StrictHostKeyChecking=yes can pass;
        # once a destination exists, a re-sync skips this round trip.
        if dest not in self._made_dirs:
            self.run(
                ["mkdir", "-p", "--", dest],
                timeout=self.connect_timeout + self.command_timeout,
                check=True,
            )
            self._made_dirs.add(dest)
        with include_list_file(filter_files) as ff:
            argv = rsync_argv(
                f"{Path(local_dir)}/",
                f"{self.endpoint.rsync_host}:{dest}/",
                ep=self.endpoint,
                delete=delete,
                excludes=excludes,
                filter_file=ff,
                io_timeout=int(max(30, self.command_timeout * 4)),
                extra=self.rsync_extra,
            )
            return run_rsync(argv, timeout=None, what=f"sync to target {self.name}")

    def sync_down(
        self,
        remote_dir: str,
        local_dir: Path,
        *,
        excludes: list[str] | None = None,
        timeout: float | None = None,
    ) -> SyncStats:
        src = self.path(remote_dir)
        self.transport(time.monotonic() + self.connect_timeout)  # pin the host key first
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        argv = rsync_argv(
            f"{self.endpoint.rsync_host}:{src}/",
            f"{Path(local_dir)}/",
            ep=self.endpoint,
            excludes=excludes,
            io_timeout=int(max(30, self.command_timeout * 4)),
            extra=self.rsync_extra,
            untrusted_source=True,
        )
        return run_rsync(argv, timeout=timeout, what=f"pull from target {self.name}")

    def agent(self) -> Agent:
        if self._agent is None:
            self._agent = SshAgent(self)
        return self._agent

    def agent_argv(self) -> list[str]:
        wd = self.workdir
        return [
            "env",
            f"PYTHONPATH={posixpath.join(wd, 'code')}",
            self.python,
            "-m",
            "state.agent",
            "--workdir",
            wd,
        ]

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        with self._lock:
            self._drop()
        if self.jump is not None:
            self.jump.close()


def _short(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
