"""
The ``watch`` screen: the model (:mod:`trainstream.cli.model`) as a rich
renderable, a header with the connection's state, a table of runs with
their latest values and sparklines, and recent notes. Pure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trainstream.cli.model import WatchModel, format_value
from trainstream.client.sse import ConnState

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["format_age", "header_text", "render", "sparkline"]

SPARK_GLYPHS = "▁▂▃▄▅▆▇█"
_STATE_STYLES = {
    "running": "bold green",
    "created": "cyan",
    "paused": "yellow",
    "finished": "blue",
    "failed": "bold red",
    "stalled": "bold magenta",
}


def sparkline(values: Sequence[float]) -> str:
    """``▁▂▃▄▅▆▇█`` scaled to the finite values; ``!`` for NaN or an infinity."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "!" * len(values)
    lo, hi = min(finite), max(finite)
    top = len(SPARK_GLYPHS) - 1
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append("!")
        elif hi == lo:
            out.append(SPARK_GLYPHS[top // 2])
        else:
            out.append(SPARK_GLYPHS[round((v - lo) / (hi - lo) * top)])
    return "".join(out)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h"
    return f"{seconds // 86400:.0f}d"


def header_text(url: str, state: ConnState, model: WatchModel, now_monotonic: float) -> Any:
    from rich.text import Text

    text = Text()
    text.append("trainstream ", style="bold")
    text.append(url, style="dim")
    text.append("  ")
    if state.status == "connected":
        text.append("● connected", style="green")
    elif state.status == "reconnecting":
        wait = max(0.0, (state.retry_at or now_monotonic) - now_monotonic)
        text.append(f"◌ reconnecting in {wait:.1f}s", style="yellow")
        if state.detail:
            text.append(f" ({state.detail})", style="yellow dim")
    elif state.status == "stopped":
        text.append("■ stopped", style="red")
    else:
        text.append("◌ connecting", style="yellow")
    last = model.last_id
    text.append(f"  last id {last if last is not None else '-'}", style="dim")
    text.append(f"  {len(model.runs)} run{'s' if len(model.runs) != 1 else ''}", style="dim")
    return text


def render(
    model: WatchModel,
    state: ConnState,
    url: str,
    columns: Sequence[str],
    now: float | None = None,
    now_monotonic: float | None = None,
    max_rows: int = 40,
    width: int = 120,
) -> RenderableType:
    """The whole screen: header, runs table, recent notes; ``width`` sizes the sparklines."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    now_monotonic = time.monotonic() if now_monotonic is None else now_monotonic
    views = sorted(model.runs.values(), key=lambda v: (-(v.updated or 0.0), v.run))[:max_rows]
    run_width = min(32, max((len(v.run) for v in views), default=3))
    # run, state (+ alerts), age, step, with padding; a metric needs 12 (value)
    # and then gets up to spark_len + 1 for its sparkline.
    avail = width - (run_width + 2 + 14 + 6 + 9)
    hidden = list(columns)
    columns = list(columns)
    while columns and avail // len(columns) < 12:
        columns.pop()
    hidden = hidden[len(columns) :]
    spark = max(0, min(model.spark_len, avail // max(1, len(columns)) - 13))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    table.add_column("run", style="bold", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("state", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    for name in columns:
        table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=11 + spark + 1)
    for view in views:
        state_text = Text(view.state, style=_STATE_STYLES.get(view.state, ""))
        if view.alerts:
            state_text.append(f" ⚠{view.alerts}", style="red")
        age = format_age(now - view.updated if view.updated is not None else None)
        step = "-" if view.last_step is None else str(view.last_step)
        cells: list[Any] = [view.run, state_text, age, step]
        for name in columns:
            series = view.metrics.get(name)
            if series is None or series.last_value is None:
                cells.append(Text(""))
                continue
            value = series.last_value
            cell = Text(format_value(value), style="" if math.isfinite(value) else "bold red")
            if spark:
                values = [v for _, v in series.points][-spark:]
                cell.append(" ")
                cell.append(sparkline(values), style="cyan")
            cells.append(cell)
        table.add_row(*cells)
    parts: list[Any] = [header_text(url, state, model, now_monotonic)]
    if not model.loaded:
        parts.append(Text("loading…", style="dim"))
    elif not views:
        parts.append(Text("no runs yet", style="dim"))
    else:
        parts.append(table)
        if len(model.runs) > max_rows:
            parts.append(Text(f"… and {len(model.runs) - max_rows} more runs", style="dim"))
        if hidden:
            parts.append(Text(f"not shown (too narrow): {', '.join(hidden)}", style="dim"))
    for message in model.messages:
        parts.append(Text(message, style="dim"))
    return Group(*parts)
