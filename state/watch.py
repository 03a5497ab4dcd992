"""The watching half of the poll agent: after a `watch` request the agent pushes a line itself
whenever something that decides a run's phase changed, instead of waiting to be asked.

What is watched, per run (cheap, local, read-only):

- the worker's pid: a `pidfd` (`os.pidfd_open`, Linux >= 5.3) that the agent's select loop
  waits on, so a death is seen the instant it happens; without pidfds a `kill(pid, 0)` on every
  tick (`pid_alive`);
- the run files that decide a phase (`exit_code`, `.run_complete`, `.run_failed`,
  `manifest.json`, `pid`) and `status.json` (its `seq` moves with every atomic rewrite): the
  run dir's own mtime is looked at every tick (every atomic write renames into it), the files
  themselves when it moved and at least once a second;
- the tmux session: `tmux list-sessions` every `session_check_s` (a killed session takes its
  worker with it, which the pidfd sees at once anyway).

A change is pushed as one line holding a `TargetObservation` (the shape of a poll answer) with
the runs that changed: at most one line per run every `min_gap_s` while busy; changes that
only move progress (`status.json`) at most every `progress_s`, every such run in one line; a worker's death waits up to
`settle_s` for the wrapper's `exit_code` so the one line says how it ended. When nothing was
pushed for `heartbeat_s` a small heartbeat line says the box is alive and nothing changed.

    {"push": 7, "chan": "9f2c...", "obs": {...TargetObservation...}}
    {"push": 8, "chan": "9f2c...", "beat": true}

With `delta: true` in the request (today's controller asks for it) a change line carries only
what changed since the last line of the same run (`{"delta": {"host_time": ..., "runs":
[{"run_dir": ..., "~status": {"seq": 8, "step": 8, "loss": 0.25, ...}}]}}`, `run_patch`): a
training run's step and loss, not its whole observation with the last events again. Every field of a run is always present in the full
form, so a patch never has to say a field went away; the controller applies it over its copy
and asks for a full observation (a new `watch`) whenever a line went missing.

`follow: [{"run_dir": ..., "lines": 50}]` also streams that run's stdout.log (`orch logs -f`):
from `lines` lines before its end (or from `offset`), every complete line as it is written,
at most every `min_gap_s`, in lines of at most `LOG_CHUNK` bytes:

    {"push": 9, "chan": "9f2c...", "log": {"run_dir": ..., "offset": 1234, "next": 1290,
                                           "text": "..."}}

Once the run's `exit_code` exists (or, for a run also in `runs`, its worker died and its
session is gone) the rest (a last line without a newline too) follows, and a last `log` line
with `"eof": true` says the output is complete.

`push` numbers the lines of one subscription from 1 (a new `watch` request keeps counting,
a new agent starts again with a new `chan`), so the controller drops duplicates and notices
gaps; the store still decides what is new.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from state import names
from state.models import RunObservation, TargetObservation
from state.observe import (
    ObserveRequest,
    RunQuery,
    gpu_stats,
    observe,
    observe_run,
    pid_alive,
    tmux_sessions,
)
from state.protocol import read_small_int

#: The files whose change can decide a phase (status.json is progress, handled on its own).
DECISIVE = (names.EXIT_CODE, names.RUN_COMPLETE, names.RUN_FAILED, names.MANIFEST, names.PID)
#: The most log text one pushed line carries (more follows on the next lines).
LOG_CHUNK = 256 * 1024
#: How far back from the end a follow's first `lines` lines are looked for.
LOG_BACK = 1 << 20

Stamp = tuple[int, int, int] | None


class FollowQuery(BaseModel):
    """One run's stdout.log to stream: from `offset` bytes, else from `lines` before its end."""

    model_config = ConfigDict(extra="ignore")
    run_dir: str
    lines: int = Field(50, ge=0)
    offset: int | None = Field(None, ge=0)


class WatchRequest(ObserveRequest):
    """`{"op": "watch", "runs": [...], ...}`: observe now (the answer) and push changes."""

    delta: bool = False
    follow: list[FollowQuery] = Field(default_factory=list)

    heartbeat_s: float = Field(2.0, gt=0)
    min_gap_s: float = Field(0.1, ge=0)
    progress_s: float = Field(1.0, ge=0)
    tick_s: float = Field(0.1, gt=0)
    settle_s: float = Field(0.25, ge=0)
    session_check_s: float = Field(5.0, gt=0)


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def pidfd_supported() -> bool:
    return hasattr(os, "pidfd_open")


@dataclass
class _Run:
    q: RunQuery
    path: Path
    dir_stamp: Stamp = None
    files: tuple[Stamp, ...] = ()
    status: Stamp = None
    pid: int | None = None
    pidfd: int | None = None
    dead: bool = False  # the watched pid is gone
    session_alive: bool | None = None
    last_push: float = -1e9
    urgent_at: float | None = None  # push a decisive change at (monotonic)
    progress_due: bool = False
    settling_until: float | None = None  # a death waiting for the wrapper's exit_code
    sent: dict[str, object] | None = None  # the last observation the controller has of it


