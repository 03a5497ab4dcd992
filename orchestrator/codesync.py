"""Sync the project's code to a target: `sync_code(target, project_root) -> SyncStats`.

What goes: in a git repo, exactly what git would keep (`git ls-files --cached --others
--exclude-standard`: tracked plus untracked-but-not-ignored files, so `.gitignore` is honoured and
new files need no `git add`); outside git, every file under the root. Never: `.git/`, `runs/`,
`.orch/`, virtualenvs, caches. The result is mirrored into `<workdir>/code` with rsync (only the
listed files; anything else there is deleted), so a re-sync with nothing changed moves no file
data, only rsync's file list.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from orchestrator.targets.base import SyncStats, Target
from state.errors import ConfigError

#: Directory names never synced at any depth, whatever .gitignore says.
NEVER_DIRS = frozenset(
    {
        ".git",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        "__pycache__",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        "node_modules",
        ".rsync-partial",
    }
)
#: Never synced at the top of the project: pulled results and orch's own state.
NEVER_TOP = frozenset({"runs", ".orch"})
#: rsync-level excludes (a second fence behind the file list).
EXCLUDES = (
    [f"{d}/" for d in sorted(NEVER_DIRS)]
    + [f"/{d}/" for d in sorted(NEVER_TOP)]
    + [".venv-*/", "*.pyc"]
)

CODE_DIR = "code"


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    if len(parts) > 1 and parts[0] in NEVER_TOP:
        return True
    if any(p in NEVER_DIRS or p.startswith(".venv-") for p in parts[:-1]):
        return True
    return parts[-1].endswith(".pyc") or parts[-1] in NEVER_DIRS


def _is_venv(d: Path) -> bool:
    return (d / "pyvenv.cfg").is_file()


def git_files(root: Path) -> list[str] | None:
    """Files git would keep under `root` (relative, POSIX), or None when `root` is not in git."""
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "--cached",
                "--others",
                "--exclude-standard",
                "-z",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    names = [n.decode("utf-8", "surrogateescape") for n in out.stdout.split(b"\0") if n]
    return names


def walk_files(root: Path) -> list[str]:
    """Every file under `root` except the never-synced dirs and virtualenvs (no git)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in NEVER_DIRS
            and not d.startswith(".venv-")
            and not (base == root and d in NEVER_TOP)
            and not _is_venv(base / d)
        )
        for f in filenames:
            rel = (base / f).relative_to(root).as_posix()
            if not _excluded(rel):
                found.append(rel)
    return found


def code_files(root: Path) -> list[str]:
    """The relative paths `sync_code` sends, sorted."""
    names = git_files(root)
    if names is None:
        names = walk_files(root)
    venvs = {p.parent.relative_to(root).as_posix() + "/" for p in root.glob("*/pyvenv.cfg")}
    keep = []
    for rel in names:
        if _excluded(rel) or any(rel.startswith(v) for v in venvs):
            continue
        p = root / rel
        # Tracked-but-deleted files are listed by git; a submodule is a dir: skip both.
        if p.is_symlink() or p.is_file():
            keep.append(rel)
    return sorted(set(keep))


def sync_code(target: Target, project_root: Path) -> SyncStats:
    """Mirror the project's code into `<target.workdir>/code`; returns rsync's stats."""
    root = Path(project_root).resolve()
    if not root.is_dir():
        raise ConfigError(f"project root {root} is not a directory")
    files = code_files(root)
    if not files:
        raise ConfigError(f"nothing to sync under {root}", hint="run orch from the project folder")
    remote = f"{target.workdir.rstrip('/')}/{CODE_DIR}"
    stats = target.sync_up(
        root, remote, excludes=EXCLUDES, delete=True, filter_files=[Path(f) for f in files]
    )
    stats.extra["files_listed"] = len(files)
    return stats
