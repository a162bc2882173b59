"""
What the server knows of each run: state, hyperparameters, per-metric
summaries; stall detection and NaN alerts.

The registry is built only from published events (``Hub.observers``), so it
tells the same story as the event stream, and a client that replays the
stream can derive the same states:

- A run's state is the ``state`` of its latest status event. A run whose
  first event is not a status starts as ``running``.
- A metric event moves a ``created`` run to ``running``; a metric, log or
  hparams event moves a ``stalled`` run back to ``running``. These moves are
  derived only: no status event is published for them, since the event
  that caused them is already on the stream.
- A ``running`` or ``created`` run that sent no event (alerts do not count:
  they are about a run, not from it) for ``stall_after`` seconds of the
  server's clock is marked stalled by publishing
  ``{"type": "status", "state": "stalled", "message": "no event for N s"}``.
- The first non-finite value (NaN, Infinity, -Infinity) of each (run, metric
  name) publishes one ``{"type": "alert", "kind": "nan", "name": ...}``;
  an alert of kind ``nan`` already in the history counts as that one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from attrs import Factory, define
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from trainstream.events import STATES, non_finite_name
from trainstream.events.rules import MEDIA_TYPES
from trainstream.hub import Hub
from trainstream.store import Record, SeriesSummary
from trainstream.store.filter import Filter

_log = Logger()

#: States in which a run is expected to keep sending events.
WATCHED_STATES = frozenset({"running", "created"})
#: Event types that move a stalled run back to running.
_ALIVE_TYPES = frozenset({"metric", "log", "hparams"}) | MEDIA_TYPES
#: Steps a media index keeps per (run, type, name): the latest ones.
MAX_MEDIA_STEPS = 1000
#: The media types that have a name and steps, and their keys in a run's detail.
_MEDIA_KEYS = {"image": "images", "histogram": "histograms", "pr_curve": "pr_curves"}
#: The states a metric puts back to "running" (stalled: alive again; created: started).
_REVIVED_BY_METRIC = frozenset({"stalled", "created"})


@define
class MetricSummary:
    """
    One metric of one run. ``min`` and ``max`` are over finite values only
    (``None`` until there is one); ``count`` counts every value.
    """

    count: int = 0
    last_step: int | None = None
    last_value: float | None = None
    min: float | None = None
    max: float | None = None

    def add(self, step: int, value: float) -> None:
        self.count += 1
        self.last_step = step
        self.last_value = value
        if isinstance(value, float) and not math.isfinite(value):
            return
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def to_json(self) -> dict[str, object]:
        return {
            "count": self.count,
            "last_step": self.last_step,
            "last_value": self.last_value,
            "min": self.min,
            "max": self.max,
        }


@define
class MediaIndex:
    """
    One media series (the images, histograms or PR curves of one name):
    how many, and ``[step, id]`` of the latest ``MAX_MEDIA_STEPS``, so a
    page can list the steps and fetch one by id (``GET /api/events``).
    """

    count: int = 0
    steps: list[list[int]] = Factory(list)

    def add(self, step: int, event_id: int) -> None:
        self.count += 1
        steps = self.steps
        if steps and steps[-1][0] == step:
            steps[-1][1] = event_id  # the same step again: the newer one holds
            return
        while steps and steps[-1][0] > step:
            steps.pop()  # the steps went back (a checkpoint resumed): a new tail
        steps.append([step, event_id])
        if len(steps) > MAX_MEDIA_STEPS * 2:
            del steps[:-MAX_MEDIA_STEPS]

    def to_json(self) -> dict[str, object]:
        steps = self.steps[-MAX_MEDIA_STEPS:]
        return {
            "count": self.count,
            "last_step": steps[-1][0] if steps else None,
            "steps": [list(s) for s in steps],
        }


@define
class RunInfo:
    """
    What the registry keeps of one run.

    :ivar created: event time of its first event.
    :ivar updated: latest event time seen.
    :ivar last_step: step of its latest metric event.
    :ivar last_seen: the server clock's ``seconds()`` at its latest event
        (alerts excepted), for stall detection.
    """

    run: str
    state: str
    created: float
    updated: float
    last_seen: float
    last_step: int | None = None
    hparams: dict[str, object] = Factory(dict)
    metrics: dict[str, MetricSummary] = Factory(dict)
    #: ``(type, name)`` of each media series -> its index.
    media: dict[tuple[str, str], MediaIndex] = Factory(dict)
    #: The latest ``layout`` event's layout (custom scalars), if any.
    layout: dict[str, object] | None = None

    def summary(self) -> dict[str, object]:
        """The run as ``GET /api/runs`` lists it."""
        return {
            "run": self.run,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
            "last_step": self.last_step,
            "metrics": list(self.metrics),
        }

    def detail(self) -> dict[str, object]:
        """The run as ``GET /api/runs/{run}`` shows it."""
        return {
            "run": self.run,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
            "last_step": self.last_step,
            "hparams": dict(self.hparams),
            "metrics": {name: m.to_json() for name, m in self.metrics.items()},
            **self.media_detail(),
        }

    def media_detail(self) -> dict[str, object]:
        """``images``, ``histograms``, ``pr_curves`` (name -> index) and ``layout``."""
        out: dict[str, object] = {key: {} for key in _MEDIA_KEYS.values()}
        for (kind, name), index in self.media.items():
            cast(dict[str, object], out[_MEDIA_KEYS[kind]])[name] = index.to_json()
        out["layout"] = self.layout
        return out


class RunsService(Service):
    """
    The runs registry of one server. Watches every published batch
    (``Hub.observers``); while running, checks for stalled runs on a
    ``LoopingCall`` driven by ``clock``.

    :param clock: an ``IReactorTime`` (the server's reactor, or a ``Clock``).
    :param stall_after: seconds without an event before a run is stalled.
    :param check_interval: seconds between stall checks; by default a
        quarter of ``stall_after``, at most one second.
    """

    def __init__(
        self, hub: Hub, clock: Any, stall_after: float, check_interval: float | None = None
    ) -> None:
        self.hub = hub
        self.clock = clock
        self.stall_after = stall_after
        self.check_interval = (
            check_interval if check_interval is not None else min(1.0, stall_after / 4)
        )
        self._runs: dict[str, RunInfo] = {}
        self._nan_alerted: set[tuple[str, str]] = set()
        self._loop: LoopingCall | None = None
        #: Status ``stalled`` and ``nan`` alert events this registry published.
        self.stalls_total = 0
        self.nan_alerts_total = 0
        self._loaded = False
        hub.observers.append(self.observe)

    def load(self) -> None:
        """
        Know the runs a persistent history already holds, without alerting
        again (once, when the server starts: the store is open by then).
        """
        if self._loaded:
            return
        self._loaded = True
        registry = getattr(self.hub.store, "registry", None)
        if registry is None:
            self._apply_all(self.hub.store.after(0, lambda r: True), [])
        else:
            records, summaries = registry()
            self._apply_all(records, [])
            self._load_summaries(summaries)
            # The registry read leaves media out: their index comes from their events.
            self._apply_all(self.hub.store.after(0, Filter(types=tuple(MEDIA_TYPES))), [])

    # Service

    def startService(self) -> None:
        self.load()
        super().startService()  # type: ignore[no-untyped-call]
        loop = LoopingCall(self._check_logged)
        loop.clock = self.clock
        loop.start(self.check_interval, now=False)
        self._loop = loop

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()  # type: ignore[no-untyped-call]

    # Queries

    def get(self, run: str) -> RunInfo | None:
        return self._runs.get(run)

    def all(self) -> list[RunInfo]:
        """Every known run, in the order each was first seen."""
        return list(self._runs.values())

    def __len__(self) -> int:
        return len(self._runs)

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(sorted(STATES), 0)
        for info in self._runs.values():
            counts[info.state] = counts.get(info.state, 0) + 1
        return counts

    # Changes

    def observe(self, records: Sequence[Record]) -> list[dict[str, object]]:
        """Update the registry from a published batch; return the NaN alerts to publish."""
        alerts: list[dict[str, object]] = []
        self._apply_all(records, alerts)
        self.nan_alerts_total += len(alerts)
        return alerts

    def check_stalls(self) -> None:
        """Publish ``stalled`` for every watched run silent for ``stall_after`` s."""
        now = self.clock.seconds()
        events: list[dict[str, object]] = []
        for info in self._runs.values():
            silent = now - info.last_seen
            if info.state in WATCHED_STATES and silent >= self.stall_after:
                events.append(
                    {
                        "type": "status",
                        "run": info.run,
                        "state": "stalled",
                        "message": f"no event for {round(silent, 1):g} s",
                    }
                )
        if events:
            self.stalls_total += len(events)
            self.hub.accept(events)

    def _check_logged(self) -> None:
        try:
            self.check_stalls()
        except Exception:
            # Keep checking: one bad pass must not end stall detection.
            _log.failure("stall check failed")

    def delete(self, run: str) -> Deferred[int | None]:
        """
        Remove ``run``'s history from the store and forget it, once the
        delete is durable (until then the run is still listed).

        :return: fires with how many stored events were removed, or
            ``None`` if the run is neither known nor stored; fails with
            ``StoreError`` if the history could not do it.
        """
        known = run in self._runs

        def deleted(removed: int) -> int | None:
            self.hub.segments.forget(run)
            self.forget(run)
            return removed if known or removed else None

        return self.hub.store.delete_run(run).addCallback(deleted)

    def forget(self, run: str) -> None:
        self._runs.pop(run, None)
        self._nan_alerted = {key for key in self._nan_alerted if key[0] != run}

    def _load_summaries(self, summaries: Mapping[tuple[str, str], SeriesSummary]) -> None:
        """A persistent store's series summaries, in place of replaying every point."""
        now = self.clock.seconds()
        latest: dict[str, int] = {}
        for (run, name), s in sorted(summaries.items(), key=lambda kv: kv[1].last_id):
            info = self._runs.get(run)
            if info is None:
                info = RunInfo(
                    run, "running", created=s.last_time, updated=s.last_time, last_seen=now
                )
                self._runs[run] = info
            info.updated = max(info.updated, s.last_time)
            info.metrics[name] = MetricSummary(s.count, s.last_step, s.last_value, s.min, s.max)
            if s.last_id > latest.get(run, -1):
                latest[run] = s.last_id
                info.last_step = s.last_step
            if info.state == "created":
                info.state = "running"

    def _apply_all(self, records: Iterable[Record], alerts: list[dict[str, object]]) -> None:
        now = self.clock.seconds()
        runs = self._runs
        apply = self._apply
        # Most records are metrics of the run before them: those take this
        # loop, which does what _apply does for a metric (the tests compare
        # the two), with the run looked up once per stretch.
        last_run: str | None = None
        info: RunInfo | None = None
        for record in records:
            name = record.name
            if record.type != "metric" or name is None:
                apply(record, now, alerts)
                last_run = None
                continue
            event = record.event
            t = cast(float, event["time"])
            if record.run != last_run or info is None:
                last_run = record.run
                info = runs.get(last_run)
                if info is None:
                    info = RunInfo(last_run, "running", created=t, updated=t, last_seen=now)
                    runs[last_run] = info
            if t > info.updated:
                info.updated = t
            info.last_seen = now
            if info.state in _REVIVED_BY_METRIC:
                info.state = "running"
            step = cast(int, event["step"])
            value = cast(float, event["value"])
            info.last_step = step
            summary = info.metrics.get(name)
            if summary is None:
                summary = info.metrics[name] = MetricSummary()
            summary.add(step, value)
            if isinstance(value, float) and not -math.inf < value < math.inf:
                self._non_finite(record.run, name, step, value, alerts)

    def _apply(self, record: Record, now: float, alerts: list[dict[str, object]]) -> None:
        event = record.event
        kind = record.type
        time = cast(float, event["time"])
        info = self._runs.get(record.run)
        if info is None:
            state = cast(str, event["state"]) if kind == "status" else "running"
            info = RunInfo(record.run, state, created=time, updated=time, last_seen=now)
            self._runs[record.run] = info
        else:
            info.updated = max(info.updated, time)
        if kind == "alert":
            if event.get("kind") == "nan" and record.name is not None:
                self._nan_alerted.add((record.run, record.name))
            return
        info.last_seen = now
        if kind == "status":
            info.state = cast(str, event["state"])
            return
        if info.state == "stalled" and kind in _ALIVE_TYPES:
            info.state = "running"
        if kind == "hparams":
            info.hparams.update(cast(dict[str, object], event["params"]))
        elif kind in _MEDIA_KEYS and record.name is not None:
            key = (kind, record.name)
            index = info.media.get(key)
            if index is None:
                index = info.media[key] = MediaIndex()
            index.add(cast(int, event["step"]), record.id)
        elif kind == "layout":
            info.layout = cast(dict[str, object], event["layout"])
        elif kind == "metric":
            name = cast(str, record.name)
            step = cast(int, event["step"])
            value = cast(float, event["value"])
            if info.state == "created":
                info.state = "running"
            info.last_step = step
            summary = info.metrics.get(name)
            if summary is None:
                summary = info.metrics[name] = MetricSummary()
            summary.add(step, value)
            if isinstance(value, float) and not math.isfinite(value):
                self._non_finite(record.run, name, step, value, alerts)

    def _non_finite(
        self, run: str, name: str, step: int, value: float, alerts: list[dict[str, object]]
    ) -> None:
        """A metric went NaN or infinite: one ``nan`` alert per series, ever."""
        key = (run, name)
        if key not in self._nan_alerted:
            self._nan_alerted.add(key)
            alerts.append(
                {
                    "type": "alert",
                    "run": run,
                    "kind": "nan",
                    "name": name,
                    "message": f"{name} is {non_finite_name(value)} at step {step}",
                }
            )


__all__ = [
    "MAX_MEDIA_STEPS",
    "WATCHED_STATES",
    "MediaIndex",
    "MetricSummary",
    "RunInfo",
    "RunsService",
]
