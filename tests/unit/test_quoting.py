"""Command quoting: what `quote_argv` builds splits back to exactly the argv it came from, in
Python's shlex, in a real POSIX shell, and through a real OpenSSH sshd (both the `ssh` client
argv and the paramiko target)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.sshcmd import (
    SshEndpoint,
    include_rules,
    parse_rsync_stats,
    quote_argv,
    rsync_argv,
    rsync_shell,
    ssh_argv,
    ssh_options,
)

# Anything a POSIX argv can hold: no NUL, valid UTF-8 (no lone surrogates).
arg = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
argv_st = st.lists(arg, min_size=1, max_size=8)

NASTY = [
    "",
    " ",
    "a b",
    "it's",
    '"double"',
    "$HOME",
    "${PATH}",
    "`id`",
    "$(id)",
    "; rm -rf /",
    "a\nb",
    "tab\there",
    "back\\slash",
    "*",
    "?",
    "[a-z]",
    "~",
    "-n",
    "--",
    "&&",
    "|",
    ">out",
    "<in",
    "!event",
    "#comment",
    "é ü 日本",
    "'\"'\"'",
]


def _nul_split(data: bytes) -> list[str]:
    assert data.endswith(b"\0")
    return [p.decode() for p in data[:-1].split(b"\0")]


@given(argv_st)
def test_quote_argv_splits_back_with_shlex(argv: list[str]) -> None:
    assert shlex.split(quote_argv(argv)) == argv


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv_st)
def test_quote_argv_splits_back_in_a_real_shell(argv: list[str]) -> None:
    line = quote_argv(["printf", "%s\\0", *argv])
    out = subprocess.run(["sh", "-c", line], capture_output=True, check=True, timeout=10)
    assert _nul_split(out.stdout) == argv


def test_nasty_argv_in_a_real_shell() -> None:
    out = subprocess.run(
        ["sh", "-c", quote_argv(["printf", "%s\\0", *NASTY])], capture_output=True, check=True
    )
    assert _nul_split(out.stdout) == NASTY


def _endpoint(server, tmp_path: Path) -> SshEndpoint:
    return SshEndpoint(
        host=server.host,
        port=server.port,
        user=server.user,
        known_hosts=tmp_path / "known_hosts",
        identity_file=server.client_key,
    )


@pytest.mark.integration
def test_nasty_argv_round_trips_through_real_ssh(sshd_server, tmp_path: Path) -> None:
    """The paramiko target pins the key; then both transports carry NASTY unchanged."""
    from orchestrator.targets.ssh import SshTarget

    kh = tmp_path / "known_hosts"
    with SshTarget(
        "box",
        host=sshd_server.host,
        port=sshd_server.port,
        user=sshd_server.user,
        identity_file=sshd_server.client_key,
        known_hosts=kh,
        workdir=str(tmp_path / "wd"),
    ) as t:
        res = t.run(["printf", "%s\\0", *NASTY], timeout=20, check=True)
        assert _nul_split(res.stdout.encode()) == NASTY
    # The OpenSSH client with orch's options (StrictHostKeyChecking=yes against the pin).
    out = subprocess.run(
        ssh_argv(_endpoint(sshd_server, tmp_path), ["printf", "%s\\0", *NASTY]),
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert _nul_split(out.stdout) == NASTY


def test_ssh_options_are_strict(tmp_path: Path) -> None:
    ep = SshEndpoint(
        host="h", port=2222, user="u", known_hosts=tmp_path / "kh", identity_file=tmp_path / "k"
    )
    opts = ssh_options(ep)
    joined = " ".join(opts)
    for needed in (
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        f"UserKnownHostsFile={tmp_path / 'kh'}",
        "IdentitiesOnly=yes",
        "ServerAliveInterval=",
        "ServerAliveCountMax=",
        "ConnectTimeout=",
    ):
        assert needed in joined
    assert "StrictHostKeyChecking=no" not in joined
    assert opts[opts.index("-p") + 1] == "2222"
    # rsync's -e value splits back into the same options.
    assert shlex.split(rsync_shell(ep)) == opts


def test_ssh_options_with_spaces_in_paths_survive_rsync_e(tmp_path: Path) -> None:
    kh = tmp_path / "dir with 'quote'" / "known hosts"
    ep = SshEndpoint(host="h", port=22, user="u", known_hosts=kh)
    argv = rsync_argv("src/", "u@h:dst/", ep=ep)
    e = argv[argv.index("-e") + 1]
    assert f"UserKnownHostsFile={kh}" in shlex.split(e)
    assert "-i" not in shlex.split(e)  # no identity: ssh-agent / default keys


def test_include_rules_escape_wildcards() -> None:
    rules = include_rules([Path("a/b/c.py"), Path("x[1]*.txt"), Path("top.py")]).split(b"\0")
    assert b"+ /a/" in rules and b"+ /a/b/" in rules
    assert b"+ /a/b/c.py" in rules
    assert b"+ /x\\[1\\]\\*.txt" in rules
    assert b"+ /top.py" in rules


def test_parse_rsync_stats_from_real_rsync(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f.bin").write_bytes(b"x" * 123_456)
    (src / "g.txt").write_text("hello")
    argv = rsync_argv(f"{src}/", f"{dst}/")
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=True,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
    )
    stats = parse_rsync_stats(out.stdout)
    assert stats.files_transferred == 2
    assert stats.total_size == 123_456 + 5
    assert stats.literal_bytes == 123_456 + 5
    again = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=True,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
    )
    noop = parse_rsync_stats(again.stdout)
    assert noop.files_transferred == 0 and noop.literal_bytes == 0
    assert noop.total_size == stats.total_size


def test_parse_rsync_stats_thousands_separators() -> None:
    text = "Number of regular files transferred: 3\nLiteral data: 1,234,567 bytes\nTotal bytes sent: 2,000\nTotal bytes received: 35\n"
    s = parse_rsync_stats(text)
    assert (s.files_transferred, s.literal_bytes, s.bytes_sent) == (3, 1_234_567, 2035)
