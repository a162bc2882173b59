"""
What the monitor knows of the server, without Qt: the runs and their
states, each (run, metric) series of points, and the id of the last event
applied, so that a resumed stream never adds a point twice.

The widget feeds it events (from the SSE stream) and snapshots (from REST)
and draws what it marks dirty; tests read it directly.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import define, field

__all__ = ["MAX_POINTS", "MonitorModel", "RunInfo", "Series", "metric_value"]

#: Points kept per (run, metric): past this, the older half is thinned.
MAX_POINTS = 20_000

_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def metric_value(value: object) -> float | None:
    """A metric's JSON value as a float (``"NaN"``, ``"Infinity"``... too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return _SPECIAL.get(value)
    return None


@define
class RunInfo:
    """One run as the monitor shows it."""

    run: str
    state: str = "created"
    last_step: int | None = None
    updated: float | None = None  # the server's time of its last event
    metrics: set[str] = field(factory=set)
    message: str = ""


@define
class Series:
    """The points of one (run, metric): ``step -> value``, one point per step."""

    points: dict[int, float] = field(factory=dict)

    def add(self, step: int, value: float) -> None:
        self.points[step] = value
        if len(self.points) > MAX_POINTS:
            self._thin()

    def rewind(self, step: int) -> None:
        """The run went back to ``step``: points from there on are another branch."""
        for s in [s for s in self.points if s >= step]:
            del self.points[s]

    def arrays(self) -> tuple[list[int], list[float]]:
        """Steps in order and their values."""
        steps = sorted(self.points)
        return steps, [self.points[s] for s in steps]

    def _thin(self) -> None:
        steps = sorted(self.points)
        old = steps[: len(steps) // 2]
        for s in old[1::2]:
            del self.points[s]


class MonitorModel:
    """
    Runs, series and the stream position.

    :param runs: run name patterns (``*`` globs) the monitor shows.
    :ivar last_id: the id of the last event applied (``None``: none yet).
    :ivar duplicates: events handed in again (an id not above ``last_id``):
        dropped, and counted so that a broken resume shows.
    :ivar dirty: series changed since the widget last drew them.
    """

    def __init__(self, runs: Sequence[str] = ("*",)) -> None:
        self.patterns = tuple(runs) or ("*",)
        self.runs: dict[str, RunInfo] = {}
        self.series: dict[tuple[str, str], Series] = {}
        #: (run, metric) whose stored points were asked for (``load_runs``).
        self.loaded: set[tuple[str, str]] = set()
        self.last_id: int | None = None
        self.duplicates = 0
        self.events = 0
        self.dirty: set[tuple[str, str]] = set()
        self.runs_changed = False
        #: ``(run, name, from_step, to_step)`` the server folded away for a
        #: slow reader (``"coalesced": n``): the widget reloads them from REST.
        self.gaps: list[tuple[str, str, int, int]] = []
        #: Set by :meth:`clear`: the widget drops its charts before drawing again.
        self.cleared = False
        self.notice = ""

    def wants(self, run: str) -> bool:
        return any(fnmatch.fnmatchcase(run, p) for p in self.patterns)

    def clear(self) -> None:
        """Another history (a new epoch): forget everything."""
        self.dirty.clear()
        self.runs.clear()
        self.series.clear()
        self.loaded.clear()
        self.gaps.clear()
        self.last_id = None
        self.runs_changed = True
        self.cleared = True

    def points(self, run: str, name: str) -> tuple[list[int], list[float]]:
        series = self.series.get((run, name))
        return series.arrays() if series is not None else ([], [])

    def metric_names(self) -> list[str]:
        return sorted({name for _, name in self.series})

    # What the server says

    def load_runs(self, runs: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
        """
        ``GET /api/runs``: add or update each run. Returns the (run, metric)
        pairs whose stored points were not asked for yet in this history
        (whether or not the stream brought some of their points already:
        those it brought are the newest, the older ones come from REST).
        """
        missing = []
        for item in runs:
            name = item.get("run")
            if not isinstance(name, str) or not self.wants(name):
                continue
            info = self._run(name)
            state = item.get("state")
            if isinstance(state, str):
                info.state = state
            step = item.get("last_step")
            if isinstance(step, int):
                info.last_step = max(step, info.last_step or 0)
            updated = item.get("updated")
            if isinstance(updated, int | float):
                info.updated = float(updated)
            for metric in item.get("metrics") or ():
                if isinstance(metric, str):
                    info.metrics.add(metric)
                    if (name, metric) not in self.loaded:
                        self.loaded.add((name, metric))
                        missing.append((name, metric))
            self.runs_changed = True
        return missing

    def load_points(self, run: str, name: str, points: Iterable[Sequence[Any]]) -> None:
        """``GET /api/runs/{run}/metrics/{name}``: ``[[step, value, time], ...]``."""
        series = self._series(run, name)
        for point in points:
            if len(point) < 2 or not isinstance(point[0], int):
                continue
            value = metric_value(point[1])
            if value is not None:
                series.add(point[0], value)
        self.dirty.add((run, name))

    def apply(self, event: Mapping[str, Any]) -> bool:
        """One event of the stream; ``False`` if it was one already applied."""
        event_id = event.get("id")
        if isinstance(event_id, int):
            if self.last_id is not None and event_id <= self.last_id:
                self.duplicates += 1
                return False
            self.last_id = event_id
        self.events += 1
        run = event.get("run")
        if not isinstance(run, str) or not self.wants(run):
            return True
        kind = event.get("type")
        time = event.get("time")
        info = self._run(run)
        if isinstance(time, int | float):
            info.updated = float(time)
        if kind == "metric":
            name, step = event.get("name"), event.get("step")
            value = metric_value(event.get("value"))
            if isinstance(name, str) and isinstance(step, int) and value is not None:
                series = self._series(run, name)
                folded = event.get("coalesced")
                if isinstance(folded, int) and folded > 0:
                    before = max(series.points, default=-1)
                    if before + 1 <= step - 1:
                        self.gaps.append((run, name, before + 1, step - 1))
                series.add(step, value)
                self.dirty.add((run, name))
                if name not in info.metrics:
                    info.metrics.add(name)
                info.last_step = step if info.last_step is None else max(info.last_step, step)
        elif kind == "status":
            state = event.get("state")
            if isinstance(state, str):
                info.state = state
            message = event.get("message")
            info.message = message if isinstance(message, str) else ""
            rewind = event.get("rewind_to")
            if isinstance(rewind, int):
                for (r, name), series in self.series.items():
                    if r == run:
                        series.rewind(rewind)
                        self.dirty.add((r, name))
                info.last_step = rewind
        elif kind == "alert":
            message = event.get("message")
            info.message = f"alert: {message}" if isinstance(message, str) else "alert"
        self.runs_changed = True
        return True

    def reset(self, reason: str, oldest_id: int | None) -> None:
        """
        The server no longer holds the events after our id: what it replays
        starts at ``oldest_id``. Points already shown stay; some are missing.
        """
        self.last_id = oldest_id - 1 if isinstance(oldest_id, int) else None
        self.notice = f"history reset by the server: {reason}"

    def _run(self, run: str) -> RunInfo:
        info = self.runs.get(run)
        if info is None:
            info = self.runs[run] = RunInfo(run)
            self.runs_changed = True
        return info

    def _series(self, run: str, name: str) -> Series:
        series = self.series.get((run, name))
        if series is None:
            series = self.series[(run, name)] = Series()
            self._run(run).metrics.add(name)
        return series
