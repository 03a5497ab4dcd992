"""Save a screenshot of the dashboard, as the store holds it now, as a PNG (and SVG).

    .venv/bin/pip install cairosvg       # once: SVG -> PNG
    ORCH_STATE_DIR=... .venv/bin/python scripts/dashboard_screenshot.py docs/img/dashboard.png

It renders one frame exactly as `orch dashboard` would (same gather + render), with the cursor
on the first run, through rich's `Console(record=True).export_svg`, then converts it with
cairosvg. The fonts fall back to the system's monospace font (e.g. DejaVu Sans Mono).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from orchestrator.context import Context  # noqa: E402
from orchestrator.dashboard.render import render  # noqa: E402
from orchestrator.dashboard.snapshot import gather, utcnow  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=150)
    parser.add_argument("--height", type=int, default=30)
    parser.add_argument("--monitor", default="in-process", help="the footer's monitor label")
    parser.add_argument("--svg", action="store_true", help="also keep the SVG beside the PNG")
    args = parser.parse_args()
    ctx = Context()
    snap = gather(ctx.store, ctx.config, monitor=args.monitor)
    console = Console(
        width=args.width,
        height=args.height,
        record=True,
        force_terminal=True,
        color_system="truecolor",
        file=io.StringIO(),
    )
    frame = render(
        snap, args.width, utcnow(), height=args.height, selected=0 if snap.runs else None
    )
    console.print(frame)
    svg = console.export_svg(title="orch dashboard")
    # The SVG asks for Fira Code from the web; with no network use the local monospace font.
    svg = svg.replace(
        "font-family: Fira Code, monospace", "font-family: DejaVu Sans Mono, monospace"
    )
    args.png.parent.mkdir(parents=True, exist_ok=True)
    if args.svg:
        args.png.with_suffix(".svg").write_text(svg, encoding="utf-8")
    try:
        import cairosvg
    except ImportError:
        print("cairosvg is not installed: .venv/bin/pip install cairosvg", file=sys.stderr)
        return 1
    cairosvg.svg2png(
        bytestring=svg.encode("utf-8"), write_to=str(args.png), output_width=args.width * 12
    )
    print(f"wrote {args.png}" + (f" and {args.png.with_suffix('.svg')}" if args.svg else ""))
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
