"""Fixed-width text tables: column fitting by priority, cells cut with an ellipsis, one line
of text per row, except that a `wrap` column (`orch status`'s reasons) continues on the next
lines instead of being cut. Pure; shared by the dashboard and `orch status`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rich.console import Console, ConsoleOptions, RenderResult
from rich.style import Style
from rich.text import Span, Text


@dataclass(frozen=True)
class Col:
    """A column: `priority` 0 is kept longest; `flex` columns take the width left over."""

    key: str
    header: str
    width: int
    priority: int
    justify: str = "left"
    flex: bool = False
    wrap: bool = False  # continue a long cell on the next lines (at spaces) instead of cutting it


def fit_columns(cols: Sequence[Col], width: int) -> list[Col]:
    """The most important columns that fit `width` (one blank cell between columns),
    in their display order; a flex column grows into what is left."""
    chosen: set[str] = set()
    used = 0
    for col in sorted(cols, key=lambda c: c.priority):
        cost = col.width + (1 if chosen else 0)
        if used + cost <= width:
            chosen.add(col.key)
            used += cost
    kept = [c for c in cols if c.key in chosen]
    spare = width - used
    out = []
    for c in kept:
        if c.flex and spare > 0:
            c = replace(c, width=c.width + spare)
            spare = 0
        out.append(c)
    return out


class FixedTable:
    """A table of fixed-width columns, rendered as one line of text per row (a `wrap` column's
    long cell adds lines below it; every other cell is cut to its width).

    rich's `Table` measures and wraps every cell on every frame (tens of ms for a screenful);
    the widths here are already decided by `fit_columns`, so each row is just its cells cut
    with an ellipsis and padded, one `Text` per line: cheap enough for 4 frames a second.
    """

    def __init__(self, cols: Sequence[Col]) -> None:
        self.cols = list(cols)
        self.rows: list[Text] = []
        self.caption = ""
        header = [Text(c.header, style="bold") for c in self.cols]
        self.header = self._line(header)

    def _line(self, cells: Sequence[Text | str], style: str | None = None) -> Text:
        parts: list[str] = []
        spans: list[Span] = []
        pos = 0  # in characters, as rich's spans count
        for i, (col, value) in enumerate(zip(self.cols, cells, strict=True)):
            if i:
                parts.append(" ")
                pos += 1
            plain, inner = _fit_cell(value, col.width, col.justify)
            spans.extend(Span(pos + sp.start, pos + sp.end, sp.style) for sp in inner)
            parts.append(plain)
            pos += len(plain)
        line = Text("".join(parts), no_wrap=True, overflow="crop", end="", spans=spans)
        if style:
            line.stylize(style)
        return line

    def add_row(self, *cells: Text | str, style: str | None = None) -> None:
        """One row: one line, or more when a `wrap` column's cell is longer than its width
        (the other cells stay on the first line)."""
        pieces = [
            wrap_cell(value, col.width) if col.wrap else [value]
            for col, value in zip(self.cols, cells, strict=True)
        ]
        for i in range(max((len(p) for p in pieces), default=1)):
            line = [p[i] if i < len(p) else "" for p in pieces]
            self.rows.append(self._line(line, style))

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = [self.header, *self.rows]
        if self.caption:
            lines.append(Text(self.caption, style="dim", no_wrap=True, overflow="ellipsis", end=""))
        yield Text("\n", no_wrap=True, overflow="crop").join(lines)


#: Control characters (newlines, tabs, ESC from a worker's message) become spaces: one cell
#: each, and nothing from a box can move the cursor or recolour the screen.
CONTROL_BLANKS = {c: " " for c in (*range(0x20), 0x7F)}
_ANSI_RE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")


def clean_log_line(line: str) -> str:
    """A log line as a terminal would leave it: colour codes dropped, only the text after the
    last carriage return (progress bars redraw with \\r), other control characters blanked."""
    line = _ANSI_RE.sub("", line)
    line = line.rstrip("\r").rsplit("\r", 1)[-1]
    return line.translate(CONTROL_BLANKS)


def wrap_spans(plain: str, width: int) -> list[tuple[int, int]]:
    """(start, end) of each line of `plain` wrapped to `width` characters: greedy, at spaces,
    a word longer than a line cut where the line ends (pure)."""
    out: list[tuple[int, int]] = []
    start, n = 0, len(plain)
    while start < n:
        while start < n and plain[start] == " ":
            start += 1
        if start >= n:
            break
        if n - start <= width:
            out.append((start, n))
            break
        cut = plain.rfind(" ", start, start + width + 1)
        end = cut if cut > start else start + width
        out.append((start, end))
        start = end
    return out or [(0, 0)]


def wrap_cell(value: Text | str, width: int) -> list[Text | str]:
    """A cell as the lines it takes at `width` (styles kept); one line when it fits."""
    plain = value if isinstance(value, str) else value.plain
    if width <= 0 or len(plain) <= width:
        return [value]
    return [value[a:b] for a, b in wrap_spans(plain, width)]


def _fit_cell(value: Text | str, width: int, justify: str) -> tuple[str, list[Span]]:
    """A cell cut to `width` with an ellipsis and padded: its text and its style spans.

    Plain ASCII text (most cells) is cut with string slicing; anything else goes through rich's
    cell-width-aware `Text.truncate`/`align`."""
    base: str | Style
    if isinstance(value, str):
        plain, base, inner = value, "", []
    else:
        plain, base, inner = value.plain, value.style, value.spans
    plain = plain.translate(CONTROL_BLANKS)  # 1:1, so spans still line up
    if not inner and plain.isascii():
        if len(plain) > width:
            plain = plain[: max(0, width - 1)] + "…"
        pad = " " * (width - len(plain))
        start = len(pad) if justify == "right" else 0
        text = pad + plain if justify == "right" else plain + pad
        return text, [Span(start, start + len(plain), base)] if base else []
    cell = Text(plain, style=base, spans=list(inner), no_wrap=True)
    cell.truncate(width, overflow="ellipsis")
    cell.align(justify, width)  # type: ignore[arg-type]
    spans = [Span(0, len(cell.plain), base), *cell.spans] if base else cell.spans
    return cell.plain, spans


def make_table(cols: Sequence[Col]) -> FixedTable:
    return FixedTable(cols)


def width_of(values: Sequence[str], lo: int, hi: int) -> int:
    return max(lo, min(hi, max((len(v) for v in values), default=lo)))


def caption(table: FixedTable, text: str) -> None:
    table.caption = text
