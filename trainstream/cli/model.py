"""
What ``watch`` shows (:class:`WatchModel`): runs, their state and the latest
points of their metrics, fed REST snapshots and stream events in one thread.
Pure: no I/O, unit-tested on synthetic events.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainstream.client.sse import Reset
from trainstream.events import NON_FINITE, non_finite_name

__all__ = [
    "SPARK_LEN",
    "RunView",
    "Series",
    "Snapshot",
    "WatchModel",
    "choose_columns",
    "format_value",
    "matches_any",
    "to_float",
]

#: Points kept per series, for its sparkline.
SPARK_LEN = 30


def to_float(value: object) -> float | None:
    """A metric value: a JSON number or one of "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return NON_FINITE.get(value)
    return None


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return non_finite_name(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.5g}"


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@dataclass
class Series:
    """The latest values of one (run, metric), for the value and its sparkline."""

    points: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=SPARK_LEN))
    last_step: int | None = None
    last_value: float | None = None

    def add(self, step: int, value: float) -> None:
        if self.last_step is not None and step < self.last_step:
            self.points.clear()  # resumed from a checkpoint: a new segment
        self.points.append((step, value))
        self.last_step, self.last_value = step, value

    def holds(self, step: int, value: float) -> bool:
        return any(s == step and _same(v, value) for s, v in self.points)


@dataclass
class RunView:
    run: str
    state: str = "created"
    updated: float | None = None
    last_step: int | None = None
    epoch: int | None = None
    rewind_to: int | None = None
    alerts: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Series] = field(default_factory=dict)


@dataclass
class Snapshot:
    """
    What REST said: ``last_id`` is health's before the reads (the stream
    resumes after it), ``boundary`` health's after them (events up to it may
    already be in ``runs``).
    """

    last_id: int
    boundary: int
    epoch: object
    runs: list[RunView]


class WatchModel:
    """The state ``watch`` shows; fed snapshots and events, in one thread."""

    def __init__(self, spark_len: int = SPARK_LEN, messages: int = 5) -> None:
        self.spark_len = spark_len
        self.runs: dict[str, RunView] = {}
        self.last_id: int | None = None
        self.boundary = 0
        self.loaded = False
        self.messages: deque[str] = deque(maxlen=messages)

    def load(self, snapshot: Snapshot) -> None:
        self.runs = {view.run: view for view in snapshot.runs}
        for view in self.runs.values():
            for series in view.metrics.values():
                series.points = deque(series.points, maxlen=self.spark_len)
        self.last_id = snapshot.last_id
        self.boundary = snapshot.boundary
        self.loaded = True

    def reset(self, reset: Reset) -> None:
        self.note(f"reset: {reset.reason}")

    def note(self, text: str) -> None:
        self.messages.append(text)

    def _series(self, view: RunView, name: str) -> Series:
        series = view.metrics.get(name)
        if series is None:
            series = view.metrics[name] = Series(deque(maxlen=self.spark_len))
        return series

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one event; ``False`` for one already applied (by id or snapshot)."""
        event_id = event.get("id")
        if isinstance(event_id, int):
            if self.last_id is not None and event_id <= self.last_id:
                return False
            self.last_id = event_id
        run = event.get("run")
        kind = event.get("type")
        if not isinstance(run, str):
            return False
        view = self.runs.get(run)
        if view is None:
            view = self.runs[run] = RunView(run)
        when = event.get("time")
        if isinstance(when, int | float):
            view.updated = max(view.updated or 0.0, float(when))
        in_snapshot = isinstance(event_id, int) and event_id <= self.boundary
        if kind == "metric":
            value = to_float(event.get("value"))
            step = event.get("step")
            name = event.get("name")
            if value is None or not isinstance(step, int) or not isinstance(name, str):
                return False
            series = self._series(view, name)
            if in_snapshot and series.holds(step, value):
                return False
            series.add(step, value)
            view.last_step = step
            if view.state in ("created", "stalled"):
                view.state = "running"
        elif kind == "status":
            state = event.get("state")
            if isinstance(state, str):
                view.state = state
            if isinstance(event.get("epoch"), int):
                view.epoch = event["epoch"]
            if isinstance(event.get("rewind_to"), int):
                view.rewind_to = event["rewind_to"]
                self.note(f"{run}: resumed from a checkpoint at step {view.rewind_to}")
            elif state in ("failed", "stalled") and event.get("message"):
                self.note(f"{run}: {state}: {event['message']}")
        elif kind == "alert":
            view.alerts += 1
            if not in_snapshot:
                self.note(f"{run}: alert {event.get('kind', '')}: {event.get('message', '')}")
        elif kind in ("log", "hparams"):
            if view.state == "stalled":
                view.state = "running"
            if kind == "hparams" and isinstance(event.get("params"), dict):
                view.hparams.update(event["params"])
            if kind == "log" and event.get("level") in ("warning", "error"):
                self.note(f"{run}: {event['level']}: {event.get('message', '')}")
        return True

    def columns(self, limit: int, name_globs: Sequence[str] = ()) -> list[str]:
        """The metric names to show: the most common across runs, matching the globs."""
        return choose_columns((list(v.metrics) for v in self.runs.values()), limit, name_globs)


def choose_columns(
    names_per_run: Iterable[Iterable[str]], limit: int, name_globs: Sequence[str] = ()
) -> list[str]:
    counts: Counter[str] = Counter()
    for names in names_per_run:
        counts.update(set(names))
    picked = [n for n in counts if not name_globs or matches_any(n, name_globs)]
    picked.sort(key=lambda n: (-counts[n], n))
    return picked[: max(0, limit)]


def matches_any(name: str, globs: Sequence[str]) -> bool:
    return any(g == "*" or fnmatch.fnmatchcase(name, g) for g in globs)
