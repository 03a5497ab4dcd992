"""The report's PNG plots, made with matplotlib's Agg backend (no display needed).

matplotlib is imported lazily: the laptop install has it only through the `report` extra
(`pip install 'orch[report]'`); `available()` says whether plots can be drawn.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ACCURACY_PNG = "accuracy_by_stage.png"
LOSS_PNG = "loss_curves_3a_vs_3b.png"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    # lazy, for start-up time: pulls in matplotlib
    import matplotlib

    matplotlib.use("Agg", force=True)
    # lazy, for start-up time: pulls in matplotlib
    import matplotlib.pyplot as plt

    return plt


def accuracy_by_stage(
    path: Path,
    bars: Sequence[tuple[str, float | None]],
    *,
    chance: float | None = None,
    errors: Sequence[float | None] | None = None,
    title: str = "Macro accuracy by stage",
) -> Path:
    """A bar per stage (missing stages drawn as an empty slot labelled 'not run'); `errors`
    draws an error bar of that half-height on each bar (the sd across seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    try:
        labels = [b[0] for b in bars]
        values = [b[1] if b[1] is not None else 0.0 for b in bars]
        colors = [
            "#4c72b0" if "causal" in lab or lab.startswith("1") else "#dd8452" for lab in labels
        ]
        yerr = [e or 0.0 for e in errors] if errors is not None else None
        rects = ax.bar(range(len(bars)), values, color=colors, yerr=yerr, capsize=4 if yerr else 0)
        for i, (rect, (_, v)) in enumerate(zip(rects, bars, strict=True)):
            err = errors[i] if errors is not None else None
            ax.annotate(
                ("not run" if v is None else f"{v:.3f}" + (f" ± {err:.3f}" if err else "")),
                (rect.get_x() + rect.get_width() / 2, rect.get_height() + (err or 0.0)),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        if chance is not None:
            ax.axhline(
                chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})"
            )
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("macro accuracy")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def loss_curves(
    path: Path,
    series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    *,
    title: str = "Training and eval loss: 3A (causal) vs 3B (prefix)",
) -> Path:
    """`series[run label][curve name] = [(step, loss), ...]`; train solid, eval dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    try:
        palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
        drawn = 0
        for i, (label, curves) in enumerate(series.items()):
            color = palette[i % len(palette)]
            for curve, points in curves.items():
                if not points:
                    continue
                xs = [p[0] for p in points]
                ys = [p[1] for p in points]
                style = "-" if curve == "train" else "--"
                marker = None if curve == "train" else "o"
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    marker=marker,
                    markersize=3,
                    label=f"{label} {curve}",
                )
                drawn += 1
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                "no loss events recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("loss (response tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
