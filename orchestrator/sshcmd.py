"""Argv builders for OpenSSH and rsync subprocesses, and the rsync runner both targets share.

Everything here builds lists; a list becomes one string only where a shell or rsync's `-e` must
parse it, and then through `shlex.join` (`quote_argv`). A target behind a jump host gets a
`ProxyCommand` running the same strict ssh to the jump host. The ssh options make a subprocess behave
like the paramiko side of the ssh target: no prompts (`BatchMode`), a connect deadline, a dead
peer noticed in seconds (`ServerAliveInterval` x `ServerAliveCountMax`; a keepalive alone proves
nothing), only our key (`IdentitiesOnly`), and only the host key orch pinned
(`StrictHostKeyChecking=yes` against orch's own known_hosts, never the user's).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from state.errors import HostKeyError, RemoteCommandError, UnreachableError


@dataclass
class SyncStats:
    """What a tree sync moved (from rsync's --stats)."""

    files_transferred: int = 0
    bytes_sent: int = 0  # bytes on the wire
    literal_bytes: int = 0  # file data actually sent (0 for a no-op sync)
    total_size: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


#: rsync keeps interrupted files here (relative to the destination dir) and resumes from them.
PARTIAL_DIR = ".rsync-partial"


def quote_argv(argv: list[str] | tuple[str, ...]) -> str:
    """One shell-safe command line that a POSIX shell splits back into exactly `argv`."""
    return shlex.join(list(argv))


@dataclass(frozen=True)
class SshEndpoint:
    """Where and how to reach a box with OpenSSH (the same facts the paramiko side uses)."""

    host: str
    port: int
    user: str
    known_hosts: Path
    identity_file: Path | None = None
    connect_timeout: float = 10.0
    alive_interval: int = 5
    alive_count: int = 3
    #: the ProxyJump host in front of this one (reached with the same strict options)
    jump: SshEndpoint | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    @property
    def rsync_host(self) -> str:
        """`user@host` as rsync wants it (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}"


def ssh_options(ep: SshEndpoint) -> list[str]:
    """The `ssh` argv up to (not including) the destination."""
    argv = [
        "ssh",
        "-F",
        "/dev/null",  # the user's ~/.ssh/config must not change what orch connects to
        "-p",
        str(ep.port),
        "-o",
        "BatchMode=yes",
        "-o",
        f"ConnectTimeout={max(1, int(round(ep.connect_timeout)))}",
        "-o",
        f"ServerAliveInterval={ep.alive_interval}",
        "-o",
        f"ServerAliveCountMax={ep.alive_count}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={ep.known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        "LogLevel=ERROR",
    ]
    if ep.identity_file is not None:
        argv += ["-i", str(ep.identity_file), "-o", "IdentitiesOnly=yes"]
    if ep.jump is not None:
        argv += ["-o", f"ProxyCommand={jump_command(ep.jump)}"]
    return argv


def jump_command(jump: SshEndpoint) -> str:
    """The ProxyCommand that reaches `%h:%p` through `jump`: `ssh <strict options> -W ...`.

    Not `-J`/ProxyJump: OpenSSH runs the jump's ssh with none of our `-o` options, so the jump
    host's key would be checked against the user's known_hosts, not orch's pins. ssh expands
    `%` tokens in a ProxyCommand, so a literal `%` is doubled.
    """
    hop = [part.replace("%", "%%") for part in ssh_options(jump)]
    return quote_argv([*hop, "-W", "[%h]:%p", "--", jump.destination.replace("%", "%%")])


def ssh_argv(ep: SshEndpoint, remote_argv: list[str]) -> list[str]:
    """`ssh ... user@host -- <quoted remote command>`: the remote shell sees exactly `remote_argv`."""
    return [*ssh_options(ep), "--", ep.destination, quote_argv(remote_argv)]


def rsync_shell(ep: SshEndpoint) -> str:
    """The `-e` value for rsync (rsync splits it honouring single and double quotes)."""
    return quote_argv(ssh_options(ep))


#: What a pull from a box adds to `-a`: a run dir there may hold a link to anything (`x ->
#: /etc/shadow`): it is skipped, not copied, so nothing here ever follows it.
UNTRUSTED_SOURCE = [
    "--no-links",
    "--no-devices",
    "--no-specials",
    "--no-owner",
    "--no-group",
    "--chmod=ugo-s",
]
_SKIPPED_RE = re.compile(r'^skipping non-regular file "(.*)"$', re.M)


def rsync_argv(
    src: str,
    dest: str,
    *,
    ep: SshEndpoint | None = None,
    delete: bool = False,
    excludes: list[str] | None = None,
    filter_file: Path | None = None,
    io_timeout: int = 60,
    extra: list[str] | None = None,
    untrusted_source: bool = False,
) -> list[str]:
    """An rsync argv: archive mode, partial-resume, an I/O stall timeout, --stats.

    `filter_file` holds NUL-separated include rules (`--from0 --include-from`) followed by an
    exclude-all, so exactly the listed files are mirrored; with `delete` everything else in
    `dest` goes too (`--delete-excluded`). `untrusted_source` (a pull from a rented box): only
    regular files and dirs arrive (symlinks, devices and FIFOs are skipped, never recreated
    here), with this user as owner and no setuid/setgid bits (UNTRUSTED_SOURCE).
    """
    argv = [
        "rsync",
        "-a",
        "--stats",
        f"--partial-dir={PARTIAL_DIR}",
        f"--timeout={max(1, io_timeout)}",
    ]
    if ep is not None:
        argv += ["-e", rsync_shell(ep)]
    if untrusted_source:
        argv += UNTRUSTED_SOURCE
    if delete:
        argv.append("--delete")
    for pattern in excludes or []:
        argv.append(f"--exclude={pattern}")
    if filter_file is not None:
        argv += ["--from0", f"--include-from={filter_file}", "--exclude=*"]
        if delete:
            argv.append("--delete-excluded")
    argv += list(extra or [])
    argv += [src, dest]
    return argv


_STAT_FIELDS = {
    "Number of regular files transferred": "files_transferred",
    "Literal data": "literal_bytes",
    "Matched data": "matched_bytes",
    "Total file size": "total_size",
    "Total bytes sent": "wire_sent",
    "Total bytes received": "wire_received",
    "Number of files": "files",
}


def parse_rsync_stats(text: str) -> SyncStats:
    """Parse `rsync --stats` output. `bytes_sent` is the wire total (sent + received, so a pull
    counts too); `literal_bytes` is rsync's "Literal data", the file data that moved."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key.strip() not in _STAT_FIELDS:
            continue
        m = re.match(r"\s*([\d,]+)", rest)
        if m:
            found[_STAT_FIELDS[key.strip()]] = int(m.group(1).replace(",", ""))
    return SyncStats(
        files_transferred=found.get("files_transferred", 0),
        bytes_sent=found.get("wire_sent", 0) + found.get("wire_received", 0),
        literal_bytes=found.get("literal_bytes", 0),
        total_size=found.get("total_size", 0),
        extra={
            k: found[k]
            for k in ("matched_bytes", "wire_sent", "wire_received", "files")
            if k in found
        },
    )


_NOT_FOUND = re.compile(r"command not found|: not found|No such file or directory")

#: rsync exit codes that mean "the other side went away" rather than "the command was wrong".
_UNREACHABLE_CODES = {10, 12, 30, 35, 255}


def run_rsync(argv: list[str], *, timeout: float | None, what: str) -> SyncStats:
    """Run rsync with a wall-clock deadline (its process group is killed past it).

    Raises UnreachableError (deadline, lost connection), HostKeyError (ssh refused the host key),
    RemoteCommandError (any other failure). Exit 24 (files vanished mid-sync) is not an error.
    """
    env = {**os.environ, "LC_ALL": "C"}  # plain digits in --stats
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # so a deadline kills rsync and its ssh child together
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: rsync then keeps what it received in --partial-dir (resumed by the next
        # sync, never under a final name); SIGKILL alone leaves its temp file behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            proc.communicate(timeout=5)
        kill_group(proc)
        raise UnreachableError(f"{what}: rsync did not finish within {timeout:.0f}s") from None
    stderr = err.decode("utf-8", "replace").strip()
    rc = proc.returncode
    if (
        "Host key verification failed" in stderr
        or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
    ):
        raise HostKeyError(f"{what}: ssh refused the host key: {_tail(stderr)}")
    if rc != 0 and "(0 bytes received so far)" in stderr and _NOT_FOUND.search(stderr):
        # The remote shell could not run rsync: a missing package, not a dead box.
        raise RemoteCommandError(
            f"{what}: rsync could not start on the other side: {_tail(stderr.splitlines()[0])}",
            returncode=rc,
            stderr=stderr,
            hint="install it there (apt-get install -y rsync)",
        )
    if rc in _UNREACHABLE_CODES or rc < 0:
        raise UnreachableError(f"{what}: connection lost (rsync exit {rc}): {_tail(stderr)}")
    if rc not in (0, 24):
        raise RemoteCommandError(
            f"{what}: rsync failed (exit {rc}): {_tail(stderr)}", returncode=rc, stderr=stderr
        )
    text = out.decode("utf-8", "replace")
    stats = parse_rsync_stats(text)
    stats.seconds = time.monotonic() - start
    skipped = _SKIPPED_RE.findall(text)
    if skipped:  # symlinks and special files of a pull (UNTRUSTED_SOURCE)
        stats.extra["skipped"] = skipped
    if rc == 24:
        stats.extra["vanished"] = True
    return stats


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started with `start_new_session=True` and everything in its group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def _tail(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text[-n:] if text else "(no output)"


@contextlib.contextmanager
def include_list_file(files: list[Path] | None) -> Iterator[Path | None]:
    """A temp NUL-separated include list for rsync (`--from0 --include-from`), or None."""
    if files is None:
        yield None
        return
    fd, name = tempfile.mkstemp(prefix="orch-sync-", suffix=".filter")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(include_rules(files))
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def include_rules(files: list[Path]) -> bytes:
    """rsync include rules (NUL-separated) that admit exactly `files` and their parent dirs.

    Patterns are anchored (`/a/b`) and wildcard characters are escaped, so a file named `[x]*`
    matches only itself.
    """
    dirs: set[str] = set()
    rules: list[str] = []
    for f in files:
        parts = Path(f).as_posix().strip("/").split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
        rules.append("/" + _escape("/".join(parts)))
    head = [f"/{_escape(d)}/" for d in sorted(dirs)]
    return b"".join(f"+ {r}".encode("utf-8", "surrogateescape") + b"\0" for r in head + rules)


def _escape(path: str) -> str:
    # rsync honours backslash escapes only in patterns that contain a wildcard; escaping one
    # makes the pattern "wildcard", so literal backslashes must be escaped as well.
    if any(c in path for c in "*?[\\"):
        return "".join("\\" + c if c in "*?[]\\" else c for c in path)
    return path
