"""
Distributed training: the ranks of one run, side by side.

The processes of a distributed run (``rank`` 0, 1, ...) publish metric events
with the same run and name and their own ``rank``. Like the runs registry,
this service is built only from published events (``Hub.observers``); it
keeps, per (run, name) and per rank, the latest ``(step, value)``, and:

- **Aggregates.** Once every known rank of a (run, name) has reported a
  step, it publishes three metric events for that step, without ``rank``,
  named after the metric with a suffix: ``train/loss:mean``,
  ``train/loss:min``, ``train/loss:max`` (``:`` is in the name alphabet,
  ``@`` is not). They are ordinary metric events: filters (``name=
  train/loss:*``), the run's summaries and ``GET /api/runs/{run}/metrics/
  train/loss:mean`` all work on them. Nothing is aggregated while fewer than
  ``min_ranks`` (default 2) ranks are known, so a run that is not
  distributed, or whose other ranks have not started yet, is not tripled. A
  metric name longer than 251 characters (its aggregates would pass the
  256-character limit) is aggregated for ``GET /api/runs/{run}/ranks`` only.
  A NaN among the values makes mean, min and max NaN; otherwise infinities
  count as numbers (``+inf`` and ``-inf`` together: mean NaN).
- **Pending steps.** A step is kept until it is complete; when a step
  completes, every older pending step of the series is dropped (a rank
  skipped it: it cannot complete), and at most ``max_pending`` steps are
  kept per series (the oldest go first), so a rank that died costs bounded
  memory. A rank whose step goes back (checkpoint resume) withdraws its
  values for the steps from there on; a step completes with the values the
  ranks gave after their rewinds. A step that completes again (every rank
  sent it again) is published again.
- **Lagging ranks.** A rank is *behind* on a metric when its latest step is
  more than ``lag_steps`` (default 100) below the highest latest step of
  any rank of that (run, name). When it falls behind, one ``alert`` is
  published: ``{"kind": "rank_behind", "name": "train/loss", "message":
  "rank 3 is 250 steps behind on train/loss"}``; no other until it has
  caught up (within ``lag_steps``) and falls behind again.

On start the service replays a memory history (without publishing: what
it would publish is already there); a persistent history (one with a
``registry``) is not scanned, and the ranks are known again as they report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import cast

from attrs import Factory, define
from twisted.application.service import Service

from trainstream.events import MAX_NAME_LENGTH
from trainstream.hub import Hub
from trainstream.store import Record

#: ``name + AGGREGATE_SEP + stat`` names the aggregate events of ``name``.
AGGREGATE_SEP = ":"
STATS = ("mean", "min", "max")
_SUFFIX_ROOM = len(AGGREGATE_SEP) + max(len(s) for s in STATS)


def aggregate_name(name: str, stat: str) -> str:
    """The name of the ``stat`` (``mean``, ``min``, ``max``) aggregate of ``name``."""
    return f"{name}{AGGREGATE_SEP}{stat}"


def aggregate(values: Iterable[float]) -> tuple[float, float, float]:
    """
    ``(mean, min, max)`` of at least one value. A NaN makes all three NaN
    (``min``/``max`` of Python would depend on the order); the mean of
    finite values is exact-summed (``math.fsum``), so it does not depend on
    the order of the ranks either.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("aggregate of no values")
    if any(math.isnan(v) for v in vals):
        return math.nan, math.nan, math.nan
    low, high = min(vals), max(vals)
    if math.isinf(low) or math.isinf(high):
        if low == -math.inf and high == math.inf:
            mean = math.nan
        else:
            mean = low if math.isinf(low) else high
    else:
        try:
            mean = math.fsum(vals) / len(vals)
        except OverflowError:  # the sum passes the largest float; the mean does not
            # Scale by a power of two no smaller than the count (exact but for
            # subnormals): the scaled sum then fits, and so does the mean.
            scale = 2.0 ** math.ceil(math.log2(len(vals)))
            mean = math.fsum(v / scale for v in vals) / len(vals) * scale
            mean = min(max(mean, low), high)  # rounding must not leave the range
    return mean, low, high


@define
class RankedSeries:
    """
    One metric of one run, per rank.

    :ivar last: rank -> its latest ``(step, value)``.
    :ivar pending: step -> rank -> value, for steps not every rank reported.
    :ivar complete: the latest complete step and its ``(mean, min, max)``.
    :ivar lead: the highest latest step of any rank.
    :ivar behind: ranks currently flagged as behind (alerted).
    """

    last: dict[int, tuple[int, float]] = Factory(dict)
    pending: dict[int, dict[int, float]] = Factory(dict)
    complete: tuple[int, float, float, float] | None = None
    lead: int = -1
    behind: set[int] = Factory(set)

    def to_json(self) -> dict[str, object]:
        step, mean, low, high = self.complete if self.complete is not None else (None,) * 4
        return {
            "step": step,
            "mean": mean,
            "min": low,
            "max": high,
            "by_rank": {str(r): [s, v] for r, (s, v) in sorted(self.last.items())},
        }


