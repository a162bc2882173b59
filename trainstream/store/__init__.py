"""
Where events are kept: one interface, :class:`Store`, and the values it
speaks in (``records.py``; ``filter.py``: which events a reader wants).

    memory.py   MemoryStore: the newest events in RAM (``cache.py`` holds them)
    sqlite.py   SQLiteStore: a history file, as the reactor thread sees it
    schema.py   the file's tables, indexes and migrations
    feeder.py   the writer thread: batches to the writer process, restarts it
    writer.py   the writer process: inserts, rollups, commits
    rows.py     records to rows and back
    reads.py    reads of the file, through its indexes
    rollup.py   multi-resolution rollups of metric series
    lock.py     one server per file
    service.py  StoreService (start, then sync and close), RetentionService

Also the one pure function every store's metric history goes through before
it reaches a client, :func:`downsample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred

from trainstream.store.filter import Filter, Match
from trainstream.store.records import Point, Record, SeriesSummary, StoreHealth


@frozen
class Page:
    """
    What one read (``Store.read_after``) found: ``records``, in id order,
    are every matching visible event with ``after_id < id <= upto``, so
    the next read goes on after ``upto``, not after the last record.
    """

    records: list[Record]
    upto: int


class Store(Protocol):
    """What the Hub, the runs registry and the REST API need of a history."""

    @property
    def epoch(self) -> str:
        """This history's identity: a client holding ids of another epoch starts over."""

    @property
    def last_id(self) -> int:
        """The id of the newest stored event, 0 when there is none."""

    @property
    def oldest_id(self) -> int:
        """
        Every event the history was given with an id from this one on is
        still held, unless a client deleted its run; ids below it were
        trimmed. ``last_id + 1`` when nothing was ever trimmed from an empty
        history.
        """

    def append(self, records: Sequence[Record]) -> Deferred[list[Record]]:
        """
        Keep ``records`` (ids strictly above ``last_id``, in order). Fires,
        in append order, once they are as durable as this store gets, with
        those that were kept; only from then on do readers (``after``) see
        them. Never fails: ``sync()`` tells publishers what was not kept.
        """

    def start(self) -> None:
        """
        Open the history (no constructor does I/O); again after ``close()``.

        :raises trainstream.errors.StoreError: naming the history and what to
            do; the store is then left closed.
        """

    def after(self, after_id: int, match: Match, limit: int | None = None) -> list[Record]:
        """
        Stored (durable) records with id above ``after_id`` that ``match``, in id
        order, at most ``limit``. A :class:`Filter` may be answered from
        indexes: its cost need not grow with the history it does not match.
        It may read the disk in the calling thread: the reactor thread uses
        it only at start, or where ``after_cached`` says it need not.
        """

    def after_cached(self, after_id: int, flt: Filter, limit: int) -> list[Record] | None:
        """
        ``after(after_id, flt, limit)`` from memory alone (cheap, for the
        reactor thread), or ``None`` when the answer needs the disk.
        """

    def read_after(self, after_id: int, flt: Filter, limit: int) -> Deferred[Page]:
        """
        Up to ``limit`` visible records after ``after_id`` that ``flt``
        matches, read off the reactor thread (the disk is never waited on
        there); only what was visible when it was asked, and after that what
        memory still holds. Fires with the :class:`Page`; fails with
        ``StoreError`` if the history cannot be read or is closed first.
        """

    def series(
        self,
        run: str,
        name: str,
        from_step: int | None = None,
        to_step: int | None = None,
        segment: int | None = None,
    ) -> list[Point]:
        """
        The stored points of metric ``name`` of ``run`` with ``from_step <=
        step <= to_step`` (either bound may be ``None``), in id order; only
        those of ``segment`` unless it is ``None``.
        """

    def segments(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Each stored series' (run, name) -> (current segment, last step)."""

    def history(
        self,
        run: str,
        name: str,
        segment: int | None,
        from_step: int | None,
        to_step: int | None,
        max_points: int,
    ) -> tuple[list[Point], bool]:
        """
        The points of a series (``segment`` ``None`` for all), at most
        ``max_points``, thinned without hiding a spike (see ``downsample``);
        and whether any were dropped.
        """

    def delete_run(self, run: str) -> Deferred[int]:
        """
        Forget every stored event of ``run`` (after those appended before);
        fires with how many there were once that is durable.
        """

    def sync(self) -> Deferred[None]:
        """Fires once every event appended so far is durable (as durable as this store gets)."""

    def close(self) -> None:
        """Make durable what was appended, then release what the store holds open."""

    def health(self) -> StoreHealth:
        """How the store is doing now (cheap: never waits on the disk)."""

    def announce(self, urls: dict[str, str]) -> None:
        """Say where the server using this store listens (to a server refused its file)."""


def _max_key(value: float) -> tuple[int, float]:
    # NaN ranks above +Infinity: a bucket holding a NaN shows it as its maximum.
    return (1, 0.0) if math.isnan(value) else (0, value)


def downsample(points: Sequence[Point], max_points: int) -> tuple[list[Point], bool]:
    """
    Sort ``points`` by step (stable) and, if there are more than
    ``max_points``, thin them without hiding a spike.

    The step range is cut into ``max_points // 2`` equal buckets, bucket
    ``(step - first_step) * buckets // (last_step - first_step + 1)``; each
    bucket keeps its point of minimum value and its point of maximum value
    (the first of equals; one point when they are the same). NaN counts as
    above every number, so a bucket holding a NaN keeps one.

    :param max_points: at least 2.
    :return: the points in step order, and whether any were dropped.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    ordered = sorted(points, key=lambda p: p[0])
    if len(ordered) <= max_points:
        return ordered, False
    buckets = max_points // 2
    first = ordered[0][0]
    span = ordered[-1][0] - first + 1
    out: list[Point] = []
    bucket = -1
    low = high = 0
    for i, point in enumerate(ordered):
        b = (point[0] - first) * buckets // span
        if b != bucket:
            if bucket >= 0:
                out.extend(ordered[j] for j in sorted({low, high}))
            bucket, low, high = b, i, i
            continue
        if _max_key(point[1]) < _max_key(ordered[low][1]):
            low = i
        if _max_key(point[1]) > _max_key(ordered[high][1]):
            high = i
    out.extend(ordered[j] for j in sorted({low, high}))
    return out, True


__all__ = [
    "Filter",
    "Match",
    "Page",
    "Point",
    "Record",
    "SeriesSummary",
    "Store",
    "StoreHealth",
    "downsample",
]