@dataclass
class _Follow:
    path: Path  # the run's stdout.log
    exit_code: Path
    offset: int
    last_push: float = -1e9
    done: bool = False


@dataclass
class BoxWatcher:
    """The agent's watch state: which runs, what they looked like, what is due to be pushed."""

    workdir: Path
    req: WatchRequest
    chan: str = field(default_factory=lambda: secrets.token_hex(6))
    seq: int = 0
    runs: dict[str, _Run] = field(default_factory=dict)
    last_line: float = field(default_factory=time.monotonic)
    last_full_check: float = -1e9
    last_progress: float = field(default_factory=time.monotonic)  # one progress clock per box
    last_session_check: float = field(default_factory=time.monotonic)
    sessions: set[str] | None = None
    lines_pushed: int = 0
    box_sent: dict[str, object] = field(default_factory=dict)  # disk and GPUs last sent
    follows: dict[str, _Follow] = field(default_factory=dict)

    # -- subscription -----------------------------------------------------------------------
    def subscribe(self, req: WatchRequest) -> str:
        """(Re)set the watched runs and answer with a full observation of them (a poll answer),
        plus `watching`, `chan` and `push` (the last line number pushed so far)."""
        self.req = req
        wanted = {q.run_dir: q for q in req.runs if not q.job_id}
        for run_dir in list(self.runs):
            if run_dir not in wanted:
                self._forget(self.runs.pop(run_dir))
        now = time.monotonic()
        for run_dir, q in wanted.items():
            r = self.runs.get(run_dir)
            if r is None:
                r = self.runs[run_dir] = _Run(q=q, path=self.workdir / run_dir)
            r.q = q
            self._stamp_all(r)  # stamps BEFORE the observation: a change after them is pushed
            self._track_pid(r)
            r.urgent_at = None
            r.progress_due = False
            r.last_push = now
        self.sessions = self._sessions()
        self.last_session_check = now
        obs = observe(self.workdir, req)  # every run asked for (a Slurm job too), as a poll
        for r in self.runs.values():
            self._note_session(r)
        self.last_line = now
        answer = json.loads(obs.model_dump_json())
        for d in answer["runs"]:
            if d["run_dir"] in self.runs:
                self.runs[d["run_dir"]].sent = d
        self.box_sent = {k: answer[k] for k in ("disk_free_bytes", "gpus")}
        self.follows = {f.run_dir: self._follow(f) for f in req.follow if _safe_rel(f.run_dir)}
        answer.update({"watching": len(self.runs), "chan": self.chan, "push": self.seq})
        return json.dumps(answer)

    def close(self) -> None:
        for r in self.runs.values():
            self._forget(r)
        self.runs.clear()

    def _forget(self, r: _Run) -> None:
        if r.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(r.pidfd)
            r.pidfd = None

    # -- what the select loop waits on -------------------------------------------------------
    def fds(self) -> dict[int, str]:
        return {r.pidfd: d for d, r in self.runs.items() if r.pidfd is not None}

    def pid_exited(self, fd: int) -> None:
        """A pidfd became readable: that worker is gone. Push soon (after a short settle for
        the wrapper's `exit_code`)."""
        for r in self.runs.values():
            if r.pidfd == fd:
                self._forget(r)
                self._died(r, time.monotonic())
                return

    def wait_s(self, now: float) -> float:
        """How long the select loop may sleep before `tick` has something to do."""
        tick = self.req.tick_s
        if any(r.settling_until is not None for r in self.runs.values()):
            tick = min(tick, 0.01)
        due = [r.urgent_at for r in self.runs.values() if r.urgent_at is not None]
        if any(not f.done for f in self.follows.values()):
            tick = min(tick, max(self.req.min_gap_s, 0.01))
        wake = min([now + tick, self.last_line + self.req.heartbeat_s, *due])
        return max(0.0, wake - now)

    # -- the tick ----------------------------------------------------------------------------
    def tick(self, now: float) -> list[str]:
        """Look at every run (cheaply) and return the lines to push now (zero or one change
        line, or a heartbeat)."""
        full = now - self.last_full_check >= 1.0
        if full:
            self.last_full_check = now
        if self.runs and now - self.last_session_check >= self.req.session_check_s:
            self.last_session_check = now
            self.sessions = self._sessions()
            for r in self.runs.values():
                if self._note_session(r):
                    self._urgent(r, now)
        for r in self.runs.values():
            self._look(r, now, full)
        out: list[str] = [self._line({"log": chunk}, now) for chunk in self._log_chunks(now)]
        due = [r for r in self.runs.values() if self._due(r, now)]
        if due:
            urgent = any(r.urgent_at is not None for r in due)
            # Progress waiting elsewhere rides along: one line, not one per run.
            due += [r for r in self.runs.values() if r.progress_due and r not in due]
            obs = self._observe(due, fresh_sessions=urgent)
            if any(r.progress_due for r in due):
                self.last_progress = now
            for r in due:
                self._note_session(r)
                r.last_push = now
                r.urgent_at = None
                r.progress_due = False
                r.settling_until = None
            full_obs = json.loads(obs.model_dump_json())
            if self.req.delta:
                out.append(self._line({"delta": self._delta(full_obs, due)}, now))
            else:
                out.append(self._line({"obs": full_obs}, now))
        elif not out and now - self.last_line >= self.req.heartbeat_s:
            out.append(self._line({"beat": True}, now))
        return out

    def _delta(self, obs: dict[str, Any], runs: list[_Run]) -> dict[str, Any]:
        """`obs` less what the controller already has: per run only the fields that changed
        since the last line of that run; the box's disk and GPUs only when they changed."""
        out: dict[str, Any] = {"host_time": obs["host_time"]}
        for k in ("disk_free_bytes", "gpus"):
            if self.box_sent.get(k) != obs[k]:
                out[k] = self.box_sent[k] = obs[k]
        out["runs"] = []
        for r, d in zip(runs, obs["runs"], strict=True):
            out["runs"].append(run_patch(r.sent or {}, d))
            r.sent = d
        return out

    # -- log follow --------------------------------------------------------------------------
    def _follow(self, f: FollowQuery) -> _Follow:
        rd = self.workdir / f.run_dir
        log = rd / names.STDOUT
        offset = f.offset
        if offset is None:
            offset = _tail_offset(log, f.lines)
        return _Follow(path=log, exit_code=rd / names.EXIT_CODE, offset=offset)

    def _log_chunks(self, now: float) -> list[dict[str, object]]:
        """New output of every followed log: whole lines while the run runs, everything once
        its exit_code exists, then one `eof`."""
        out: list[dict[str, object]] = []
        for run_dir, f in self.follows.items():
            if f.done or now < f.last_push + self.req.min_gap_s:
                continue
            # Looked at before the log, so nothing is written after. A watched run whose worker
            # died without the wrapper's exit_code (its whole box or session killed) ends too.
            r = self.runs.get(run_dir)
            ended = f.exit_code.exists() or (
                r is not None and r.dead and r.settling_until is None and not r.session_alive
            )
            try:
                size = os.stat(f.path).st_size
            except OSError:
                size = None
            if size is not None and size < f.offset:
                f.offset = 0  # truncated or replaced: start again from its beginning
            while size is not None and size > f.offset:
                text, used = _read_chunk(f.path, f.offset, whole_lines=not ended)
                if not used:
                    break
                nxt = f.offset + used
                out.append({"run_dir": run_dir, "offset": f.offset, "next": nxt, "text": text})
                f.offset = nxt
                f.last_push = now
                if not ended:
                    break  # one chunk per tick while it runs; the rest on the next
            if ended and (size is None or f.offset >= size):
                eof = {"run_dir": run_dir, "offset": f.offset, "next": f.offset, "text": ""}
                out.append({**eof, "eof": True})
                f.done = True
        return out

    def _line(self, body: dict[str, object], now: float) -> str:
        self.seq += 1
        self.last_line = now
        self.lines_pushed += 1
        return json.dumps({"push": self.seq, "chan": self.chan, **body})

    def _due(self, r: _Run, now: float) -> bool:
        if r.urgent_at is not None and now >= r.urgent_at:
            return True
        return (
            r.urgent_at is None
            and r.progress_due
            and now >= self.last_progress + self.req.progress_s
            and now >= r.last_push + self.req.min_gap_s
        )

    def _urgent(self, r: _Run, now: float, delay: float = 0.0) -> None:
        at = max(now + delay, r.last_push + self.req.min_gap_s)
        r.urgent_at = at if r.urgent_at is None else min(r.urgent_at, at)

    def _died(self, r: _Run, now: float) -> None:
        r.dead = True
        r.settling_until = now + self.req.settle_s
        self._urgent(r, now, self.req.settle_s)

    def _look(self, r: _Run, now: float, full: bool) -> None:
        settling = r.settling_until is not None
        ds = _stamp(r.path)
        if ds == r.dir_stamp and not full and not settling:
            if r.pidfd is None and r.pid is not None and not r.dead and not pid_alive(r.pid):
                self._died(r, now)
            return
        r.dir_stamp = ds
        files = tuple(_stamp(r.path / n) for n in DECISIVE)
        if files != r.files:
            r.files = files
            self._track_pid(r)
            self._urgent(r, now)  # e.g. exit_code written: ends a settle at once
        st = _stamp(r.path / names.STATUS)
        if st != r.status:
            r.status = st
            r.progress_due = True
        if r.pidfd is None and r.pid is not None and not r.dead and not pid_alive(r.pid):
            self._died(r, now)

    def _stamp_all(self, r: _Run) -> None:
        r.dir_stamp = _stamp(r.path)
        r.files = tuple(_stamp(r.path / n) for n in DECISIVE)
        r.status = _stamp(r.path / names.STATUS)

    def _track_pid(self, r: _Run) -> None:
        pid = read_small_int(r.path / names.PID)
        if pid is None or not 0 < pid < 2**31 or pid == r.pid:
            return
        self._forget(r)
        r.pid, r.dead = pid, False
        if pidfd_supported():
            try:
                r.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                r.dead = True
            except OSError:
                r.pidfd = None  # not ours to open (EPERM) or no kernel support: kill(pid, 0)
        elif not pid_alive(pid):
            r.dead = True

    def _sessions(self) -> set[str] | None:
        if any(r.q.session for r in self.runs.values()):
            return tmux_sessions()
        return None

    def _note_session(self, r: _Run) -> bool:
        """Record the run's session liveness from `self.sessions`; True when it changed."""
        alive = None if self.sessions is None or not r.q.session else r.q.session in self.sessions
        changed = alive != r.session_alive and r.session_alive is not None
        r.session_alive = alive
        return changed

    def _observe(self, runs: list[_Run], *, fresh_sessions: bool) -> TargetObservation:
        if fresh_sessions:
            self.sessions = self._sessions()
            self.last_session_check = time.monotonic()
        disk = None
        with contextlib.suppress(OSError):
            wd = self.workdir
            disk = shutil.disk_usage(wd if wd.exists() else wd.parent).free
        got: list[RunObservation] = [observe_run(self.workdir, r.q, self.sessions) for r in runs]
        return TargetObservation(
            disk_free_bytes=disk, gpus=gpu_stats() if self.req.gpus else [], runs=got
        )