class RanksService(Service):
    """
    The ranks of every distributed run of one server: watches every
    published batch (``Hub.observers``) and publishes aggregates and
    ``rank_behind`` alerts (see the module's docstring).

    :param lag_steps: how many steps a rank may trail the leading rank of a
        metric before it is behind.
    :param min_ranks: ranks a metric needs before its steps are aggregated.
    :param max_pending: incomplete steps kept per (run, name).
    """

    def __init__(
        self,
        hub: Hub,
        lag_steps: int = 100,
        min_ranks: int = 2,
        max_pending: int = 1000,
    ) -> None:
        self.hub = hub
        self.lag_steps = lag_steps
        self.min_ranks = max(1, min_ranks)
        self.max_pending = max(1, max_pending)
        self._series: dict[str, dict[str, RankedSeries]] = {}
        #: Aggregate metric events and ``rank_behind`` alerts published.
        self.aggregates_total = 0
        self.behind_alerts_total = 0
        self._loaded = False
        hub.observers.append(self.observe)

    def load(self) -> None:
        """Know the ranks a memory history already holds (once, at start)."""
        if self._loaded:
            return
        self._loaded = True
        if getattr(self.hub.store, "registry", None) is None:
            self._apply_all(self.hub.store.after(0, _ranked), None)

    # Service

    def startService(self) -> None:
        self.load()
        super().startService()  # type: ignore[no-untyped-call]

    # Queries

    def series(self, run: str, name: str) -> RankedSeries | None:
        return self._series.get(run, {}).get(name)

    def snapshot(self, run: str) -> dict[str, object]:
        """The run as ``GET /api/runs/{run}/ranks`` shows it."""
        metrics = self._series.get(run, {})
        ranks: set[int] = set()
        behind: list[dict[str, object]] = []
        for name, s in metrics.items():
            ranks.update(s.last)
            for rank in sorted(s.behind):
                step = s.last[rank][0]
                behind.append(
                    {
                        "rank": rank,
                        "name": name,
                        "step": step,
                        "lead_step": s.lead,
                        "behind_by": s.lead - step,
                    }
                )
        return {
            "run": run,
            "ranks": sorted(ranks),
            "metrics": {name: s.to_json() for name, s in metrics.items()},
            "behind": behind,
        }

    # Changes

    def observe(self, records: Sequence[Record]) -> list[dict[str, object]]:
        """Update from a published batch; return the aggregates and alerts to publish."""
        out: list[dict[str, object]] = []
        self._apply_all(records, out)
        return out

    def forget(self, run: str) -> None:
        """Drop what is known of ``run`` (its history was deleted)."""
        self._series.pop(run, None)

    def _apply_all(self, records: Iterable[Record], out: list[dict[str, object]] | None) -> None:
        for record in records:
            if _ranked(record):
                self._apply(record, out)

    def _apply(self, record: Record, out: list[dict[str, object]] | None) -> None:
        event = record.event
        run, name = record.run, cast(str, record.name)
        rank = cast(int, event["rank"])
        step = cast(int, event["step"])
        value = float(cast(float, event["value"]))
        series = self._series.setdefault(run, {}).get(name)
        if series is None:
            series = self._series[run][name] = RankedSeries()
        previous = series.last.get(rank)
        if previous is not None and step < previous[0]:
            # A rewind: this rank's values from ``step`` on are stale.
            for s in [s for s in series.pending if s >= step]:
                series.pending[s].pop(rank, None)
                if not series.pending[s]:
                    del series.pending[s]
        series.last[rank] = (step, value)
        self._aggregate(record, series, step, rank, value, out)
        self._check_behind(record, series, rank, previous, out)

    def _aggregate(
        self,
        record: Record,
        series: RankedSeries,
        step: int,
        rank: int,
        value: float,
        out: list[dict[str, object]] | None,
    ) -> None:
        values = series.pending.setdefault(step, {})
        values[rank] = value
        if len(series.last) < self.min_ranks or not values.keys() >= series.last.keys():
            if len(series.pending) > self.max_pending:
                for s in sorted(series.pending)[: len(series.pending) - self.max_pending]:
                    del series.pending[s]
            return
        mean, low, high = aggregate(values.values())
        series.complete = (step, mean, low, high)
        for s in [s for s in series.pending if s <= step]:
            del series.pending[s]
        name = cast(str, record.name)
        if out is None or len(name) + _SUFFIX_ROOM > MAX_NAME_LENGTH:
            return
        for stat, number in zip(STATS, (mean, low, high), strict=True):
            out.append(
                {
                    "type": "metric",
                    "run": record.run,
                    "time": record.event["time"],
                    "name": aggregate_name(name, stat),
                    "step": step,
                    "value": number,
                }
            )
        self.aggregates_total += 3

    def _check_behind(
        self,
        record: Record,
        series: RankedSeries,
        rank: int,
        previous: tuple[int, float] | None,
        out: list[dict[str, object]] | None,
    ) -> None:
        step = series.last[rank][0]
        if step > series.lead:
            series.lead = step
            check: Iterable[int] = list(series.last)  # the lead moved: everyone
        elif previous is not None and previous[0] == series.lead and step < previous[0]:
            series.lead = max(s for s, _ in series.last.values())
            check = list(series.last)  # the leader went back
        else:
            check = (rank,)
        name = cast(str, record.name)
        for r in check:
            behind_by = series.lead - series.last[r][0]
            if behind_by <= self.lag_steps:
                series.behind.discard(r)
                continue
            if r in series.behind:
                continue
            series.behind.add(r)
            if out is None:
                continue
            self.behind_alerts_total += 1
            out.append(
                {
                    "type": "alert",
                    "run": record.run,
                    "time": record.event["time"],
                    "kind": "rank_behind",
                    "name": name,
                    "message": f"rank {r} is {behind_by} steps behind on {name}",
                }
            )


def _ranked(record: Record) -> bool:
    return record.type == "metric" and "rank" in record.event


__all__ = [
    "AGGREGATE_SEP",
    "STATS",
    "RankedSeries",
    "RanksService",
    "aggregate",
    "aggregate_name",
]
