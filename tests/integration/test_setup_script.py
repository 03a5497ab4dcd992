"""`scripts/setup.sh` for real (a real venv, real pip, offline): one line per step, pip's output
kept out of the terminal while a step works, and shown (the log's tail) when one fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

# A dependency no index has: with PIP_NO_INDEX the install step must fail.
PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "orch-setup-probe"
version = "0"
dependencies = ["orch-no-such-package-anywhere"]

[project.optional-dependencies]
dev = []
"""


def test_setup_prints_one_line_per_step_and_shows_pip_only_on_failure(tmp_path: Path) -> None:
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    (root / "pyproject.toml").write_text(PYPROJECT)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "ORCH_SETUP_EXTRAS": "dev",  # no torch step
        "PIP_NO_INDEX": "1",  # offline: pip answers from what is installed, or fails
        "TMPDIR": str(tmp_path),
    }
    env.pop("PIP_FIND_LINKS", None)
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=root, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if "please install" in proc.stderr:
        pytest.skip(proc.stderr.strip())  # system tools missing and not root: nothing to test
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, (out, err)
    lines = out.splitlines()
    # one line per step, each starting `setup: `; the steps that worked say so
    assert lines and all(ln.startswith("setup: ") for ln in lines), out
    assert any("venv: creating .venv" in ln and ln.endswith("s)") for ln in lines), out
    assert any(ln.startswith("setup: pip: upgrading pip") and "done (" in ln for ln in lines)
    assert lines[-1].startswith("setup: orch: installing orch[dev]") and lines[-1].endswith(
        "FAILED"
    )
    # pip's chatter from the step that worked went to the log, not the terminal
    assert "Requirement already satisfied" not in out + err
    assert "Looking in" not in out and "Collecting" not in out
    # the failing step shows pip's own words, then one line naming the step and the full log
    assert "---- last lines of what it said" in err
    assert "orch-no-such-package-anywhere" in err or "setuptools>=77" in err, err
    assert "setup: orch: installing orch[dev] and its deps failed (exit" in err
    log = Path(err.rsplit("full log: ", 1)[1].strip())
    assert log.is_file() and log.parent == tmp_path
    assert "Requirement already satisfied" in log.read_text()  # where the hidden output went
    assert not list((root / ".venv").glob(".orch-setup-*"))  # no stamp: nothing half-done
