"""The worker's live status: `status.json` on a heartbeat, `events.jsonl` for what happened.

`StatusWriter` owns one `RunStatus`. Every change goes through its lock and bumps `seq`, and
every write is atomic (`state.protocol.atomic_write_json`: temp file, fsync, `os.replace`), so
the controller never reads half a file and judges progress by `seq` alone. A daemon thread
rewrites the file every `heartbeat_s` seconds even while one training step takes minutes:
a live process keeps `seq` moving, a hung one (a deadlock, a stuck collective) does not.

A write that fails (a full disk) is remembered in `last_error` and retried on the next beat;
it never raises into the training loop: a status file is worth less than the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from state import names
from state.models import Event, GpuStat, RunStatus, utcnow
from state.observe import gpu_stats
from state.phases import WorkerPhase
from state.protocol import append_event, atomic_write_json

#: How many recent training losses `status.json` carries.
RECENT_LOSSES = 20
#: Steps over which steps/s and tokens/s are averaged (a sliding window, not since start, so
#: the rate after a slow first step or an eval pause recovers quickly).
RATE_WINDOW = 20


class StatusWriter:
    """Writes `status.json` (heartbeat + on every update) and appends `events.jsonl`.

    Use as a context manager: entering writes the first status and starts the heartbeat,
    leaving stops it and writes a last status.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        run_id: str,
        stage: str,
        *,
        heartbeat_s: float = 5.0,
        total_steps: int | None = None,
        echo: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s = heartbeat_s
        self.echo = echo
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rates: deque[tuple[float, int, int]] = deque(maxlen=RATE_WINDOW + 1)
        self._tokens_total = 0
        self.last_error: str | None = None
        self.status = RunStatus(
            run_id=run_id,
            stage=stage,
            pid=os.getpid(),
            started_at=utcnow(),
            total_steps=total_steps,
        )

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> StatusWriter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.write()
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="status-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.write()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.write()

    # -- writing --------------------------------------------------------------------------
    def write(self) -> bool:
        """Bump `seq`, refresh the machine stats and write `status.json` atomically."""
        with self._lock:
            st = self.status
            st.seq += 1
            st.updated_at = utcnow()
            with contextlib.suppress(OSError):
                st.disk_free_bytes = shutil.disk_usage(self.run_dir).free
            st.gpus = _gpus()
            try:
                atomic_write_json(self.run_dir / names.STATUS, st)
            except OSError as exc:  # disk full, dir gone: keep running, retry next beat
                self.last_error = f"{type(exc).__name__}: {exc}"
                return False
            self.last_error = None
            return True

    def update(self, **fields: Any) -> None:
        """Set `RunStatus` fields (validated names) and write at once."""
        with self._lock:
            for key, value in fields.items():
                if key not in RunStatus.model_fields:
                    raise AttributeError(f"RunStatus has no field {key!r}")
                setattr(self.status, key, value)
            self.write()

    def set_extra(self, **data: Any) -> None:
        """Merge free-form fields into `status.extra` (written on the next beat/update)."""
        with self._lock:
            self.status.extra.update(data)

    def event(self, kind: str, message: str = "", *, step: int | None = None, **data: Any) -> None:
        """Append one event line (and echo it to stdout, which the wrapper keeps in stdout.log)."""
        ev = Event(kind=kind, message=message, step=step, data=data)  # type: ignore[arg-type]
        try:
            append_event(self.run_dir, ev)
        except OSError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
        if self.echo:
            where = f" step={step}" if step is not None else ""
            print(f"[worker] {kind}{where}: {message}", file=sys.stdout, flush=True)

    def set_phase(self, phase: WorkerPhase, message: str = "") -> None:
        with self._lock:
            self.status.phase = phase
            self.status.message = message
            self.write()
        self.event("phase", f"{phase.value}{': ' + message if message else ''}", phase=phase.value)

    # -- progress -------------------------------------------------------------------------
    def step(
        self,
        step: int,
        *,
        loss: float | None = None,
        lr: float | None = None,
        tokens: int = 0,
        total_steps: int | None = None,
        epoch: float | None = None,
        now: float | None = None,
        **extra: Any,
    ) -> None:
        """Record that optimizer step `step` is done: losses, rates, ETA; then write."""
        now = time.monotonic() if now is None else now
        with self._lock:
            st = self.status
            self._tokens_total += tokens
            self._rates.append((now, step, self._tokens_total))
            st.step = step
            if total_steps is not None:
                st.total_steps = total_steps
            if loss is not None:
                st.loss = loss
                st.losses = [*st.losses, loss][-RECENT_LOSSES:]
            if lr is not None:
                st.lr = lr
            if epoch is not None:
                st.epoch = epoch
            rate = self.rates()
            if rate is not None:
                st.steps_per_s, st.tokens_per_s = rate
                if st.total_steps is not None and st.steps_per_s > 0:
                    st.eta_s = max(0, st.total_steps - step) / st.steps_per_s
            if extra:
                st.extra.update(extra)
            self.write()

    def progress(self, done: int, total: int, message: str = "", *, tokens: int = 0) -> None:
        """Progress of a non-training loop (evaluation questions, probe samples): `done` of
        `total` items, `tokens` forwarded since the previous call (feeds tokens/s)."""
        self.step(done, total_steps=total, tokens=tokens)
        if message:
            self.update(message=message)

    def reset_rates(self) -> None:
        """Forget the rate window (after a resume or an eval pause)."""
        with self._lock:
            self._rates.clear()

    def rates(self) -> tuple[float, float] | None:
        """(steps/s, tokens/s) over the sliding window, or None before two points exist."""
        if len(self._rates) < 2:
            return None
        t0, s0, k0 = self._rates[0]
        t1, s1, k1 = self._rates[-1]
        dt = t1 - t0
        if dt <= 0:
            return None
        return (s1 - s0) / dt, (k1 - k0) / dt


class NullStatus(StatusWriter):
    """The status of a non-zero DDP rank: same interface, writes nothing."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._rates = deque(maxlen=RATE_WINDOW + 1)
        self._tokens_total = 0
        self.last_error = None
        self.echo = False
        self.status = RunStatus(run_id="-", stage="-")

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def write(self) -> bool:
        return True

    def event(self, kind: str, message: str = "", *, step: int | None = None, **data: Any) -> None:
        pass


def _gpus() -> list[GpuStat]:
    """GPU utilisation/memory via nvidia-smi (cached) where there is one; else torch's view."""
    stats = gpu_stats(max_age_s=15.0)
    if stats:
        return stats
    torch = sys.modules.get("torch")  # never import torch here: exec stages do not need it
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        i = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(i)
        return [
            GpuStat(
                index=i,
                name=torch.cuda.get_device_name(i),
                mem_used_mb=(total - free) / 2**20,
                mem_total_mb=total / 2**20,
            )
        ]
    except Exception:  # a stats probe must never break the heartbeat
        return []
