"""Dashboard rendering: fixed snapshots rendered to a recording Console at two widths."""

from __future__ import annotations

import io
import re
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console
from rich.style import Style

from orchestrator.dashboard.keys import parse_keys
from orchestrator.dashboard.render import (
    fmt_duration,
    heartbeat_style,
    render,
    runs_table,
    sparkline,
    targets_table,
)
from orchestrator.dashboard.snapshot import (
    AlertView,
    InstanceView,
    RunView,
    Snapshot,
    TargetView,
)
from orchestrator.dashboard.table import fit_columns
from state.models import GpuStat
from state.phases import Phase

NOW = datetime(2026, 11, 25, 20, 0, 0, tzinfo=timezone.utc)
WIDTHS = (160, 80)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_run(i: int = 0, phase: Phase = Phase.RUNNING, **kw: object) -> RunView:
    base: dict[str, object] = {
        "stage": "stage3b",
        "stage_dir": "stage3b_prefix",
        "run_id": f"20261125-19{i // 60:02d}{i % 60:02d}",
        "target": "local",
        "phase": phase,
        "created_at": NOW - timedelta(minutes=30),
        "updated_at": NOW - timedelta(minutes=1),
        "step": 120,
        "total_steps": 400,
        "loss": 1.2345,
        "losses": tuple(3.0 - 0.1 * k for k in range(20)),
        "steps_per_s": 2.5,
        "tokens_per_s": 5120.0,
        "last_beat_at": NOW - timedelta(seconds=10),
        "stale_after_s": 300.0,
    }
    base.update(kw)
    return RunView(**base)  # type: ignore[arg-type]


def snap(
    runs: list[RunView], targets: tuple[TargetView, ...] = (), alerts: tuple[AlertView, ...] = ()
) -> Snapshot:
    return Snapshot(
        taken_at=NOW, runs=tuple(runs), targets=targets, alerts=alerts, monitor="in-process"
    )


def to_text(renderable: object, width: int, **console_kw: object) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), **console_kw)
    console.print(renderable)
    text = console.export_text()
    return text


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# -- every phase, two widths ------------------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS)
def test_every_phase_is_shown_by_name_and_nothing_wraps(width: int) -> None:
    runs = [make_run(i, phase) for i, phase in enumerate(Phase)]
    text = to_text(runs_table(snap(runs), width, NOW), width)
    body = lines_of(text)
    assert len(body) == 1 + len(runs)  # header + one line per run: nothing wrapped
    for phase, line in zip(Phase, body[1:], strict=True):
        assert phase.value in line
    assert all(len(ln) <= width for ln in text.splitlines())


def test_wide_terminal_shows_every_column_narrow_drops_the_least_important() -> None:
    runs = [make_run(0)]
    wide = to_text(runs_table(snap(runs), 160, NOW), 160)
    narrow = to_text(runs_table(snap(runs), 80, NOW), 80)
    for header in (
        "stage",
        "run id",
        "target",
        "phase",
        "progress",
        "step",
        "loss",
        "recent loss",
        "step/s",
        "tok/s",
        "ETA",
        "elapsed",
        "beat",
        "exit / reason",
    ):
        assert header in wide
    assert "120/400" in wide and "1.2345" in wide and "5.1k" in wide and "2.50" in wide
    assert "█" in wide and "░" in wide  # the progress bar
    assert sparkline(runs[0].losses, 12) in wide
    assert "1m52s" in wide  # ETA: (400 - 120) / 2.5 s
    assert "30m00s" in wide  # elapsed
    # At 80 columns the essentials stay, the extras go, and nothing wraps.
    for kept in ("stage3b", "20261125-1900", "running", "120/400", "10s"):
        assert kept in narrow
    for dropped in ("recent loss", "tok/s", "progress"):
        assert dropped not in narrow
    assert len(lines_of(narrow)) == 2


def test_terminal_runs_show_exit_code_and_reason() -> None:
    runs = [
        make_run(0, Phase.FAILED, exit_code=3, reason="leakage guard: masked loss collapsed"),
        make_run(1, Phase.SUCCEEDED, exit_code=0, pulled_at=NOW),
        make_run(2, Phase.CRASHED, reason="process gone, no marker"),
    ]
    text = to_text(runs_table(snap(runs), 160, NOW), 160)
    assert "exit 3 · leakage guard: masked" in text
    assert "exit 0 · pulled" in text
    assert "process gone, no marker" in text


