"""Code sync never sends secrets (issue 13, defect 3), over a real sshd + rsync and on the local
target: `.env*`, `*.pem`, ssh keys, `.netrc` and the `[sync] exclude` patterns stay home whatever
git says (tracked or untracked-not-ignored), what was held back is said, and a secret an older
sync left on the box is deleted there."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.codesync import code_files, pattern_matches, sync_code
from orchestrator.config import parse_config
from orchestrator.targets.base import Target
from orchestrator.targets.local import LocalTarget
from state.errors import ConfigError
from tests.integration.test_targets import ssh_target

pytestmark = pytest.mark.integration

SECRETS = {
    ".env",
    ".env.local",
    "deploy/.env.production",
    "deploy/server.pem",
    "id_ed25519",
    "id_ed25519.pub",
    "keys/id_rsa",
    ".netrc",
    ".env-dev/bin/activate",  # a virtualenv named .env-dev: everything under it
}
LISTED = {"secrets/token.txt", "conf/local.toml", "model.key"}
CODE = {"train.py", "id_map.py", "conf/base.toml", "notes/secrets.md", "pkg/env.py"}
EXCLUDE = ["secrets/", "/conf/local.toml", "*.key"]


@pytest.fixture(params=["local", "ssh"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "local":
        t: Target = LocalTarget("local", workdir=tmp_path / "wd")
    else:
        t = ssh_target(request.getfixturevalue("sshd_server"), tmp_path)
    try:
        yield t
    finally:
        t.close()


def _project(root: Path) -> Path:
    """A git project where every secret is tracked or untracked-but-not-ignored: git would
    send all of them."""
    for rel in SECRETS | LISTED | CODE:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{rel}: HF_TOKEN=hf_secret_value\n")
    git = ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-f", ".env", "deploy/server.pem", "train.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return root


def _tree(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() or p.is_symlink()}


def test_secrets_and_listed_files_never_reach_the_box(
    target: Target, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Injected: secrets by name, tracked and untracked, plus researcher-listed files.
    Must hold: only code reaches `code/`; the sync says what it held back."""
    root = _project(tmp_path / "proj")
    code = Path(target.workdir) / "code"
    code.mkdir(parents=True)
    (code / ".env").write_text("left by an older orch\n")
    with caplog.at_level(logging.WARNING, logger="orch.codesync"):
        stats = sync_code(target, root, exclude=EXCLUDE)
    assert _tree(code) == CODE
    assert set(stats.extra["skipped"]) == SECRETS | LISTED
    line = caplog.text
    assert "not sent to the box" in line and ".env (secret by name" in line
    assert "hf_secret_value" not in line
    # Without [sync] exclude only the built-in names stay home.
    assert set(code_files(root)) == CODE | LISTED


@pytest.mark.parametrize(
    ("pattern", "rel", "hit"),
    [
        ("secrets/", "secrets/a/b.txt", True),
        ("secrets/", "src/secrets", False),  # a file is not a directory
        ("secrets", "src/secrets", True),
        ("/conf/local.toml", "conf/local.toml", True),
        ("/conf/local.toml", "x/conf/local.toml", False),
        ("*.key", "a/b/c.key", True),
        ("data/**", "data/raw/x.csv", True),
        ("data/*", "data/raw/x.csv", True),  # the dir data/raw is taken, and all under it
        ("[!a]x.py", "bx.py", True),
        ("[!a]x.py", "ax.py", False),
    ],
)
def test_exclude_pattern_meaning(pattern: str, rel: str, hit: bool) -> None:
    assert pattern_matches(pattern, rel) is hit


def test_sync_exclude_is_validated_in_orch_toml() -> None:
    assert parse_config({"sync": {"exclude": ["secrets/"]}}).sync.exclude == ["secrets/"]
    with pytest.raises(ConfigError, match=r"sync\.exclud.*did you mean 'exclude'"):
        parse_config({"sync": {"exclud": ["x"]}}, "orch.toml")
    with pytest.raises(ConfigError, match="not a usable pattern"):
        parse_config({"sync": {"exclude": ["/"]}}, "orch.toml")
