"""The evaluation figure: FID versus NFE (matplotlib, Agg canvas). Sample grids: :func:`cmflow.data.images.save_grid`.

No pyplot and no global backend switch: figures are drawn on a ``matplotlib.figure.Figure`` with its own
Agg canvas, so importing or calling this module changes nothing for anyone else in the process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FidPoint", "save_fid_vs_nfe"]


@dataclass(frozen=True)
class FidPoint:
    """One setting on the FID-vs-NFE plot: the median over seeds and its min/max spread."""

    label: str  # e.g. "CM 1-step"
    group: str  # points of one group are joined by a line, e.g. "cm" or "teacher"
    nfe: int
    median: float
    low: float
    high: float


def save_fid_vs_nfe(points: Sequence[FidPoint], path: str | Path, title: str = "FID vs NFE") -> None:
    """Write a PNG: median FID per setting (log-log), min/max error bars, groups joined by lines.

    A dashed horizontal line marks each single-point group (the teacher), so the students' distance to it
    reads off directly.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[str, list[FidPoint]] = {}
    for point in points:
        groups.setdefault(point.group, []).append(point)
    for name, members in groups.items():
        members = sorted(members, key=lambda p: p.nfe)
        nfe = [p.nfe for p in members]
        med = np.asarray([p.median for p in members])
        err = np.asarray([[p.median - p.low for p in members], [p.high - p.median for p in members]])
        line = ax.errorbar(nfe, med, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=name)
        for p in members:
            ax.annotate(
                f"{p.label}: {p.median:.2f}",
                (p.nfe, p.median),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        if len(members) == 1:
            ax.axhline(members[0].median, linestyle="--", linewidth=0.8, color=line.lines[0].get_color())
    ax.set_xscale("log")
    ticks = sorted({p.nfe for p in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xticks([], minor=True)
    if ticks:
        ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    values = [p.median for p in points if p.median > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID (median over seeds; bars: min-max)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), format="png", metadata={"Software": None})
