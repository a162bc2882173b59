"""
The durable history: SQLite in WAL mode, written off the reactor thread.

The reactor never waits on disk for a write: ``append`` hands records to the
writer thread (``feeder.py``), which has the writer process (``writer.py``)
commit whatever has queued up in one transaction, then tells the reactor how
far it got, and ``sync()`` Deferreds fire. An event is acknowledged (REST
200, WebSocket ``ack``, ``flush()``) only once committed, so a crash of the
process loses nothing acknowledged.

The newest events also stay in memory (``cache_events``), so live clients,
short replays and the runs registry rarely touch the disk; reads of the file
(``reads.py``) go through indexes, so a filter that matches nothing costs no
more on a long history than on a short one.

Constructing a store does nothing: ``start()`` takes the file (one server
process owns it at a time: an exclusive ``flock`` on ``PATH.lock`` holding
the owner's pid; a second server is refused with an error naming the file
and that pid), opens and migrates it (``schema.py``), and starts the writer;
``close()`` commits what is queued, stops the writer and releases the file.
A store may be started again after ``close()``; one whose ``start()`` failed
is left closed. ``service.StoreService`` does both as a Twisted service.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred, succeed

from trainstream.errors import StoreError
from trainstream.store import reads
from trainstream.store.cache import RecentEvents
from trainstream.store.feeder import Feeder, WriterStats
from trainstream.store.filter import Filter, Match
from trainstream.store.lock import FileLock
from trainstream.store.records import Point, Record, SeriesSummary, StoreHealth
from trainstream.store.rows import decode
from trainstream.store.schema import migrate, read_meta
from trainstream.store.writer import connect


@frozen
class _Open:
    """What an open history holds: the file, its lock, its writer."""

    db: sqlite3.Connection
    lock: FileLock
    feeder: Feeder


class SQLiteStore:
    """
    History in a SQLite file. Ids keep counting across restarts (the
    highest id ever given is kept in ``meta``, so deleting the newest events
    never lets an id be reused).
    """

    def __init__(
        self,
        path: str,
        call_from_thread: Callable[..., object],
        cache_events: int = 100_000,
    ) -> None:
        self.path = path
        self._call_from_thread = call_from_thread
        self._cache_events = cache_events
        self._open: _Open | None = None
        self._epoch: str | None = None
        self._last_id = 0
        self._floor = 1
        self._cache = RecentEvents(cache_events)
        self._appended = 0  # highest id handed to the writer
        self._done = 0  # highest id the writer is done with: committed, or given up (lost)
        # sync() callers: (what was done when it was called, the id it waits
        # for, its Deferred); and the id ranges given up, to fail theirs.
        self._waiters: list[tuple[int, int, Deferred[None]]] = []
        self._lost: list[tuple[int, int, str]] = []
        self._trims: list[Deferred[int]] = []
        self._now: Callable[[], float] = time.time
        self._stats = WriterStats()

    # Opening and closing

    def start(self) -> None:
        """
        Take the file, open (and migrate) it, read where it stands, start the
        writer. Does nothing if the store is started already.

        :raises StoreError: naming the file and what to do; nothing is then
            left open or held.
        """
        if self._open is not None:
            return
        path = self.path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            lock = FileLock(path)
        except OSError as e:
            raise StoreError(f"cannot open history file {path}: {e.strerror}") from None
        db: sqlite3.Connection | None = None
        try:
            try:
                db = connect(path)
                migrate(db, path)
                meta = read_meta(db, path)
            except sqlite3.DatabaseError as e:
                raise StoreError(
                    f"history file {path} is not a usable SQLite database: {e}"
                ) from None
            feeder = Feeder(
                path,
                meta.last_id,
                self._call_from_thread,
                self._on_commit,
                self._on_trim,
                self._on_lost,
                self._stats,
            )
            try:
                feeder.start()
            except OSError as e:
                raise StoreError(
                    f"history file {path}: cannot start its writer process: {e}"
                ) from None
        except BaseException:
            if db is not None:
                db.close()
            lock.release()
            raise
        self._epoch = meta.epoch
        self._last_id = self._appended = self._done = meta.last_id
        self._floor = meta.floor
        self._cache = RecentEvents(self._cache_events)
        self._lost = []
        self._open = _Open(db, lock, feeder)

    def close(self) -> None:
        """
        Commit what is queued, stop the writer, release the file (always:
        the same process may open it again at once).
        """
        opened, self._open = self._open, None
        if opened is None:
            return
        try:
            opened.feeder.stop()  # every report is made: each sync() is answered
        finally:
            opened.db.close()
            opened.lock.release()
            # Left only by a writer stuck past stop's wait (and killed).
            waiters, self._waiters = self._waiters, []
            for _, upto, d in waiters:
                d.errback(
                    StoreError(
                        f"history file {self.path}: closed before event {upto} "
                        "was known to be stored"
                    )
                )
            trims, self._trims = self._trims, []
            for t in trims:
                t.errback(StoreError(f"history file {self.path}: closed before retention ran"))

    def _db(self) -> sqlite3.Connection:
        if self._open is None:
            raise StoreError(self._not_open())
        return self._open.db

    def _not_open(self) -> str:
        if self._epoch is None:
            return f"history file {self.path} is not open: start() the store first"
        return f"history file {self.path} is closed"

    # Store

    @property
    def epoch(self) -> str:
        if self._epoch is None:
            raise StoreError(self._not_open())
        return self._epoch

    @property
    def last_id(self) -> int:
        """The newest id given (as of ``close()`` once closed)."""
        if self._epoch is None:
            raise StoreError(self._not_open())
        return self._last_id

    @property
    def oldest_id(self) -> int:
        return self._floor

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        opened = self._open
        if opened is None:
            raise StoreError(self._not_open())
        self._cache.extend(records)
        self._last_id = self._appended = records[-1].id
        opened.feeder.put(records)

    def sync(self) -> Deferred[None]:
        """
        Fires once everything appended so far is committed; fails with
        ``StoreError`` if some of it could not be stored at all.
        """
        if self._done >= self._appended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((self._done, self._appended, d))
        return d

    def health(self) -> StoreHealth:
        """
        Degraded while the writer process is down, being restarted or
        failing to write; it says so before the writer thread notices.
        """
        stats = self._stats
        opened = self._open
        down = None if opened is None else opened.feeder.down
        if down is None and opened is not None:
            ended = opened.feeder.exit_status()
            if ended is not None:
                down = (
                    f"history file {self.path}: the writer process {ended}; it is being restarted"
                )
        return StoreHealth((down,) if down else (), stats.writer_restarts, stats.events_lost)

    @property
    def _child(self) -> subprocess.Popen[bytes] | None:
        """The writer process, for tests that kill it."""
        return None if self._open is None else self._open.feeder.child

    def after(self, after_id: int, match: Match, limit: int | None = None) -> list[Record]:
        """
        A :class:`Filter` is answered from the indexes (committed events) and
        the cache (the rest); any other predicate reads every event after
        ``after_id`` (the registries, at start).
        """
        db = self._db()
        if isinstance(match, Filter) and not match.matches_all:
            return self._after_filter(db, after_id, match, limit)
        wanted = match.matches if isinstance(match, Filter) else match
        cache = self._cache
        first = cache.first_id
        cache_start = self._last_id + 1 if first is None else first
        out: list[Record] = []
        if after_id + 1 < cache_start:
            for row in reads.rows_between(db, after_id, cache_start):
                record = decode(row)
                if wanted(record):
                    out.append(record)
                    if limit is not None and len(out) >= limit:
                        return out
            after_id = cache_start - 1
        cache.collect(after_id, wanted, limit, out)
        return out

    def _after_filter(
        self, db: sqlite3.Connection, after_id: int, flt: Filter, limit: int | None
    ) -> list[Record]:
        # Up to ``committed`` the file answers, through its indexes; the cache,
        # where it holds them, gives the records (and is the authority on
        # what was dropped since: a deleted run, a batch given up).
        committed = min(self._done, self._last_id)
        cache = self._cache
        first = cache.first_id
        cache_start = committed + 1 if first is None else first
        out: list[Record] = []

        def take(row: reads.Row) -> bool:
            if row[0] < cache_start:
                out.append(decode(row))
            else:
                record = cache.get(row[0])
                if record is not None:
                    out.append(record)
            return limit is None or len(out) < limit

        reads.select(db, flt, after_id, committed, take)
        cache.collect(max(after_id, committed), flt.matches, limit, out)
        return out

    def registry(self) -> tuple[list[Record], dict[tuple[str, str], SeriesSummary]]:
        """
        What the runs registry needs at start, without reading every point:
        the status, hparams and alert events, and each series' summary.
        """
        return reads.registry(self._db())

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
        Committed points of a series, thinned from the rollups (no scan of
        the series); ``sync()`` first to include the newest.
        """
        return reads.history(self._db(), run, name, segment, from_step, to_step, max_points)

    def segments(self) -> dict[tuple[str, str], tuple[int, int]]:
        return reads.segments(self._db())

    def series(
        self,
        run: str,
        name: str,
        from_step: int | None = None,
        to_step: int | None = None,
        segment: int | None = None,
    ) -> list[Point]:
        low = from_step if from_step is not None else -(2**63)
        high = to_step if to_step is not None else 2**63 - 1
        points, on_disk = reads.series(self._db(), run, name, low, high, segment)
        # Events not committed yet are in the cache only.
        for record in self._cache.after(on_disk):
            if (
                record.type == "metric"
                and record.run == run
                and record.name == name
                and (segment is None or record.segment == segment)
            ):
                event = record.event
                step = event["step"]
                if isinstance(step, int) and low <= step <= high:
                    value, t = event["value"], event["time"]
                    assert isinstance(value, int | float) and isinstance(t, float)
                    points.append((step, float(value), t))
        return points

    def delete_run(self, run: str) -> int:
        """Forget the run now (cache), and on disk in queue order."""
        if self._open is None:
            raise StoreError(self._not_open())
        count, on_disk = reads.run_count(self._open.db, run)
        count += sum(1 for r in self._cache.after(on_disk) if r.run == run)
        self._cache.keep(lambda r: r.run != run)
        self._open.feeder.put(("delete", run))
        return count

    def trim(self, retain_days: float | None, max_db_mb: float | None) -> Deferred[int]:
        """
        Drop the oldest events (in id order) older than ``retain_days``, then
        the oldest while the file's used pages exceed ``max_db_mb``; fires
        with the new ``oldest_id``. Done by the writer, between batches.
        """
        if self._open is None:
            raise StoreError(self._not_open())
        d: Deferred[int] = Deferred()
        self._trims.append(d)
        cutoff = None if retain_days is None else self._now() - retain_days * 86400
        limit = None if max_db_mb is None else int(max_db_mb * 1024 * 1024)
        self._open.feeder.put(("trim", cutoff, limit))
        return d

    def announce(self, urls: dict[str, str]) -> None:
        if self._open is not None:
            self._open.lock.announce(urls)

    # Told by the writer thread, in the reactor thread

    def _on_trim(self, floor: int) -> None:
        """Events below ``floor`` are gone."""
        self._floor = max(self._floor, floor)
        self._cache.drop_below(self._floor)
        trims, self._trims = self._trims, []
        for d in trims:
            d.callback(self._floor)

    def _on_lost(self, first: int, last: int, message: str) -> None:
        """Events ``first`` to ``last`` will never be stored."""
        self._lost.append((first, last, message))
        self._cache.keep(lambda r: not first <= r.id <= last)

    def _on_commit(self, done: int) -> None:
        """The writer is done with every id up to ``done`` (committed, or lost)."""
        self._done = max(self._done, done)
        ready = [w for w in self._waiters if w[1] <= self._done]
        self._waiters = [w for w in self._waiters if w[1] > self._done]
        for low, upto, d in ready:
            lost = next((m for a, b, m in self._lost if a <= upto and b > low), None)
            if lost is None:
                d.callback(None)
            else:
                d.errback(StoreError(lost))
        if self._lost:
            # A later sync() starts above them: keep only what a waiter may need.
            lowest = min((low for low, _, _ in self._waiters), default=self._done)
            self._lost = [r for r in self._lost if r[1] > lowest]
