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
