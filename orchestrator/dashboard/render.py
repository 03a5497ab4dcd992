"""Pure rendering: (snapshot, width, now) -> a rich renderable. No I/O, no clock, no globals.

Columns carry a priority; a narrow terminal drops the least important ones instead of letting
rich wrap cells into garbage, and every cell is `no_wrap` with an ellipsis (except the reasons of
`orch status`, which continue on the next lines rather than vanish). Nothing relies on
colour alone (phases are words, bars use distinct glyphs), so `NO_COLOR` loses no information;
rich's Console honours `NO_COLOR` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.text import Text

from orchestrator.dashboard.snapshot import AlertView, RunView, Snapshot, TargetView
from orchestrator.dashboard.table import (
    CONTROL_BLANKS,
    Col,
    FixedTable,
    caption,
    clean_log_line,
    fit_columns,
    make_table,
    width_of,
)
from state.phases import Phase

PHASE_STYLE: dict[Phase, str] = {
    Phase.PENDING: "dim",
    Phase.SYNCING: "cyan",
    Phase.LAUNCHING: "cyan",
    Phase.QUEUED: "blue",
    Phase.RUNNING: "green",
    Phase.HUNG: "bold yellow",
    Phase.SUCCEEDED: "bold green",
    Phase.FAILED: "bold red",
    Phase.CRASHED: "bold red",
    Phase.TIMED_OUT: "red",
    Phase.LOST: "magenta",
    Phase.CANCELLED: "dim",
}
UNREACHABLE_STYLE = "bold magenta"
#: Heartbeat age as a fraction of the stale limit: yellow from WARN, red from ALARM.
HEARTBEAT_WARN = 0.5
HEARTBEAT_ALARM = 0.8
SPARK_CHARS = "▁▂▃▄▅▆▇█"
KEYS_HELP = "q quit  r refresh  p pull  l log  ↑/↓ select"


# -- small formatters ------------------------------------------------------------------------
def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit in ("B", "K") or n >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.0f}T"  # pragma: no cover


def fmt_loss(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as block characters scaled between their min and max."""
    vals = [v for v in values[-width:] if v == v]  # drop NaN
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    top = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[int((v - lo) / span * top) if span else top // 2] for v in vals)


def progress_text(step: int | None, total: int | None, bar_width: int) -> Text:
    """`████░░░░` (distinct glyphs, readable without colour); empty when the total is unknown."""
    if not total or step is None or bar_width <= 0:
        return Text("")
    frac = min(1.0, max(0.0, step / total))
    done = int(frac * bar_width)
    return Text.assemble(("█" * done, "green"), ("░" * (bar_width - done), "bright_black"))


def heartbeat_style(age_s: float | None, limit_s: float) -> str:
    """Plain while fresh, yellow as it nears the stale limit, red near and past it."""
    if age_s is None or limit_s <= 0:
        return "dim"
    frac = age_s / limit_s
    if frac >= 1.0:
        return "bold red"
    if frac >= HEARTBEAT_ALARM:
        return "red"
    if frac >= HEARTBEAT_WARN:
        return "yellow"
    return "green"


#: A run the leakage guard flagged: its phase is not shown as a plain success, and its note
#: starts with the verdict (`LEAK at step 0`).
LEAK_PHASE_STYLE = "bold yellow"
LEAK_STYLE = "bold red"


def phase_text(run: RunView) -> Text:
    if run.is_active and run.unreachable_since is not None:
        return Text("unreachable", style=UNREACHABLE_STYLE)
    if run.leak and run.phase is Phase.SUCCEEDED:
        return Text(run.phase.value, style=LEAK_PHASE_STYLE)
    return Text(run.phase.value, style=PHASE_STYLE.get(run.phase, ""))


def _clock(at: datetime, now: datetime) -> str:
    age = (now - at).total_seconds()
    return at.strftime("%H:%M:%S") if age < 86400 else at.strftime("%m-%d %H:%M")


# -- runs ------------------------------------------------------------------------------------
def _run_note(run: RunView, now: datetime, width: int | None = None) -> Text:
    """The note column: the leak verdict first (if any), then exit code / reason / state.
    Within `width` (a cell that is cut) the verdict alone, so nothing after it cuts it."""
    note = _state_note(run, now)
    if not run.leak:
        return note
    text = Text()
    text.append(run.leak_text, style=LEAK_STYLE)
    if note.plain and (width is None or len(run.leak_text) + 3 + len(note.plain) <= width):
        text.append(" · ")
        text.append_text(note)
    return text


def _state_note(run: RunView, now: datetime) -> Text:
    if run.is_active and run.unreachable_since is not None:
        gone = fmt_duration((now - run.unreachable_since).total_seconds())
        return Text(f"{run.phase.value}; no answer for {gone}", style="magenta")
    if run.phase.is_terminal:
        parts = []
        if run.exit_code is not None:
            parts.append(f"exit {run.exit_code}")
        if run.reason:
            parts.append(run.reason)
        if run.phase is Phase.SUCCEEDED and run.pulled_at is not None:
            parts.append("pulled")
        style = "red" if run.phase.is_bad else ""
        return Text(" · ".join(parts), style=style)
    detail = run.reason or run.message
    phase = "" if detail.startswith(run.worker_phase) else run.worker_phase
    bits = [b for b in (phase, detail) if b]
    style = "yellow" if run.phase is Phase.HUNG else "dim"
    return Text(" ".join(bits), style=style)


def runs_table(
    snapshot: Snapshot,
    width: int,
    now: datetime,
    *,
    selected: int | None = None,
    max_rows: int | None = None,
    wrap_notes: bool = False,
) -> FixedTable:
    """The runs as a table that fits `width` without wrapping (shared by `orch status`).

    `selected` marks a row (the dashboard's cursor); `max_rows` shows a window around it.
    `wrap_notes` (`orch status`) continues a long exit code / reason on the next lines
    instead of cutting it; the dashboard keeps one line per run.
    """
    runs = snapshot.runs
    start, stop = 0, len(runs)
    if max_rows is not None and len(runs) > max_rows:
        rows = max(1, max_rows - 1)  # one line says how many are not shown
        sel = selected or 0
        start = min(max(0, sel - rows // 2), len(runs) - rows)
        stop = start + rows
    shown = runs[start:stop]
    steps = [f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step or "-") for r in shown]
    cols = [
        Col("cursor", "", 1, 0),
        Col("stage", "stage", width_of([r.stage for r in shown], 5, 18), 1),
        Col("run", "run id", width_of([r.run_id for r in shown], 6, 20), 2),
        Col("target", "target", width_of([r.target for r in shown], 6, 12), 6),
        Col("phase", "phase", 11, 0),
        Col("bar", "progress", 10, 12),
        Col("step", "step", width_of(steps, 4, 13), 3, "right"),
        Col("loss", "loss", 7, 7, "right"),
        Col("spark", "recent loss", 12, 13),
        Col("sps", "step/s", 6, 9, "right"),
        Col("tps", "tok/s", 6, 11, "right"),
        Col("eta", "ETA", 7, 8, "right"),
        Col("elapsed", "elapsed", 7, 10, "right"),
        Col("beat", "beat", 6, 4, "right"),
        Col("note", "exit / reason", 13, 5, flex=True, wrap=wrap_notes),
    ]
    if selected is None:
        cols = cols[1:]
    fitted = fit_columns(cols, width)
    table = make_table(fitted)
    note_width = next((c.width for c in fitted if c.key == "note"), 0)
    cells: dict[str, Callable[[RunView, int], Text | str]] = {
        "cursor": lambda r, i: "›" if i == selected else " ",
        "stage": lambda r, i: r.stage,
        "run": lambda r, i: r.run_id,
        "target": lambda r, i: r.target,
        "phase": lambda r, i: phase_text(r),
        "bar": lambda r, i: progress_text(r.step, r.total_steps, 10),
        "step": lambda r, i: steps[i - start],
        "loss": lambda r, i: fmt_loss(r.loss),
        "spark": lambda r, i: Text(sparkline(r.losses, 12), style="cyan"),
        "sps": lambda r, i: fmt_rate(r.steps_per_s) if r.is_active else "-",
        "tps": lambda r, i: fmt_rate(r.tokens_per_s) if r.is_active else "-",
        "eta": lambda r, i: fmt_duration(r.remaining_s()),
        "elapsed": lambda r, i: fmt_duration(r.elapsed_s(now)),
        "beat": lambda r, i: _beat(r, now),
        "note": lambda r, i: _run_note(r, now, None if wrap_notes else note_width),
    }
    for i, run in enumerate(shown, start=start):
        table.add_row(
            *(cells[c.key](run, i) for c in fitted),
            style="bold on grey27" if i == selected else None,
        )
    hidden = len(runs) - len(shown)
    more = [] if runs else ["no runs yet: orch launch STAGE"]
    if hidden:
        more.append(f"{hidden} more (↑/↓ to scroll)" if selected is not None else f"{hidden} more")
    if snapshot.hidden_runs:
        more.append(f"{snapshot.hidden_runs} older finished runs hidden (--all)")
    if more:
        caption(table, "; ".join(more))
    return table


def _beat(run: RunView, now: datetime) -> Text:
    if not run.is_active:
        return Text("-", style="dim")
    age = run.heartbeat_age_s(now)
    return Text(fmt_duration(age), style=heartbeat_style(age, run.stale_after_s))


# -- targets ---------------------------------------------------------------------------------
def _reach(t: TargetView, now: datetime) -> Text:
    if t.reachable is None:
        return Text("not polled", style="dim")
    if t.reachable:
        return Text("ok", style="green")
    since = (
        fmt_duration((now - t.unreachable_since).total_seconds()) if t.unreachable_since else "?"
    )
    return Text(f"down {since}", style="bold red")


def _gpu_text(t: TargetView) -> str:
    parts = []
    for g in t.gpus:
        util = "-" if g.util_pct is None else f"{g.util_pct:.0f}%"
        mem = (
            f"{(g.mem_used_mb or 0) / 1024:.0f}/{g.mem_total_mb / 1024:.0f}G"
            if g.mem_total_mb
            else "-"
        )
        parts.append(f"{g.index}:{util} {mem}")
    return " ".join(parts) if parts else "-"


def _target_note(t: TargetView, now: datetime) -> Text:
    if t.is_paid_idle():
        idle = (now - t.idle_since).total_seconds() if t.idle_since else None
        style = "bold red" if idle is not None and idle >= t.idle_warn_after_s else "yellow"
        return Text(f"⚠ paid, idle {fmt_duration(idle)}: orch down {t.name}", style=style)
    if not t.configured:
        return Text("not in orch.toml", style="dim")
    return Text("")


def targets_table(snapshot: Snapshot, width: int, now: datetime) -> FixedTable:
    """Targets and their instances: reachability, GPUs, disk, price and spend, idle warning."""
    ts = snapshot.targets
    gpu_names = [
        t.gpus[0].name if t.gpus else (t.instance.gpu_name if t.instance else "") for t in ts
    ]
    gpu_texts = [_gpu_text(t) for t in ts]
    cols = [
        Col("name", "target", width_of([t.name for t in ts], 6, 16), 0),
        Col("kind", "kind", 5, 6),
        Col("reach", "state", 11, 1),
        Col("runs", "runs", 4, 3, "right"),
        Col("gpu", "gpu", width_of(gpu_names, 3, 16), 5),
        Col("util", "util / mem per GPU", width_of(gpu_texts, 18, 40), 4),
        Col("disk", "disk free", 9, 3, "right"),
        Col("dph", "$/h", 6, 2, "right"),
        Col("spent", "spent", 8, 2, "right"),
        Col("note", "", 20, 1, flex=True),
    ]
    fitted = fit_columns(cols, width)
    table = make_table(fitted)
    for i, t in enumerate(ts):
        inst = t.instance
        spent = inst.spent_usd(now) if inst else None
        cells: dict[str, Text | str] = {
            "name": t.name,
            "kind": t.kind,
            "reach": _reach(t, now),
            "runs": str(t.active_runs),
            "gpu": gpu_names[i] or "-",
            "util": gpu_texts[i],
            "disk": fmt_bytes(t.disk_free_bytes),
            "dph": f"{inst.dph:.3f}" if inst and inst.dph is not None else "-",
            "spent": f"${spent:.2f}" if spent is not None else "-",
            "note": _target_note(t, now),
        }
        table.add_row(*(cells[c.key] for c in fitted))
    if not ts:
        caption(table, "no targets")
    return table


# -- alerts ----------------------------------------------------------------------------------
ALERT_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "crashed": "red",
    "hung": "yellow",
    "timed_out": "red",
    "lost": "magenta",
    "unreachable": "magenta",
    "reachable": "green",
    "relaunched": "cyan",
    "relaunch_failed": "red",
    "idle": "yellow",
}


def _alert_text(a: AlertView) -> Text:
    first = (a.body.splitlines() or [""])[0]
    text = Text(a.title)
    if first and first != a.title:
        text.append(f" — {first}", style="dim")
    if not a.delivered and a.last_error:
        text.append(f" (not delivered: {a.last_error})", style="red")
    return text


def alerts_table(
    snapshot: Snapshot, width: int, now: datetime, limit: int | None = None
) -> FixedTable:
    alerts = snapshot.alerts[:limit] if limit is not None else snapshot.alerts
    subjects = [a.run_id or a.target for a in alerts]
    cols = [
        Col("at", "time", 8, 0),
        Col("kind", "kind", 11, 1),
        Col("subject", "run / target", width_of(subjects, 12, 20), 3),
        Col("text", "what", 16, 2, flex=True),
    ]
    fitted = fit_columns(cols, width)
    table = make_table(fitted)
    for a, subject in zip(alerts, subjects, strict=True):
        cells: dict[str, Text | str] = {
            "at": _clock(a.at, now),
            "kind": Text(a.kind, style=ALERT_STYLE.get(a.kind, "")),
            "subject": subject,
            "text": _alert_text(a),
        }
        table.add_row(*(cells[c.key] for c in fitted))
    if not alerts:
        caption(table, "no alerts")
    return table


# -- the whole screen ------------------------------------------------------------------------
def footer(snapshot: Snapshot, now: datetime, message: str = "") -> Text:
    age = fmt_duration((now - snapshot.taken_at).total_seconds())
    active = sum(1 for r in snapshot.runs if r.is_active)
    text = Text(KEYS_HELP, style="bold")
    text.append(f"   {active} active / {len(snapshot.runs)} shown", style="dim")
    if snapshot.monitor:
        text.append(f"   monitor: {snapshot.monitor}", style="dim")
    text.append(f"   read {age} ago", style="dim")
    if message:  # its own line above the keys, so a long one is not lost off the edge
        text = Text.assemble((message.translate(CONTROL_BLANKS), "yellow"), "\n", text)
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def render(
    snapshot: Snapshot,
    width: int,
    now: datetime,
    *,
    height: int | None = None,
    selected: int | None = None,
    log_lines: Sequence[str] | None = None,
    log_title: str = "",
    message: str = "",
) -> RenderableType:
    """The dashboard screen: runs, targets/instances, alerts (or the selected run's log), keys.

    With `height` the runs panel shows only the rows that fit (a window around `selected`).
    """
    inner = max(10, width - 2)  # panel borders
    n_targets = max(1, len(snapshot.targets))
    n_alerts = min(5, max(1, len(snapshot.alerts)))
    log_rows = 0
    if log_lines is not None:
        log_rows = 12 if height is None else max(3, min(12, height // 3))
    bottom = (log_rows + 2) if log_lines is not None else (n_alerts + 3)
    max_rows = None
    if height is not None:
        # borders (2) + header (1) per panel, + caption line, + footer line
        max_rows = max(1, height - (n_targets + 3) - bottom - 3 - 2 - (1 if message else 0))
    runs = Panel(
        runs_table(snapshot, inner, now, selected=selected, max_rows=max_rows),
        title="[b]Runs[/b]",
        title_align="left",
        padding=0,
    )
    targets = Panel(
        targets_table(snapshot, inner, now), title="[b]Targets[/b]", title_align="left", padding=0
    )
    if log_lines is not None:
        shown = [clean_log_line(ln) for ln in log_lines[-log_rows:]]
        body = Text("\n".join(shown) or "(empty log)", no_wrap=True, overflow="ellipsis")
        lower = Panel(
            body, title=f"[b]Log[/b] {log_title}  (l to close)", title_align="left", padding=0
        )
    else:
        lower = Panel(
            alerts_table(snapshot, inner, now, limit=n_alerts),
            title="[b]Alerts[/b]",
            title_align="left",
            padding=0,
        )
    return Group(runs, targets, lower, footer(snapshot, now, message))