def test_unreachable_overlay_shows_instead_of_the_phase() -> None:
    run = make_run(0, Phase.RUNNING, unreachable_since=NOW - timedelta(minutes=3))
    text = to_text(runs_table(snap([run]), 160, NOW), 160)
    assert "unreachable" in text and "no answer for 3m00s" in text


# -- heartbeat colouring ----------------------------------------------------------------------
def _style_of(renderable: object, width: int, needle: str) -> Style:
    console = Console(
        width=width, force_terminal=True, color_system="truecolor", file=io.StringIO()
    )
    for seg in console.render(renderable):
        if needle in seg.text and seg.style is not None:
            return seg.style
    raise AssertionError(f"{needle!r} not rendered")


@pytest.mark.parametrize(
    ("age_s", "color"),
    [(20, "green"), (170, "yellow"), (250, "red"), (400, "red")],
)
@pytest.mark.parametrize("width", WIDTHS)
def test_heartbeat_turns_yellow_then_red_near_the_stale_limit(
    age_s: int, color: str, width: int
) -> None:
    run = make_run(0, last_beat_at=NOW - timedelta(seconds=age_s), stale_after_s=300.0)
    style = _style_of(runs_table(snap([run]), width, NOW), width, fmt_duration(age_s))
    assert style.color is not None and style.color.name == color
    if age_s >= 300:
        assert style.bold


def test_heartbeat_thresholds_follow_each_runs_own_limit() -> None:
    assert heartbeat_style(50, 60) == "red"  # 83% of a 60 s limit
    assert heartbeat_style(50, 3600) == "green"  # 1% of an hour
    assert heartbeat_style(None, 300) == "dim"


def test_finished_runs_show_no_heartbeat() -> None:
    run = make_run(0, Phase.SUCCEEDED, last_beat_at=NOW - timedelta(hours=5))
    text = to_text(runs_table(snap([run]), 160, NOW), 160)
    assert "5h00m" not in text


# -- long names, empty state, many runs -------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS)
def test_long_names_are_cut_with_an_ellipsis_not_wrapped(width: int) -> None:
    long_stage = "stage3b_prefix_lm_finetune_with_a_very_long_descriptive_name"
    run = make_run(
        0,
        stage=long_stage,
        target="vast-rtx4090-frankfurt-interruptible-2",
        reason="x" * 300,
        phase=Phase.FAILED,
    )
    targets = (
        TargetView(name="vast-rtx4090-frankfurt-interruptible-2", kind="vast", reachable=True),
    )
    text = to_text(render(snap([run], targets), width, NOW, height=40), width)
    assert long_stage not in text and "stage3b_prefix_lm…" in text
    assert all(len(ln) <= width for ln in text.splitlines())


@pytest.mark.parametrize("width", WIDTHS)
def test_empty_state_says_how_to_start(width: int) -> None:
    text = to_text(render(snap([]), width, NOW, height=30, selected=None), width)
    assert "no runs yet: orch launch STAGE" in text
    assert "no targets" in text and "no alerts" in text
    assert "q quit" in text


def test_two_hundred_runs_all_listed_without_a_height() -> None:
    runs = [make_run(i) for i in range(200)]
    text = to_text(runs_table(snap(runs), 160, NOW), 160)
    assert len(lines_of(text)) == 201
    assert "20261125-1903" in text and runs[-1].run_id in text


@pytest.mark.parametrize("width", WIDTHS)
def test_two_hundred_runs_fit_the_screen_around_the_selection(width: int) -> None:
    runs = [make_run(i) for i in range(200)]
    targets = tuple(TargetView(name=f"box{i}", kind="ssh", reachable=True) for i in range(10))
    text = to_text(render(snap(runs, targets), width, NOW, height=50, selected=150), width)
    lines = text.splitlines()
    assert len(lines) <= 50
    assert runs[150].run_id in text and "›" in text
    assert runs[0].run_id not in text
    assert "more (↑/↓ to scroll)" in text


def test_no_color_keeps_every_word_and_drops_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [make_run(i, phase) for i, phase in enumerate(Phase)]
    monkeypatch.setenv("NO_COLOR", "1")
    console = Console(width=160, force_terminal=True, record=True, file=io.StringIO())
    with console.capture() as cap:
        console.print(render(snap(runs), 160, NOW, height=40, selected=0))
    out = cap.get()
    assert not re.search(r"\x1b\[(3[0-7]|9[0-7]|38;)", out)  # no foreground colours
    plain = ANSI.sub("", out)
    for phase in Phase:
        assert phase.value in plain
    assert "█" in plain and "░" in plain  # the bar reads without colour


