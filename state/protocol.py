"""The run-directory protocol: atomic writers and readers that never mistake a partial file.

Writers: temp file in the same directory, fsync, `os.replace`, fsync the directory, so a reader
sees either the old or the new file, never half of one. Readers return a `Read` whose `state`
is "ok", "missing", "unreadable" (garbage, empty, truncated) or "newer_schema": unknown is
never reported as a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from state import names
from state.errors import VerifyError
from state.models import SCHEMA_VERSION, Event, Manifest, ManifestEntry

M = TypeVar("M", bound=BaseModel)
ReadState = Literal["ok", "missing", "unreadable", "newer_schema"]

#: The largest `status.json` (or `.run_failed`) a reader accepts. The worker writes a few KB;
#: anything bigger is refused as "unreadable" without being read whole, so a runaway or hostile
#: file cannot fill the agent's memory, its answer line or the controller's store.
MAX_STATUS_BYTES = 256 * 1024
#: The largest `pid` / `exit_code` file read (they hold one integer).
MAX_SMALL_BYTES = 64


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (temp + fsync + replace + fsync dir)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o644) -> None:
    """Write a pydantic model or a JSON-able object atomically."""
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(indent=2)
    else:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    atomic_write_text(path, text + "\n", mode)


@dataclass(frozen=True)
class Read(Generic[M]):
    """Result of a tolerant read: `value` is set only when `state == "ok"`."""

    state: ReadState
    value: M | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def parse_model(text: str | bytes, model: type[M]) -> Read[M]:
    """Parse JSON text into `model`, tolerating garbage (state "unreadable")."""
    if not text or not str(text).strip():
        return Read("unreadable", detail="empty file")
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return Read("unreadable", detail=f"not JSON: {exc}")
    if not isinstance(raw, dict):
        return Read("unreadable", detail="not a JSON object")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return Read("newer_schema", detail=f"schema_version {version} > {SCHEMA_VERSION}")
    try:
        return Read("ok", model.model_validate(raw))
    except ValidationError as exc:
        return Read("unreadable", detail=f"invalid: {exc.error_count()} field error(s)")


class TooBig(Exception):
    """A file over the reader's cap (the message says how big)."""


