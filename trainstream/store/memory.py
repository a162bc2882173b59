"""
A bounded in-memory history: the newest events, as many as fit in
``max_bytes`` (and at most ``max_events``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import cast

from twisted.internet.defer import Deferred, succeed

from trainstream.store import Page, downsample
from trainstream.store.cache import DEFAULT_CACHE_BYTES, RecentEvents
from trainstream.store.filter import Filter, Match, predicate
from trainstream.store.records import Point, Record, StoreHealth


class MemoryStore:
    """
    History in RAM only. It forgets its oldest events past ``max_bytes``
    (``--cache-mb``: each event counts as its JSON and a fixed overhead) or
    ``max_events``, and everything when the process ends, so each instance
    has a new epoch. It holds each event once, as its JSON.
    """

    def __init__(self, max_events: int = 100_000, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.epoch = uuid.uuid4().hex
        self._records = RecentEvents(max_bytes=max_bytes, max_records=max_events)
        self._last_id = 0
        # Ids below this were trimmed (not deleted on request): a client
        # resuming from before it has missed events.
        self._floor = 1

    def start(self) -> None:
        """Nothing to open."""

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def oldest_id(self) -> int:
        return self._floor

    def append(self, records: Sequence[Record]) -> Deferred[list[Record]]:
        """Kept at once (RAM is as durable as it gets)."""
        if not records:
            return succeed([])
        trimmed = self._records.extend(records)
        self._last_id = records[-1].id
        if trimmed:
            first = self._records.first_id
            self._floor = self._last_id + 1 if first is None else first
        return succeed(list(records))

    def after(self, after_id: int, match: Match, limit: int | None = None) -> list[Record]:
        out: list[Record] = []
        self._records.collect(after_id, predicate(match), limit, out)
        return out

    def after_cached(self, after_id: int, flt: Filter, limit: int) -> list[Record]:
        """All of it is in memory."""
        return self.after(after_id, flt, limit)

    def read_after(self, after_id: int, flt: Filter, limit: int) -> Deferred[Page]:
        """At once: there is no disk to wait for."""
        records = self.after(after_id, flt, limit)
        full = len(records) >= limit
        return succeed(Page(records, records[-1].id if full else max(after_id, self._last_id)))

    def segments(self) -> dict[tuple[str, str], tuple[int, int]]:
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for r in reversed(self._records):  # the newest of each series: one decode each
            if r.type == "metric" and r.name is not None and (r.run, r.name) not in out:
                out[(r.run, r.name)] = (r.segment, cast(int, r.event["step"]))
        return out

    def history(
        self,
        run: str,
        name: str,
        segment: int | None,
        from_step: int | None,
        to_step: int | None,
        max_points: int,
    ) -> tuple[list[Point], bool]:
        """The series' points, thinned like ``downsample``."""
        return downsample(self.series(run, name, from_step, to_step, segment), max_points)

    def series(
        self,
        run: str,
        name: str,
        from_step: int | None = None,
        to_step: int | None = None,
        segment: int | None = None,
    ) -> list[Point]:
        low = from_step if from_step is not None else 0
        high = to_step if to_step is not None else 2**63
        points: list[Point] = []
        for record in self._records:
            if (
                record.name == name
                and record.run == run
                and record.type == "metric"
                and (segment is None or record.segment == segment)
            ):
                event = record.event
                step = cast(int, event["step"])
                if low <= step <= high:
                    points.append((step, cast(float, event["value"]), cast(float, event["time"])))
        return points

    def delete_run(self, run: str) -> Deferred[int]:
        return succeed(self._records.keep(lambda r: r.run != run))

    def sync(self) -> Deferred[None]:
        return succeed(None)  # RAM is as durable as it gets

    def announce(self, urls: dict[str, str]) -> None:
        """Nothing to tell: no other server can share a memory history."""

    def close(self) -> None:
        """Nothing to release; the events stay, so a stopped server starts again with them."""

    def health(self) -> StoreHealth:
        return StoreHealth()