# -- targets and alerts -----------------------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS)
def test_targets_show_reachability_gpus_disk_price_and_idle_warning(width: int) -> None:
    inst = InstanceView(
        provider="vast",
        instance_id="42",
        target="vast1",
        dph=0.5,
        running_since=NOW - timedelta(hours=2),
        gpu_name="RTX 4090",
    )
    targets = (
        TargetView(
            name="local", kind="local", reachable=True, disk_free_bytes=50 * 2**30, active_runs=2
        ),
        TargetView(
            name="vast1",
            kind="vast",
            reachable=True,
            instance=inst,
            active_runs=0,
            idle_since=NOW - timedelta(minutes=45),
            idle_warn_after_s=1800,
            gpus=(
                GpuStat(index=0, name="RTX 4090", util_pct=3, mem_used_mb=512, mem_total_mb=24564),
            ),
        ),
        TargetView(
            name="box", kind="ssh", reachable=False, unreachable_since=NOW - timedelta(minutes=7)
        ),
        TargetView(name="new", kind="ssh"),
    )
    text = to_text(targets_table(snap([], targets), width, NOW), width)
    assert "50.0G" in text
    assert "$1.00" in text  # 2 h at $0.50/h
    assert "paid, idle 45m00s" in text
    assert "down 7m00s" in text and "not polled" in text
    if width >= 160:
        assert "0:3% 0/24G" in text and "RTX 4090" in text and "0.500" in text
    style = _style_of(targets_table(snap([], targets), width, NOW), width, "⚠ paid")
    assert style.color is not None and style.color.name == "red"  # idle past the limit


def test_alerts_show_time_kind_and_reason() -> None:
    alerts = (
        AlertView(
            at=NOW - timedelta(minutes=2),
            kind="crashed",
            title="stage3b 20261125-1900 crashed",
            body="process gone\nsecond line",
            run_id="20261125-1900",
        ),
        AlertView(
            at=NOW - timedelta(minutes=1),
            kind="hung",
            title="stage1 hung",
            body="",
            last_error="HTTP 500",
        ),
    )
    text = to_text(render(snap([], alerts=alerts), 160, NOW, height=40), 160)
    assert "19:58:00" in text and "crashed" in text and "process gone" in text
    assert "second line" not in text
    assert "not delivered: HTTP 500" in text


def test_log_view_replaces_alerts() -> None:
    text = to_text(
        render(
            snap([make_run(0)]),
            120,
            NOW,
            height=40,
            selected=0,
            log_lines=["step 1 loss 2.0", "step 2 loss 1.9"],
            log_title="s/r",
        ),
        120,
    )
    assert "Log" in text and "step 2 loss 1.9" in text and "Alerts" not in text


# -- small pieces -----------------------------------------------------------------------------
def test_fit_columns_keeps_priorities_and_display_order() -> None:
    from orchestrator.dashboard.table import Col

    cols = [
        Col("a", "a", 10, 2),
        Col("b", "b", 10, 0),
        Col("c", "c", 10, 1),
        Col("d", "d", 5, 3, flex=True),
    ]
    assert [c.key for c in fit_columns(cols, 21)] == ["b", "c"]
    fitted = fit_columns(cols, 40)
    assert [c.key for c in fitted] == ["a", "b", "c", "d"] and fitted[-1].width == 7


def test_sparkline_scales_between_min_and_max() -> None:
    assert sparkline([1.0, 2.0, 3.0], 10) == "▁▄█"
    assert sparkline([], 10) == ""
    assert len(sparkline([float(i) for i in range(50)], 12)) == 12


def test_keys_are_parsed_from_raw_terminal_input() -> None:
    assert parse_keys(b"\x1b[A\x1b[Bq") == ["up", "down", "quit"]
    assert parse_keys(b"rpl") == ["refresh", "pull", "log"]
    assert parse_keys(b"\x1b[5~x\x1bOB") == ["pageup", "down"]


