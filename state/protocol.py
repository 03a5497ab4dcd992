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
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from state import names
from state.errors import VerifyError
from state.models import SCHEMA_VERSION, Event, Manifest, ManifestEntry

M = TypeVar("M", bound=BaseModel)
ReadState = Literal["ok", "missing", "unreadable", "newer_schema"]


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


def read_model(path: str | os.PathLike[str], model: type[M]) -> Read[M]:
    """Read a JSON file into `model`; never raises for missing or partial files."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Read("missing")
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


def verify_manifest(
    run_dir: str | os.PathLike[str],
    manifest: Manifest,
    *,
    include_checkpoints: bool = True,
) -> int:
    """Check every manifest entry against the files in `run_dir`; return the count verified.

    Raises VerifyError naming the first file that is missing or differs. With
    `include_checkpoints=False`, entries under `checkpoints/` are skipped (not pulled).
    """
    root = Path(run_dir)
    checked = 0
    for entry in manifest.files:
        if not include_checkpoints and entry.path.startswith(names.CHECKPOINTS + "/"):
            continue
        p = root / entry.path
        if not p.is_file():
            raise VerifyError(f"{p}: listed in the manifest but missing", hint="pull again")
        size = p.stat().st_size
        if size != entry.size:
            raise VerifyError(
                f"{p}: size {size} != manifest {entry.size}",
                hint="pull again; if it repeats, the file changed on the box",
            )
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise VerifyError(
                f"{p}: sha256 differs from manifest",
                hint="pull again; if it repeats, the file changed on the box",
            )
        checked += 1
    return checked


def read_exit_code(run_dir: str | os.PathLike[str]) -> int | None:
    """The wrapper's `exit_code` file, or None if absent or partial."""
    try:
        text = (Path(run_dir) / names.EXIT_CODE).read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None