def run_patch(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What turns observation `base` into `new` (`apply_patch`): `run_dir`, every field that
    changed, and for an object that was an object before (`status`: a step moved, the loss, the
    clock, nothing else) `"~field": {the keys that changed}` and `"~field-": [keys gone]`."""
    patch: dict[str, Any] = {"run_dir": new["run_dir"]}
    for k, v in new.items():
        old = base.get(k, _ABSENT)
        if old == v:
            continue
        if isinstance(v, dict) and isinstance(old, dict):
            patch["~" + k] = {sk: sv for sk, sv in v.items() if old.get(sk, _ABSENT) != sv}
            gone = [sk for sk in old if sk not in v]
            if gone:
                patch["~" + k + "-"] = gone
        else:
            patch[k] = v
    return patch


def apply_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`new` again from `base` and `run_patch(base, new)` (a new dict; `base` is untouched)."""
    out = dict(base)
    for k, v in patch.items():
        if k.startswith("~") and k.endswith("-"):
            continue
        if k.startswith("~"):
            field_ = k[1:]
            merged = {**(out.get(field_) or {}), **v}
            for gone in patch.get(k + "-", []):
                merged.pop(gone, None)
            out[field_] = merged
        else:
            out[k] = v
    return out


_ABSENT = object()


def _safe_rel(run_dir: str) -> bool:
    """A followed run dir stays under the workdir (the request is the controller's, but a path
    is checked before it is read all the same)."""
    parts = Path(run_dir).parts
    return bool(parts) and not Path(run_dir).is_absolute() and ".." not in parts


def _tail_offset(path: Path, lines: int) -> int:
    """The byte offset where the last `lines` lines of `path` begin (searching at most
    `LOG_BACK` bytes back); the end of the file for 0 lines, 0 for a missing file."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if lines <= 0:
                return size
            start = max(0, size - LOG_BACK)
            f.seek(start)
            data = f.read(size - start)
    except OSError:
        return 0
    end = len(data) - 1 if data.endswith(b"\n") else len(data)  # a last partial line counts
    cut = end
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return start if start == 0 else start + data.find(b"\n") + 1
    return start + cut + 1


def _read_chunk(path: Path, offset: int, *, whole_lines: bool) -> tuple[str, int]:
    """(text, bytes consumed) from `offset`, at most `LOG_CHUNK` bytes; with `whole_lines`
    only up to the last newline, so a line being written (or a character cut in two) is sent
    whole later. A single line longer than a chunk is sent in pieces all the same."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(LOG_CHUNK)
    except OSError:
        return "", 0
    if whole_lines:
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) < LOG_CHUNK:
                return "", 0
        else:
            data = data[: cut + 1]
    return data.decode("utf-8", "replace"), len(data)