def test_text_from_a_box_cannot_move_the_cursor_or_recolour_the_screen() -> None:
    from orchestrator.dashboard.table import clean_log_line

    run = make_run(0, Phase.FAILED, reason="boom\x1b[2J\x1b[31mred\nsecond line\ttab")
    text = to_text(runs_table(snap([run]), 160, NOW), 160)
    assert "\x1b" not in text and "\t" not in text
    assert len(lines_of(text)) == 2  # the newline did not start a new row
    assert clean_log_line("\x1b[32mok\x1b[0m") == "ok"
    assert clean_log_line("10%|##   \r55%|#####  \r") == "55%|#####  "
    log = to_text(
        render(snap([run]), 120, NOW, height=30, selected=0, log_lines=["\x1b]0;t\x07hi"]), 120
    )
    assert "hi" in log and "\x1b" not in log


@pytest.mark.parametrize("width", WIDTHS)
def test_footer_message_gets_its_own_line_and_the_screen_still_fits(width: int) -> None:
    runs = [make_run(i) for i in range(100)]
    msg = "pulled stage3b_prefix/20261125-190000: 12 files verified"
    text = to_text(render(snap(runs), width, NOW, height=40, selected=0, message=msg), width)
    lines = text.splitlines()
    assert len(lines) <= 40
    assert lines[-2].startswith(msg[:40])
    assert lines[-1].startswith("q quit")


# -- reasons wrap in `orch status`; leak verdicts show ----------------------------------------
LONG_REASON = (
    "launch failed: target box: identity_file /home/me/.ssh/id_missing does not exist "
    "(fix identity_file in orch.toml, a private key whose .pub is on the box)"
)


def note_text(text: str, key: str) -> str:
    """The whole `exit / reason` cell of the row that starts with `key`, its wrapped lines
    joined (continuation lines are blank up to the column)."""
    lines = text.splitlines()
    col = lines[0].index("exit / reason")
    start = next(i for i, ln in enumerate(lines) if key in ln)
    parts = [lines[start][col:].strip()]
    for ln in lines[start + 1 :]:
        if ln[:col].strip():
            break
        parts.append(ln[col:].strip())
    return " ".join(p for p in parts if p)


def test_status_wraps_a_long_reason_at_80_columns_instead_of_cutting_it() -> None:
    runs = [make_run(0, Phase.FAILED, reason=LONG_REASON), make_run(1)]
    text = to_text(runs_table(snap(runs), 80, NOW, wrap_notes=True), 80)
    assert all(len(ln) <= 80 for ln in text.splitlines())
    joined = note_text(text, runs[0].run_id)
    # every word is there, in order (a word longer than the column continues on the next line)
    assert joined.replace(" ", "") == LONG_REASON.replace(" ", "")
    assert "box.)" in joined.replace(" ", "") or joined.endswith("on the box)")
    assert "…" not in text
    # the next run still has its own line
    assert any(runs[1].run_id in ln and "running" in ln for ln in text.splitlines())
    # the dashboard keeps one line per run (it cuts with an ellipsis)
    dash = to_text(runs_table(snap(runs), 80, NOW), 80)
    assert len(lines_of(dash)) == 3 and "…" in dash


@pytest.mark.parametrize("width", WIDTHS)
def test_a_leak_verdict_is_shown_with_the_phase(width: int) -> None:
    leaky = make_run(
        0, Phase.SUCCEEDED, exit_code=0, leak=True, leak_step=0, stage="stage3b-leaky",
        pulled_at=NOW,
    )  # fmt: skip
    clean = make_run(1, Phase.SUCCEEDED, exit_code=0)
    flagged = make_run(2, Phase.RUNNING, leak=True)  # the step comes with the summary
    text = to_text(runs_table(snap([leaky, clean, flagged]), width, NOW), width)
    rows = {
        r.run_id: ln for r in (leaky, clean, flagged) for ln in text.splitlines() if r.run_id in ln
    }
    assert "succeeded" in rows[leaky.run_id] and "LEAK at step 0" in rows[leaky.run_id]
    assert "LEAK" not in rows[clean.run_id]
    assert "LEAK" in rows[flagged.run_id]
    # the dashboard's cursor column leaves the verdict less room: it is shown whole, alone
    dash = to_text(runs_table(snap([leaky, clean]), width, NOW, selected=0), width)
    assert "LEAK at step 0" in dash.splitlines()[1]
    table = runs_table(snap([leaky, clean]), width, NOW)
    styles = {str(sp.style) for sp in table.rows[0].spans}
    assert "bold red" in styles  # the verdict is in red
    assert "bold yellow" in styles and "bold green" not in styles  # not a plain green success
    assert "bold green" in {str(sp.style) for sp in table.rows[1].spans}
