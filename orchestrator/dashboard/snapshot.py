"""A snapshot of the controller's store, as plain frozen dataclasses, for rendering.

`gather(store, config)` is the only I/O here: it reads runs, targets, instances and alerts and
parses the JSON blobs (the last `status.json`, the last `TargetObservation`, the spec's stale
limit) once, so `render` can stay a pure function of (snapshot, width, now). Ages are judged on
the laptop's clock only: a heartbeat's age is `now - runs.last_seq_change_at`, the time the
controller last saw `seq` move, never a timestamp written by the box.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

from orchestrator.config import OrchConfig, VastTarget
from state.models import GpuStat, RunRecord, RunStatus, TargetObservation
from state.phases import TERMINAL_PHASES, Phase
from state.store import Store, parse_time

#: Terminal runs stay on the dashboard this long after they ended (`--all` shows every run).
KEEP_TERMINAL_S = 2 * 3600.0
#: The stale limit used when a spec does not say (RunSpec's default).
DEFAULT_STALE_S = 300.0
#: How many recent loss values the sparkline shows.
SPARK_POINTS = 24


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# -- secrets ---------------------------------------------------------------------------------
_URL_RE = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]{1,15})://([^\s'\"<>]+)")
_KV_RE = re.compile(
    r"(?i)\b(token|api[_-]?key|apikey|secret|password|passwd|pass|auth|authorization|bearer)"
    r"(\s*[=:]\s*|\s+)([^\s,;&'\"]+)"
)


def _redact_url(m: re.Match[str]) -> str:
    scheme, rest = m.group(1), m.group(2)
    if scheme.lower() in {"http", "https"}:
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1].split("?", 1)[0]
        tail = "/***" if len(rest) > len(host) else ""
        return f"{scheme}://{host}{tail}"
    # Apprise-style URLs (slack://, tgram://, discord://, ...) carry tokens in every part.
    return f"{scheme}://***"


def redact(text: str) -> str:
    """Hide what may be a secret: URL paths, credentials and tokens (alert URLs carry them)."""
    text = _URL_RE.sub(_redact_url, text)
    return _KV_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


# -- views -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunView:
    """One run, with its last `status.json` already parsed."""

    stage: str
    stage_dir: str
    run_id: str
    target: str
    phase: Phase
    created_at: datetime
    updated_at: datetime
    reason: str = ""
    exit_code: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    losses: tuple[float, ...] = ()
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    started_at: datetime | None = None
    last_beat_at: datetime | None = None  # controller clock: when `seq` last moved
    stale_after_s: float = DEFAULT_STALE_S
    unreachable_since: datetime | None = None
    pulled_at: datetime | None = None
    worker_phase: str = ""
    message: str = ""
    ended_at: datetime | None = None  # when it entered its terminal phase (phase history)
    leak: bool = False  # the worker's leakage guard flagged the run (status.json leak_flag)
    leak_step: int | None = None  # the first step it flagged, once known

    @property
    def leak_text(self) -> str:
        """`LEAK at step 0` for a run the leakage guard flagged (`LEAK` before the step is
        known); empty otherwise."""
        if not self.leak:
            return ""
        return "LEAK" if self.leak_step is None else f"LEAK at step {self.leak_step}"

    @property
    def key(self) -> str:
        return f"{self.stage_dir}/{self.run_id}"

    @property
    def is_active(self) -> bool:
        return not self.phase.is_terminal

    @property
    def finished_at(self) -> datetime:
        """When a finished run ended (a later pull touches `updated_at`, not this)."""
        return self.ended_at or self.updated_at

    def heartbeat_age_s(self, now: datetime) -> float | None:
        """Seconds since `seq` last moved (controller clock); None before the first beat."""
        if self.last_beat_at is None:
            return None
        return max(0.0, (now - self.last_beat_at).total_seconds())

    def elapsed_s(self, now: datetime) -> float:
        """From the start (worker's start if known, else launch) to now, or to the end."""
        start = self.created_at
        end = now if self.is_active else self.finished_at
        return max(0.0, (end - start).total_seconds())

    def remaining_s(self) -> float | None:
        """ETA: the worker's own estimate, else what is left at the current rate."""
        if not self.is_active:
            return None
        if self.eta_s is not None:
            return max(0.0, self.eta_s)
        if self.steps_per_s and self.total_steps and self.step is not None:
            return max(0.0, (self.total_steps - self.step) / self.steps_per_s)
        return None


@dataclass(frozen=True)
class InstanceView:
    """A rented box (filled by the provider code into the `instances` table)."""

    provider: str
    instance_id: str
    target: str
    state: str = ""
    label: str = ""
    dph: float | None = None  # $/hour, all-in
    gpu_name: str = ""
    num_gpus: int | None = None
    created_at: datetime | None = None
    running_since: datetime | None = None
    destroyed_at: datetime | None = None

    def spent_usd(self, now: datetime) -> float | None:
        """Money spent so far: $/h times the hours it has been running (until destroyed)."""
        start = self.running_since or self.created_at
        if self.dph is None or start is None:
            return None
        end = self.destroyed_at or now
        return max(0.0, (end - start).total_seconds()) / 3600.0 * self.dph


@dataclass(frozen=True)
class TargetView:
    name: str
    kind: str
    configured: bool = True
    reachable: bool | None = None  # None: never polled
    unreachable_since: datetime | None = None
    last_seen_at: datetime | None = None
    gpus: tuple[GpuStat, ...] = ()
    disk_free_bytes: int | None = None
    active_runs: int = 0
    idle_since: datetime | None = None  # no active run since then (None while busy)
    idle_warn_after_s: float = 30 * 60.0
    instance: InstanceView | None = None

    def is_paid_idle(self) -> bool:
        """A live instance with a price and nothing running on it."""
        inst = self.instance
        return (
            inst is not None
            and inst.destroyed_at is None
            and bool(inst.dph)
            and self.active_runs == 0
        )


@dataclass(frozen=True)
class AlertView:
    at: datetime
    kind: str
    title: str
    body: str
    stage_dir: str = ""
    run_id: str = ""
    target: str = ""
    delivered: bool = False
    last_error: str = ""


@dataclass(frozen=True)
class Snapshot:
    """Everything one frame shows; built by `gather`, rendered by `render.render`."""

    taken_at: datetime
    runs: tuple[RunView, ...] = ()
    targets: tuple[TargetView, ...] = ()
    alerts: tuple[AlertView, ...] = ()
    hidden_runs: int = 0  # terminal runs older than the keep window (see --all)
    monitor: str = ""  # "orch watch", "in-process", "off"
    notes: tuple[str, ...] = field(default_factory=tuple)


# -- parsing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StatusBits:
    losses: tuple[float, ...] = ()
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    started_at: datetime | None = None
    worker_phase: str = ""
    message: str = ""
    loss: float | None = None
    leak: bool = False
    leak_step: int | None = None


@lru_cache(maxsize=2048)
def _status_bits(status_json: str) -> _StatusBits:
    """Parse a stored status.json once (cached: it only changes when the run moves)."""
    if not status_json:
        return _StatusBits()
    try:
        st = RunStatus.model_validate_json(status_json)
    except ValueError:
        return _StatusBits(message="status.json unreadable")
    return _StatusBits(
        losses=tuple(float(x) for x in st.losses[-SPARK_POINTS:]),
        steps_per_s=st.steps_per_s,
        tokens_per_s=st.tokens_per_s,
        eta_s=st.eta_s,
        started_at=st.started_at,
        worker_phase=st.phase.value,
        message=st.message,
        loss=st.loss,
        leak=st.leak_flag,
        leak_step=st.first_leak_step,
    )


@lru_cache(maxsize=2048)
def _stale_from_spec(spec_json: str) -> float:
    if not spec_json:
        return DEFAULT_STALE_S
    try:
        value = json.loads(spec_json).get("stale_after_s")
        return float(value) if value else DEFAULT_STALE_S
    except (ValueError, AttributeError, TypeError):
        return DEFAULT_STALE_S


@lru_cache(maxsize=256)
def _observation(obs_json: str) -> TargetObservation | None:
    if not obs_json:
        return None
    try:
        return TargetObservation.model_validate_json(obs_json)
    except ValueError:
        return None


def run_view(rec: RunRecord, stale_override_s: float | None = None) -> RunView:
    """A store record plus its parsed status; the stale limit from the spec unless overridden."""
    bits = _status_bits(rec.status_json)
    return RunView(
        stage=rec.stage,
        stage_dir=rec.stage_dir,
        run_id=rec.run_id,
        target=rec.target,
        phase=rec.phase,
        created_at=_aware(rec.created_at),
        updated_at=_aware(rec.updated_at),
        reason=rec.reason,
        exit_code=rec.exit_code,
        step=rec.step,
        total_steps=rec.total_steps,
        loss=rec.loss if rec.loss is not None else bits.loss,
        losses=bits.losses,
        steps_per_s=bits.steps_per_s,
        tokens_per_s=bits.tokens_per_s,
        eta_s=bits.eta_s,
        started_at=bits.started_at,
        last_beat_at=_aware(rec.last_seq_change_at) if rec.last_seq_change_at else None,
        stale_after_s=stale_override_s or _stale_from_spec(rec.spec_json),
        unreachable_since=_aware(rec.unreachable_since) if rec.unreachable_since else None,
        pulled_at=rec.pulled_at,
        worker_phase=bits.worker_phase,
        message=bits.message,
        leak=bits.leak,
        leak_step=bits.leak_step,
    )


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _instance_view(row: dict[str, Any]) -> InstanceView:
    return InstanceView(
        provider=str(row.get("provider") or ""),
        instance_id=str(row.get("instance_id") or ""),
        target=str(row.get("target") or ""),
        state=str(row.get("state") or ""),
        label=str(row.get("label") or ""),
        dph=row.get("dph"),
        gpu_name=str(row.get("gpu_name") or ""),
        num_gpus=row.get("num_gpus"),
        created_at=parse_time(row.get("created_at")),
        running_since=parse_time(row.get("running_since")),
        destroyed_at=parse_time(row.get("destroyed_at")),
    )


# -- gathering -------------------------------------------------------------------------------
_TERMINAL = tuple(sorted(p.value for p in TERMINAL_PHASES))


@lru_cache(maxsize=4096)
def _cached_view(columns: tuple[str, ...], values: tuple[Any, ...], stale: float | None) -> RunView:
    # Keyed by the whole row: an unchanged run (most of them, most frames) costs one lookup.
    return run_view(RunRecord.model_validate(dict(zip(columns, values, strict=True))), stale)


def _load_runs(
    store: Store, cfg: OrchConfig, include_all: bool, cutoff: datetime
) -> tuple[list[RunView], int]:
    """Active runs plus terminal runs that ended after `cutoff` (all with `include_all`)."""
    marks = ",".join("?" for _ in _TERMINAL)
    if include_all:
        rows = store.query("SELECT * FROM runs")
    else:
        # Filter by string first (cheap, with a day of slack for odd offsets), exactly below.
        loose = (cutoff - timedelta(days=1)).isoformat()
        rows = store.query(
            f"SELECT * FROM runs WHERE phase NOT IN ({marks}) OR updated_at >= ?",
            (*_TERMINAL, loose),
        )
    views = []
    for row in rows:
        target = row["target"]
        stale = cfg.monitor_for(target).stale_after_s if target in cfg.targets else None
        views.append(_cached_view(tuple(row.keys()), tuple(row), stale))
    if include_all:
        return _with_end_times(store, views), 0
    total = int(store.query("SELECT COUNT(*) FROM runs")[0][0])
    views = _with_end_times(store, views)
    views = [v for v in views if v.is_active or v.finished_at >= cutoff]
    return views, total - len(views)


def _with_end_times(store: Store, views: list[RunView]) -> list[RunView]:
    """Fill `ended_at` of finished runs from the phase history (one grouped query)."""
    if not any(not v.is_active for v in views):
        return views
    marks = ",".join("?" for _ in _TERMINAL)
    ends = {
        (r[0], r[1]): parse_time(r[2])
        for r in store.query(
            f"SELECT stage_dir, run_id, MAX(at) FROM phase_history WHERE phase IN ({marks}) "
            "GROUP BY stage_dir, run_id",
            _TERMINAL,
        )
    }
    return [
        v if v.is_active else replace(v, ended_at=ends.get((v.stage_dir, v.run_id))) for v in views
    ]


def _sort_key(rec: RunView) -> tuple[int, float]:
    # Active runs first (newest first), then terminal ones, most recently ended first.
    ts = rec.created_at if rec.is_active else rec.finished_at
    return (0 if rec.is_active else 1, -ts.timestamp())


def gather(
    store: Store,
    config: OrchConfig | None = None,
    *,
    include_all: bool = False,
    keep_terminal_s: float = KEEP_TERMINAL_S,
    alerts_limit: int = 8,
    monitor: str = "",
    now: datetime | None = None,
) -> Snapshot:
    """Read the store once into a `Snapshot` (runs, targets + instances, recent alerts)."""
    now = now or utcnow()
    cfg = config or OrchConfig()
    runs, hidden = _load_runs(store, cfg, include_all, now - timedelta(seconds=keep_terminal_s))
    runs.sort(key=_sort_key)

    active_by_target: dict[str, int] = {}
    for r in runs:
        if r.is_active:
            active_by_target[r.target] = active_by_target.get(r.target, 0) + 1
    last_end = {  # per target: when its last run ended, hidden ones included
        row[0]: parse_time(row[1])
        for row in store.query(
            "SELECT r.target, MAX(h.at) FROM phase_history h JOIN runs r "
            "ON h.stage_dir = r.stage_dir AND h.run_id = r.run_id "
            f"WHERE h.phase IN ({','.join('?' for _ in _TERMINAL)}) GROUP BY r.target",
            _TERMINAL,
        )
    }
    instances: dict[str, InstanceView] = {}
    for row in store.list_instances(live_only=True):
        view = _instance_view(row)
        instances[view.target] = view

    stored = {t["name"]: t for t in store.list_targets()}
    names = list(cfg.targets) + sorted(
        (set(stored) | set(instances) | set(active_by_target)) - set(cfg.targets)
    )
    targets = []
    for name in names:
        row = stored.get(name, {})
        tcfg = cfg.targets.get(name)
        obs = _observation(str(row.get("last_obs_json") or ""))
        inst = instances.get(name)
        active = active_by_target.get(name, 0)
        idle_since = None
        if active == 0:
            idle_since = last_end.get(name) or (inst.running_since if inst else None)
            if inst and inst.running_since and idle_since and idle_since < inst.running_since:
                idle_since = inst.running_since
        reachable = row.get("reachable")
        targets.append(
            TargetView(
                name=name,
                kind=str(row.get("kind") or (tcfg.kind if tcfg else "?")),
                configured=tcfg is not None,
                reachable=None if reachable is None else bool(reachable),
                unreachable_since=parse_time(row.get("unreachable_since")),
                last_seen_at=parse_time(row.get("last_seen_at")),
                gpus=tuple(obs.gpus) if obs else (),
                disk_free_bytes=obs.disk_free_bytes if obs else None,
                active_runs=active,
                idle_since=idle_since,
                idle_warn_after_s=(tcfg.idle_minutes * 60.0)
                if isinstance(tcfg, VastTarget)
                else 1800.0,
                instance=inst,
            )
        )

    alerts = tuple(
        AlertView(
            at=parse_time(a.get("created_at")) or now,
            kind=str(a.get("kind") or ""),
            title=redact(str(a.get("title") or "")),
            body=redact(str(a.get("body") or "")),
            stage_dir=str(a.get("stage_dir") or ""),
            run_id=str(a.get("run_id") or ""),
            target=str(a.get("target") or ""),
            delivered=a.get("delivered_at") is not None,
            last_error=redact(str(a.get("last_error") or "")),
        )
        for a in store.recent_alerts(alerts_limit)
    )
    return Snapshot(
        taken_at=now,
        runs=tuple(runs),
        targets=tuple(targets),
        alerts=alerts,
        hidden_runs=hidden,
        monitor=monitor,
    )


def run_json(run: RunView, now: datetime) -> dict[str, Any]:
    """One run for `orch status --json` (stable keys for scripts)."""
    age = run.heartbeat_age_s(now)
    return {
        "stage": run.stage,
        "stage_dir": run.stage_dir,
        "run_id": run.run_id,
        "target": run.target,
        "phase": run.phase.value,
        "step": run.step,
        "total_steps": run.total_steps,
        "loss": run.loss,
        "steps_per_s": run.steps_per_s,
        "tokens_per_s": run.tokens_per_s,
        "eta_s": run.remaining_s(),
        "heartbeat_age_s": None if age is None else round(age, 1),
        "stale_after_s": run.stale_after_s,
        "unreachable_since": run.unreachable_since.isoformat() if run.unreachable_since else None,
        "exit_code": run.exit_code,
        "reason": redact(run.reason),
        "created_at": run.created_at.isoformat(),
        "updated_at": run.updated_at.isoformat(),
        "ended_at": run.finished_at.isoformat() if not run.is_active else None,
        "pulled": run.pulled_at is not None,
        "leak": run.leak,
        "first_leak_step": run.leak_step,
    }
