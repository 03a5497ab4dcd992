"""Sync the project's code to a target: `sync_code(target, project_root) -> SyncStats`.

What goes: in a git repo, exactly what git would keep (`git ls-files --cached --others
--exclude-standard`: tracked plus untracked-but-not-ignored files, so `.gitignore` is honoured and
new files need no `git add`); outside git, every file under the root. Never: `.git/`, `runs/`,
`.orch/`, virtualenvs, caches, and, whatever git says, files that hold secrets by convention
(`.env*`, `*.pem`, ssh keys `id_*`, `.netrc`: see `is_secret`) and whatever `[sync] exclude`
lists; what was left out for those reasons is said (`SyncStats.extra["skipped"]`). The result is
mirrored into `<workdir>/code` with rsync (only the listed files; anything else there, a `.env`
an older orch sent included, is deleted), so a re-sync with nothing changed moves no file data,
only rsync's file list.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from orchestrator.progress import QUIET, Steps, fmt_size
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

log = logging.getLogger("orch.codesync")

#: Secrets by name, never sent at any depth (the rsync fence: `SECRET_EXCLUDES`).
SECRET_NAMES = (".env*", "*.pem", "id_*", ".netrc")
# `id_*` means ssh key names (`id_rsa`, `id_ed25519.pub`, `id_ecdsa_sk`): a name with another
# extension (`id_map.py`) is code and goes.
_SSH_KEY_RE = re.compile(r"^id_[A-Za-z0-9_-]+(\.pub)?$")
SECRET_EXCLUDES = [
    ".env*",
    "*.pem",
    ".netrc",
    *(f"id_{k}*" for k in ("rsa", "dsa", "ecdsa", "ed25519", "xmss")),
]


def is_secret(name: str) -> bool:
    """Is a file or directory name one that holds secrets by convention (`SECRET_NAMES`)?"""
    return (
        name.startswith(".env")
        or name.endswith(".pem")
        or name == ".netrc"
        or bool(_SSH_KEY_RE.match(name))
    )


def _glob_re(pattern: str) -> re.Pattern[str]:
    """A glob as rsync and .gitignore read it: `*` and `?` stay inside one path part, `**`
    crosses parts, `[...]` is a class (`[!...]` negated)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "[" and (j := pattern.find("]", i + 2)) > i:
            body = pattern[i + 1 : j]
            neg = body.startswith("!")
            out.append("[" + ("^" if neg else "") + re.escape(body[1:] if neg else body) + "]")
            i = j + 1
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def pattern_matches(pattern: str, rel: str) -> bool:
    """Does a `[sync] exclude` pattern take the file `rel` (POSIX, relative to the project)?

    Without a `/` (other than a trailing one) it matches a file or directory name at any depth
    (`*.key`, `secrets`); with one it is anchored at the project root (`/conf/local.toml`,
    `data/raw/**`); a trailing `/` matches directories only (`secrets/`)."""
    dir_only = pattern.endswith("/")
    body = pattern.strip("/")
    anchored = pattern.startswith("/") or "/" in body
    rx = _glob_re(body)
    parts = rel.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))] if anchored else parts
    if dir_only:
        candidates = candidates[:-1]  # the file itself is not a directory
    return any(rx.match(c) for c in candidates)


def rsync_pattern(pattern: str) -> str:
    """A `[sync] exclude` pattern as an rsync exclude with the same meaning."""
    body = pattern.strip("/")
    anchored = pattern.startswith("/") or "/" in body
    return ("/" if anchored else "") + body + ("/" if pattern.endswith("/") else "")


def skip_reason(rel: str, exclude: Sequence[str] = ()) -> str | None:
    """Why `rel` must never be sent (a secret's name, or the `[sync] exclude` pattern), or None."""
    for part in rel.split("/"):
        if is_secret(part):
            return f"secret by name ({part})"
    for pat in exclude:
        if pattern_matches(pat, rel):
            return f"[sync] exclude {pat!r}"
    return None


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


def code_files(root: Path, *, exclude: Sequence[str] = ()) -> list[str]:
    """The relative paths `sync_code` sends, sorted."""
    return select_files(root, exclude=exclude)[0]


def select_files(
    root: Path, *, exclude: Sequence[str] = ()
) -> tuple[list[str], list[tuple[str, str]]]:
    """(the relative paths `sync_code` sends, sorted; the files held back as secrets or by
    `[sync] exclude`, with why)."""
    names = git_files(root)
    if names is None:
        names = walk_files(root)
    venvs = {p.parent.relative_to(root).as_posix() + "/" for p in root.glob("*/pyvenv.cfg")}
    keep = []
    held: dict[str, str] = {}
    for rel in names:
        if _excluded(rel) or any(rel.startswith(v) for v in venvs):
            continue
        p = root / rel
        # Tracked-but-deleted files are listed by git; a submodule is a dir: skip both.
        if not (p.is_symlink() or p.is_file()):
            continue
        why = skip_reason(rel, exclude)
        if why is not None:
            held[rel] = why
        else:
            keep.append(rel)
    return sorted(set(keep)), sorted(held.items())


def skipped_line(held: list[tuple[str, str]], shown: int = 8) -> str:
    """`not sent: .env (secret by name (.env)), ...` for the researcher (pure)."""
    parts = [f"{rel} ({why})" for rel, why in held[:shown]]
    more = f" and {len(held) - shown} more" if len(held) > shown else ""
    return f"not sent to the box: {', '.join(parts)}{more}"


def sync_code(
    target: Target,
    project_root: Path,
    *,
    report: Steps | None = None,
    exclude: Sequence[str] = (),
) -> SyncStats:
    """Mirror the project's code into `<target.workdir>/code`; returns rsync's stats.
    `report` says `syncing code (N files)`, what was held back (secrets, `exclude`, the
    `[sync] exclude` patterns) and then what moved."""
    root = Path(project_root).resolve()
    if not root.is_dir():
        raise ConfigError(f"project root {root} is not a directory")
    files, held = select_files(root, exclude=exclude)
    if not files:
        raise ConfigError(f"nothing to sync under {root}", hint="run orch from the project folder")
    if held:
        line = skipped_line(held)
        log.warning("%s", line)
        (report or QUIET).note(line)
    remote = f"{target.workdir.rstrip('/')}/{CODE_DIR}"
    fence = [*EXCLUDES, *SECRET_EXCLUDES, *(rsync_pattern(p) for p in exclude)]
    with (report or QUIET).step(f"syncing code ({len(files)} files) to {target.name}") as step:
        stats = target.sync_up(
            root, remote, excludes=fence, delete=True, filter_files=[Path(f) for f in files]
        )
        step.done(
            f"synced code: {len(files)} files, {stats.files_transferred} changed, "
            f"{fmt_size(stats.bytes_sent)} sent in {stats.seconds:.1f}s"
        )
    stats.extra["files_listed"] = len(files)
    stats.extra["skipped"] = [rel for rel, _ in held]
    return stats
