"""Summaries of ``evaluate``'s per-seed numbers, the ratios to the teacher, and the FID-vs-NFE figure.

The figure is drawn on a ``matplotlib.figure.Figure`` with its own Agg canvas (no pyplot, no global backend
switch), so nothing changes for anyone else in the process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SETTING_TEACHER, SETTING_1STEP, SETTING_2STEP = "teacher", "cm-1step", "cm-2step"
METRICS = ("fid", "fid_inf", "kid", "precision", "recall")  # per seed, each summarised over the seeds


def spread(values: list[float | None]) -> dict[str, float | None]:
    """median / mean / std (ddof 1; 0 for one seed) / min / max of the finite values."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"median": None, "mean": None, "std": None, "min": None, "max": None}
    return {
        "median": float(np.median(finite)),
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def medians(results: dict[str, dict[str, Any]], metric: str = "fid") -> dict[str, float | None]:
    return {name: entry["summary"][metric]["median"] for name, entry in results.items()}


def ratios(fid: dict[str, float | None]) -> dict[str, float | None]:
    teacher = fid.get(SETTING_TEACHER)
    return {
        key: (fid[name] / teacher if teacher and fid.get(name) is not None else None)  # type: ignore[operator]
        for key, name in (("1step", SETTING_1STEP), ("2step", SETTING_2STEP))
    }


def plot(results: dict[str, dict[str, Any]], path: Any, title: str) -> None:
    labels = {
        SETTING_TEACHER: ("teacher", "teacher (EDM Heun)"),
        SETTING_1STEP: ("1-step", "CM"),
        SETTING_2STEP: ("2-step", "CM"),
    }
    points = []
    for name, entry in results.items():
        fid = entry["summary"]["fid"]
        if fid["median"] is not None:
            points.append(FidPoint(*labels[name], entry["nfe"], fid["median"], fid["min"], fid["max"]))
    save_fid_vs_nfe(points, path, title=title)


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
