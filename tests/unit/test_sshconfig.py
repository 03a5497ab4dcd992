"""The ssh_config lookup of `kind = "ssh"` targets (orchestrator/targets/sshconfig.py): a `Host`
alias's HostName, User, Port, IdentityFile and ProxyJump, read with fabric's `Config` and
`Connection`, orch.toml's keys winning, and the one-line errors for what orch does not do.
Nothing connects: the lookup is pure file reading (the real connection through a jump host is
tests/integration/test_proxyjump.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import SshTarget as SshConfig
from orchestrator.sshcmd import ssh_options
from orchestrator.targets.factory import resolve_ssh
from orchestrator.targets.sshconfig import DEFAULT_USER, SshHop, resolve
from state.errors import ConfigError


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    found = {}
    for name in ("box_key", "jump_key"):
        found[name] = tmp_path / name
        found[name].write_text("not read by the lookup\n")
    return found


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


def test_an_alias_with_proxyjump_resolves_both_hops(tmp_path, keys):
    config = write_config(
        tmp_path,
        "Host gpu-box\n"
        "    HostName 10.0.0.7\n"
        "    Port 2222\n"
        "    User alice\n"
        f"    IdentityFile {tmp_path}/missing_key\n"  # skipped: OpenSSH skips a missing one too
        f"    IdentityFile {keys['box_key']}\n"
        "    ProxyJump bastion\n"
        "Host bastion\n"
        "    HostName bastion.example.org\n"
        "    Port 2200\n"
        "    User bob\n"
        f"    IdentityFile {keys['jump_key']}\n",
    )
    hop = resolve("gpu-box", ssh_config=config)
    assert hop == SshHop(
        host="10.0.0.7",
        port=2222,
        user="alice",
        identity_file=str(keys["box_key"]),
        jump=SshHop(
            host="bastion.example.org", port=2200, user="bob", identity_file=str(keys["jump_key"])
        ),
    )


def test_orch_toml_keys_override_the_ssh_config(tmp_path, keys):
    config = write_config(
        tmp_path,
        "Host gpu-box\n    HostName 10.0.0.7\n    Port 2222\n    User alice\n"
        f"    IdentityFile {keys['jump_key']}\n",
    )
    cfg = SshConfig(
        host="gpu-box",
        port=2022,
        user="carol",
        identity_file=str(keys["box_key"]),
        ssh_config=config,
    )
    hop = resolve_ssh(cfg)  # what make_target builds an ssh target from
    assert (hop.host, hop.port, hop.user, hop.identity_file) == (
        "10.0.0.7",
        2022,
        "carol",
        str(keys["box_key"]),
    )
    assert hop.jump is None


def test_an_inline_proxyjump_and_the_defaults(tmp_path):
    config = write_config(tmp_path, "Host gpu-box\n    ProxyJump eve@gate.example.org:2201\n")
    hop = resolve("gpu-box", ssh_config=config)
    assert (hop.host, hop.port, hop.user, hop.identity_file) == ("gpu-box", 22, DEFAULT_USER, None)
    assert hop.jump is not None
    assert (hop.jump.host, hop.jump.port, hop.jump.user) == ("gate.example.org", 2201, "eve")


def test_a_chain_of_two_jumps(tmp_path):
    config = write_config(
        tmp_path,
        "Host gpu-box\n    ProxyJump inner\n"
        "Host inner\n    HostName 10.1.0.1\n    User in\n    ProxyJump outer\n"
        "Host outer\n    HostName gate.example.org\n    User out\n",
    )
    hop = resolve("gpu-box", ssh_config=config)
    assert hop.jump is not None and hop.jump.jump is not None
    assert (hop.jump.host, hop.jump.user) == ("10.1.0.1", "in")
    assert (hop.jump.jump.host, hop.jump.jump.user) == ("gate.example.org", "out")


def test_the_rsync_ssh_of_a_jumped_target_is_strict_on_both_hops(tmp_path):
    """rsync's ssh reaches the box through a ProxyCommand whose own ssh pins the jump host's key
    in the same known_hosts, StrictHostKeyChecking=yes on both hops."""
    from orchestrator.targets.ssh import SshTarget

    known = tmp_path / "known_hosts"
    jump = SshTarget(
        "box (jump)", host="gate.example.org", port=2200, user="bob", known_hosts=known
    )
    box = SshTarget("box", host="10.0.0.7", port=2222, user="alice", known_hosts=known, jump=jump)
    opts = ssh_options(box.endpoint)
    (proxy,) = [o for o in opts if o.startswith("ProxyCommand=")]
    for argv in (opts, proxy.split()):
        assert "StrictHostKeyChecking=yes" in argv
        assert f"UserKnownHostsFile={known}" in argv
    assert "bob@gate.example.org" in proxy and "2200" in proxy


def test_a_proxycommand_is_refused_in_one_line(tmp_path):
    config = write_config(tmp_path, "Host gpu-box\n    ProxyCommand nc -X 5 -x socks:1080 %h %p\n")
    with pytest.raises(ConfigError, match="ProxyCommand, which orch does not run") as info:
        resolve("gpu-box", ssh_config=config)
    assert "ProxyJump" in (info.value.hint or "")


def test_a_missing_ssh_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="ssh_config .*does not exist"):
        resolve("gpu-box", ssh_config=str(tmp_path / "nope"))


def test_without_a_config_file_home_ssh_config_is_read(tmp_path, monkeypatch):
    """No `ssh_config` key: ~/.ssh/config, as OpenSSH (HOME is a temp dir in every test)."""
    home = Path.home()
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh" / "config").write_text("Host gpu-box\n    HostName 10.0.0.9\n    User dora\n")
    hop = resolve("gpu-box")
    assert (hop.host, hop.user) == ("10.0.0.9", "dora")
