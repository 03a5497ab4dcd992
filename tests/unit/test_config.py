"""orch.toml parsing: embedded default, typed targets, one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import LocalTarget, SshTarget, load_config
from state.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "orch.toml"
    p.write_text(text)
    return p


def test_embedded_default(tmp_path: Path) -> None:
    cfg = load_config(cwd=tmp_path)
    assert cfg.source is None
    assert cfg.default_target == "local"
    assert isinstance(cfg.targets["local"], LocalTarget)
    assert cfg.experiment.profile == "tiny"


def test_ssh_target_shape(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
default_target = "box"
[targets.box]
kind = "ssh"
host = "127.0.0.1"
port = 2222
user = "root"
identity_file = "~/key"
workdir = "/root/orch-work"
""",
    )
    cfg = load_config(p)
    name, t = cfg.target(None)
    assert name == "box" and isinstance(t, SshTarget)
    assert t.port == 2222 and not t.identity_file.startswith("~")  # type: ignore[union-attr]
    assert "local" in cfg.targets  # always available


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "[targets.box]\nkind = 'ssh'\nhost = 'h'\nprot = 22\n",
            r"targets\.box\.ssh\.prot: unknown key",
        ),
        ("[targets.box]\nkind = 'ssh'\n", r"host: Field required"),
        ("[targets.box]\nkind = 'kubernetes'\n", r"targets\.box"),
        ("[targets.box]\nkind = 'ssh'\nhost = 'h'\nport = 99999\n", r"port"),
        ("default_target = 'nope'\n", r"default_target 'nope' is not one of the targets"),
        ("[targets.'bad name']\nkind = 'local'\n", r"invalid target name"),
        ("[experimnt]\nprofile = 'tiny'\n", r"experimnt: unknown key"),
        ("this is = = not toml", r"not valid TOML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, expect: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expect) as info:
        load_config(p)
    assert str(p) in str(info.value)


def test_missing_explicit_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_env_var_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "[experiment]\nprofile = 'ministral-3b'\n")
    monkeypatch.setenv("ORCH_CONFIG", str(p))
    assert load_config(cwd=tmp_path / "elsewhere").experiment.profile == "ministral-3b"


def test_unknown_target_error(tmp_path: Path) -> None:
    cfg = load_config(cwd=tmp_path)
    with pytest.raises(ConfigError, match="unknown target 'gpu'.*known targets: local"):
        cfg.target("gpu")


def test_local_target_needs_no_fields(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[targets.local]\n"))
    assert isinstance(cfg.targets["local"], LocalTarget)
    with pytest.raises(ConfigError, match=r"targets\.box: missing `kind`"):
        load_config(write(tmp_path, "[targets.box]\nhost = 'h'\n"))


def test_every_toml_example_in_the_docs_loads() -> None:
    """A researcher copies these blocks into orch.toml: each must load as written."""
    import re

    import tomllib

    from orchestrator.config import parse_config
    from tests.conftest import REPO

    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = [
        (f.name, m.group(1))
        for f in files
        for m in re.finditer(r"```toml\n(.*?)```", f.read_text(), re.S)
    ]
    assert len(blocks) >= 5, blocks
    for name, text in blocks:
        parse_config(tomllib.loads(text), name)


@pytest.mark.parametrize(
    ("text", "guess"),
    [
        ("[targets.box]\nkind = 'ssh'\nhost = 'h'\nidentiy_file = '~/k'\n", "identity_file"),
        ("[targets.box]\nkind = 'vast'\n[targets.box.offer]\ngpu_name = ['A100']\n", "gpu_names"),
        (
            "[targets.box]\nkind = 'ssh'\nhost = 'h'\n[targets.box.monitor]\nintervl_s = 2\n",
            "interval_s",
        ),
        ("[experimnt]\nprofile = 'tiny'\n", "experiment"),
        ("defualt_target = 'local'\n", "default_target"),
    ],
)
def test_an_unknown_key_says_which_key_was_meant(tmp_path: Path, text: str, guess: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    msg = str(info.value)
    assert f"did you mean {guess!r}?" in msg and "\n" not in msg and str(tmp_path) in msg


def test_no_guess_when_nothing_is_close(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "zzqx = 1\n"))
    assert "did you mean" not in str(info.value) and "check the spelling" in str(info.value)


def test_an_unknown_target_says_which_target_was_meant(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[targets.gpubox]\nkind = 'ssh'\nhost = 'h'\n"))
    with pytest.raises(ConfigError, match=r"unknown target 'gpubx' \(did you mean 'gpubox'\?"):
        cfg.target("gpubx")
    with pytest.raises(ConfigError) as info:
        cfg.target("zz")
    assert "did you mean" not in str(info.value)


def test_one_suggestion_helper() -> None:
    from state.suggest import closest, did_you_mean

    assert closest("Stage1", ["stage1", "stage2"]) == "stage1"  # case does not matter
    assert closest("tsks.0.limit", ["tasks", "seed"]) == "tasks.0.limit"  # a dotted key's head
    assert closest("stage1", ["stage1"]) is None  # nothing to correct
    assert closest("qqq", ["stage1"]) is None
    assert did_you_mean("lrr", ["lr", "seed"], "allowed: lr, seed") == (
        "did you mean 'lr'? allowed: lr, seed"
    )
    assert did_you_mean("qqq", ["lr"], "allowed: lr") == "allowed: lr"
