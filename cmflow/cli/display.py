"""Live progress display and end-of-run summary (rich)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cmflow.engine.records import RunRecord

#: how often a run without a terminal (a Ray job's driver, CI) prints each running stage's progress
PROGRESS_EVERY_S = 15.0

STYLE = {
    "pending": "dim",
    "running": "yellow",
    "hit": "cyan",
    "done": "green",
    "failed": "red",
    "stopped": "magenta",
    "skipped": "dim",
}


def _bar(done: float, total: float, width: int = 20) -> str:
    if not total:
        return ""
    frac = max(0.0, min(1.0, done / total))
    filled = int(frac * width)
    return "█" * filled + "░" * (width - filled) + f" {frac * 100:3.0f}%"


def progress_text(progress: dict[str, Any], *, steps: bool = True) -> str:
    """One stage's latest progress in one format: ``step 400/2200 (18%), loss 0.5269, 1137 img/s`` for a
    training stage (its metrics), ``59% 300/512 images decoded`` for others (their message)."""
    done, total = progress.get("done", 0), progress.get("total", 0)
    metrics = progress.get("metrics") or {}
    numbers = [
        f"loss {metrics['loss']:.4f}" if isinstance(metrics.get("loss"), int | float) else "",
        f"{metrics['imgs_per_s']:.0f} img/s" if isinstance(metrics.get("imgs_per_s"), int | float) else "",
    ]
    numbers = [n for n in numbers if n]
    percent = f"{100 * max(0.0, min(1.0, done / total)):.0f}%" if total else ""
    if numbers:  # the stage's message says the same in words: show the numbers once
        head = f"step {done:.0f}/{total:.0f} ({percent})" if steps and total else ""
        return ", ".join([p for p in (head, *numbers) if p])
    message = str(progress.get("message") or "")
    if not steps:
        return message
    return " ".join(p for p in (percent, message or (f"{done:g}/{total:g}" if total else "")) if p)


def pipeline_order(record: RunRecord) -> list[str]:
    """The record's stages in dependency order (as ``cmflow run`` lists them), from its spec snapshot."""
    specs = (record.spec or {}).get("stages") or {}
    order: list[str] = []

    def visit(name: str, seen: set[str]) -> None:
        if name in order or name in seen or name not in record.stages:
            return
        for upstream in ((specs.get(name) or {}).get("inputs") or {}).values():
            visit(str(upstream), seen | {name})
        order.append(name)

    for name in [*specs, *record.stages]:
        visit(name, set())
    return order


def stage_table(
    record: RunRecord, progress: dict[str, dict[str, Any]] | None = None, *, final: bool = False
) -> Table:
    status = record.status
    if final and record.driver_gone():
        status = f"{status}, but its driver is gone — `cmflow resume {record.run_id}`"
    table = Table(title=f"{record.run_id} — {status}", title_justify="left", expand=False)
    table.add_column("stage")
    table.add_column("kind", style="dim")
    table.add_column("status")
    table.add_column("progress" if not final else "cache", no_wrap=True)
    table.add_column("time", justify="right")
    # wrapped at spaces between values, never inside one; a single value too long is cut with an ellipsis
    table.add_column("info" if not final else "result", overflow="ellipsis", max_width=60, min_width=16)
    now = time.time()
    for name in pipeline_order(record):
        srec = record.stages[name]
        prog = (progress or {}).get(name, {})
        if final:
            cache = {"hit": "hit", "done": "miss", "failed": "miss"}.get(srec.status, "")
            info = srec.error or _meta_summary(srec.meta)
            if srec.status == "running" and prog:  # `cmflow status` of a live run: its latest step
                info = progress_text(prog)
            column4 = cache
        else:
            column4 = _bar(prog.get("done", 0), prog.get("total", 0)) if srec.status == "running" else ""
            info = progress_text(prog, steps=False) if srec.status == "running" else (srec.error or "")
        seconds = srec.seconds
        if srec.status == "running" and srec.started_at:
            from datetime import datetime

            seconds = now - datetime.fromisoformat(srec.started_at).timestamp()
        table.add_row(
            name,
            srec.kind,
            f"[{STYLE.get(srec.status, '')}]{srec.status}[/]",
            column4,
            f"{seconds:.1f}s" if seconds else "",
            info,
        )
    return table


def _meta_summary(meta: dict[str, Any]) -> str:
    items = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in meta.items()
        if isinstance(v, int | float | str) and len(str(v)) < 24
    ]
    return " ".join(items[:5])


class LiveDisplay:
    """A listener for :func:`cmflow.engine.run_pipeline`: a live table on a terminal, lines otherwise."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live: Live | None = None
        self._last_status: dict[str, str] = {}
        self._last_line = 0.0

    def __enter__(self) -> LiveDisplay:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def __call__(self, record: RunRecord, progress: dict[str, dict[str, Any]]) -> None:
        if self.live is not None:
            self.live.update(stage_table(record, progress))
            return
        for name in pipeline_order(record):
            srec = record.stages[name]
            if self._last_status.get(name) != srec.status:
                self._last_status[name] = srec.status
                extra = (
                    f" ({srec.seconds:.1f}s)"
                    if srec.status in {"done", "failed", "stopped"} and srec.started_at
                    else ""
                )
                reason = f": {srec.error}" if srec.status == "failed" else ""
                print(f"[cmflow] {name}: {srec.status}{extra}{reason}", file=sys.stderr, flush=True)
        if progress and time.time() - self._last_line >= PROGRESS_EVERY_S:
            self._last_line = time.time()
            for name, prog in progress.items():
                if record.stages.get(name) and record.stages[name].status == "running":
                    print(f"[cmflow] {name}: {progress_text(prog)}", file=sys.stderr, flush=True)