def read_bounded(path: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """A regular file's bytes, at most `max_bytes` (TooBig past it, before reading it whole).
    A FIFO, device or directory is refused (OSError) instead of blocking or streaming forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        if max_bytes is None:
            return f.read()
        if st.st_size > max_bytes:
            raise TooBig(f"{st.st_size} bytes, over the cap of {max_bytes}")
        data = f.read(max_bytes + 1)  # it may have grown since the stat
        if len(data) > max_bytes:
            raise TooBig(f"over {max_bytes} bytes, the cap")
        return data


def read_model(
    path: str | os.PathLike[str], model: type[M], *, max_bytes: int | None = None
) -> Read[M]:
    """Read a JSON file into `model`; never raises for missing or partial files. A file over
    `max_bytes` is "unreadable" and is never read whole."""
    try:
        data = read_bounded(path, max_bytes)
    except FileNotFoundError:
        return Read("missing")
    except TooBig as exc:
        return Read("unreadable", detail=str(exc))
    except OSError as exc:
        return Read("unreadable", detail=str(exc))
    return parse_model(data, model)


def append_event(run_dir: str | os.PathLike[str], event: Event) -> None:
    """Append one event line to `events.jsonl` (one write call, then fsync)."""
    line = (event.model_dump_json() + "\n").encode("utf-8")
    path = Path(run_dir) / names.EVENTS
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    """Events from JSONL lines; a torn last line or a garbage line is skipped, not fatal."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        r = parse_model(line, Event)
        if r.value is not None:
            yield r.value


def read_events(run_dir: str | os.PathLike[str]) -> list[Event]:
    path = Path(run_dir) / names.EVENTS
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return list(parse_events(f))
    except FileNotFoundError:
        return []


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


# Files that describe the run rather than being its artifacts: they keep changing (or are the
# markers themselves), so the manifest does not list them.
_NOT_IN_MANIFEST = {
    names.MANIFEST,
    names.RUN_COMPLETE,
    names.RUN_FAILED,
    names.STATUS,
    names.EXIT_CODE,
    names.STDOUT,
    names.EVENTS,
    names.PID,
}


def build_manifest(run_dir: str | os.PathLike[str], run_id: str) -> Manifest:
    """Hash every file under the run dir except the live protocol files and temp files."""
    root = Path(run_dir)
    entries: list[ManifestEntry] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        rel = p.relative_to(root).as_posix()
        if rel in _NOT_IN_MANIFEST or p.name.endswith(".tmp") or "/.rsync-partial" in f"/{rel}":
            continue
        entries.append(ManifestEntry(path=rel, size=p.stat().st_size, sha256=sha256_file(p)))
    return Manifest(run_id=run_id, files=entries)


def manifest_path_problem(path: str) -> str | None:
    """Why a manifest entry's path cannot name a file inside the run dir, or None. It must be
    relative, POSIX, normalised (no `.`, `..` or empty parts) and free of NUL/backslashes."""
    if not isinstance(path, str) or not path:
        return "empty path"
    if "\0" in path or "\\" in path:
        return "NUL or backslash in the path"
    if path.startswith("/"):
        return "absolute path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "not a normalised relative path (empty, '.' or '..' parts)"
    return None


def _open_inside(root: Path, rel: str) -> int:
    """An fd for the regular file `rel` under `root`, following no symlink on the way (each
    parent is opened with O_NOFOLLOW relative to the last one). OSError otherwise: ELOOP /
    ENOTDIR for a symlink, ENOENT for a missing file."""
    parts = rel.split("/")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    dir_flags = flags | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(root, dir_flags)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, dir_flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise OSError(f"{rel}: not a regular file")
    return out


def _not_copied_part(path: str, not_copied: Collection[str]) -> str | None:
    """The first part of `path` (itself or a parent dir) that is in `not_copied`, or None."""
    if not not_copied:
        return None
    parts = path.split("/")
    for k in range(1, len(parts) + 1):
        prefix = "/".join(parts[:k])
        if prefix in not_copied:
            return prefix
    return None


def verify_manifest(
    run_dir: str | os.PathLike[str],
    manifest: Manifest,
    *,
    include_checkpoints: bool = True,
    source: str | None = None,
    not_copied: Collection[str] = (),
) -> int:
    """Check every manifest entry against the files in `run_dir`; return the count verified.

    Raises VerifyError naming the first entry that is unsafe, missing or differs: with the file
    on the box (`source`: where the run dir was pulled from) and the copy here. Entry paths must
    stay inside `run_dir` (see `manifest_path_problem`), and no symlink is followed on the way
    to a file: a manifest cannot make this machine read, stat or hash anything outside the run.
    With `include_checkpoints=False`, entries under `checkpoints/` are skipped (not pulled).
    `not_copied` (paths relative to the run dir) are what the pull left on the box as symlinks
    or special files: an entry at or under one is refused as such, not as "missing here".
    """
    root = Path(run_dir)
    where = (source or str(root)).rstrip("/")
    checked = 0
    for entry in manifest.files:
        box_file = f"{where}/{entry.path}"
        problem = manifest_path_problem(entry.path)
        if problem:
            raise VerifyError(
                f"{where}/{names.MANIFEST}: entry {entry.path!r} is refused ({problem})",
                hint="manifest paths name files inside the run dir; this run's files were not "
                "written by orch's worker, do not trust them",
            )
        if not include_checkpoints and entry.path.startswith(names.CHECKPOINTS + "/"):
            continue
        local = root / entry.path
        link = _not_copied_part(entry.path, not_copied)
        if link is not None:
            raise VerifyError(
                f"{where}/{link}: a symlink or special file on the box, not copied (the manifest "
                f"lists {entry.path!r})",
                hint="orch never copies or follows links in a run; look at that file on the box: "
                "orch's worker writes none",
            )
        try:
            fd = _open_inside(root, entry.path)
        except FileNotFoundError:
            raise VerifyError(
                f"{entry.path}: listed in the manifest but missing here ({local}; on the box: "
                f"{box_file})",
                hint="pull again",
            ) from None
        except OSError as exc:
            raise VerifyError(
                f"{entry.path}: not a regular file inside the run (a symlink or special file; "
                f"on the box: {box_file}): {exc.strerror or exc}",
                hint="orch never follows links out of a run; look at that file on the box",
            ) from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                raise VerifyError(
                    f"{entry.path}: size {size} != manifest {entry.size} (on the box: {box_file}; "
                    f"here: {local})",
                    hint="pull again; if it repeats, the file changed on the box",
                )
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != entry.sha256:
            raise VerifyError(
                f"{entry.path}: sha256 differs from the manifest (on the box: {box_file}; "
                f"here: {local})",
                hint="pull again; if it repeats, the file changed on the box",
            )
        checked += 1
    return checked


def read_exit_code(run_dir: str | os.PathLike[str]) -> int | None:
    """The wrapper's `exit_code` file, or None if absent, partial or not a small number."""
    return read_small_int(Path(run_dir) / names.EXIT_CODE)


def read_small_int(path: str | os.PathLike[str]) -> int | None:
    """The integer in a small file (`pid`, `exit_code`), or None (missing, garbage, too big)."""
    try:
        return int(read_bounded(path, MAX_SMALL_BYTES).decode("ascii").strip())
    except (OSError, TooBig, ValueError):
        return None
