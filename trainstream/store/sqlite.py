"""
The durable history: SQLite in WAL mode, written off the reactor thread.

The reactor never waits on disk for a write: ``append`` hands records to the
writer thread (``feeder.py``), which has the writer process (``writer.py``)
commit whatever has queued up in one transaction, then tells the reactor how
far it got: each ``append()`` Deferred fires (in order, with what was
stored) and ``sync()`` Deferreds fire. Nothing is visible before that: an
event is shown (live clients, reads) and acknowledged (REST 200, WebSocket
``ack``, ``flush()``, a delete's 200) only once committed, so a crash of the
process takes back nothing anyone was told.

The newest committed events also stay in memory (``cache_bytes``, at most
``cache_events``; each held once, as its JSON), so live clients,
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
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed

from trainstream.errors import DiskFullError, StoreError
from trainstream.store import Page, reads
from trainstream.store.cache import DEFAULT_CACHE_BYTES, RecentEvents
from trainstream.store.feeder import Feeder, WriterStats
from trainstream.store.filter import Filter, Match
from trainstream.store.lock import FileLock
from trainstream.store.readers import Readers, read_records
from trainstream.store.records import Point, Record, SeriesSummary, StoreHealth
from trainstream.store.rows import decode
from trainstream.store.schema import migrate, read_meta, translated
from trainstream.store.writer import connect

#: Rounds of the disk one ``read_after`` goes to at most while the cache
#: drops what the round before stopped at (a fast ingest, a small cache).
_READ_ROUNDS = 3


@define
class _Pending:
    """
    An item handed to the writer, not done yet: a batch of ``records``, or
    the delete of ``run``; ``done`` fires once it is.
    """

    seq: int
    records: Sequence[Record]
    run: str | None = None
    done: Deferred[Any] = field(factory=Deferred)


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
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.path = path
        self._call_from_thread = call_from_thread
        self._cache_events = cache_events
        self._cache_bytes = cache_bytes
        self._open: _Open | None = None
        self._epoch: str | None = None
        self._last_id = 0
        self._floor = 1
        self._cache = RecentEvents(max_bytes=cache_bytes, max_records=cache_events)
        self._appended = 0  # highest id handed to the writer
        self._done = 0  # highest id the writer is done with: committed, or given up (lost)
        # sync() callers: (what was done when it was called, the id it waits
        # for, its Deferred); and the id ranges given up, to fail theirs.
        self._waiters: list[tuple[int, int, Deferred[None]]] = []
        self._lost: list[tuple[int, int, str, bool]] = []  # (first, last, why, disk full)
        self._trims: list[Deferred[int]] = []
        self._now: Callable[[], float] = time.time
        self._stats = WriterStats()
        # What was handed to the writer and is not done yet, in order: batches
        # of records, fired with what was stored (then visible), and deletes.
        self._seq = 0
        self._pending: deque[_Pending] = deque()
        self._visible = 0  # the newest id readers and live clients may see
        self._deleted: list[str] = []  # runs deleted, in order (a read out meanwhile skips them)
        self._reported: deque[tuple[int, int, dict[int, int | str]]] = deque()
        self._reporting = False
        self._readers: Readers | None = None  # read_after's threads, while open

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
            except sqlite3.Error as e:  # damaged (schema.damaged), or not readable at all
                raise translated(path, e) from None
            feeder = Feeder(
                path,
                meta.last_id,
                self._call_from_thread,
                self._on_done,
                self._on_trim,
                self._on_lost,
                self._stats,
                lock.fd,
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
        self._last_id = self._appended = self._done = self._visible = meta.last_id
        self._floor = meta.floor
        self._cache = RecentEvents(max_bytes=self._cache_bytes, max_records=self._cache_events)
        self._lost = []
        self._pending = deque()
        self._open = _Open(db, lock, feeder)
        self._readers = Readers(path, self._call_from_thread)
        self._readers.start()

    def close(self) -> None:
        """
        Commit what is queued, stop the writer, release the file (always:
        the same process may open it again at once).
        """
        opened, self._open = self._open, None
        if opened is None:
            return
        readers, self._readers = self._readers, None
        if readers is not None:
            readers.stop()  # reads under way are ended, and fail
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
            pending = self._pending  # emptied in place: a report being made may hold it
            while pending:  # fired with nothing: none of it is known stored
                entry = pending.popleft()
                if entry.run is None:
                    entry.done.callback([])
                else:
                    entry.done.errback(
                        StoreError(f"history file {self.path}: closed before the delete was done")
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

    def append(self, records: Sequence[Record]) -> Deferred[list[Record]]:
        """
        Hand ``records`` to the writer; fires, in append order, once they
        are committed, with those that were stored (a row SQLite cannot
        take, or a batch given up, is left out). Only then do readers see
        them; never fails (``sync()`` tells publishers what was lost).
        """
        opened = self._open
        if opened is None:
            raise StoreError(self._not_open())
        if not records:
            return succeed([])
        self._last_id = self._appended = records[-1].id
        return self._put(opened, records, _Pending(self._seq + 1, records))

    def _put(self, opened: _Open, item: Any, entry: _Pending) -> Deferred[Any]:
        self._seq += 1
        self._pending.append(entry)
        opened.feeder.put(self._seq, item)
        return entry.done

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
        Only what is visible: committed, and offered to live clients. A
        :class:`Filter` is answered from the indexes, with the cache giving
        the records it holds; any other predicate reads every event after
        ``after_id`` (the registries, at start). It reads the disk in the
        calling thread: the reactor thread uses ``after_cached`` and
        ``read_after`` instead.
        """
        db = self._db()
        if isinstance(match, Filter) and not match.matches_all:
            if limit is not None:
                cached = self.after_cached(after_id, match, limit)
                if cached is not None:
                    return cached
            return self._after_filter(db, after_id, match, limit)
        wanted = match.matches if isinstance(match, Filter) else match
        cache = self._cache
        first = cache.first_id
        cache_start = self._visible + 1 if first is None else first
        out: list[Record] = []
        if after_id + 1 < cache_start:
            for record in reads.records_between(db, after_id, cache_start):
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
        # Up to what is visible the file answers, through its indexes; the cache,
        # where it holds them, gives the records (and is the authority on
        # what was dropped since: a deleted run, a batch given up).
        committed = self._visible
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
        return out

    def _cache_start(self) -> int:
        """The first id the cache answers for: it holds every visible event from it on."""
        first = self._cache.first_id
        return self._visible + 1 if first is None else first

    def after_cached(self, after_id: int, flt: Filter, limit: int) -> list[Record] | None:
        """
        ``after`` from the cache alone, or ``None`` when events after
        ``after_id`` are on disk only. Never touches the disk.
        """
        if self._epoch is None:
            raise StoreError(self._not_open())
        if after_id + 1 < self._cache_start():
            return None
        out: list[Record] = []
        self._cache.collect(after_id, flt.matches, limit, out)
        return out

    def read_after(self, after_id: int, flt: Filter, limit: int) -> Deferred[Page]:
        """
        ``after``, with the disk read in a read thread (``readers.py``),
        decoded there too. The file is read up to what was visible when
        this was called and the cache then held (so nothing uncommitted,
        and nothing given up or deleted since, is ever returned); the rest
        comes from the cache when the answer is back, if it still holds it,
        else from another round of the disk (a few at most: the page then
        stops short, and ``Page.upto`` says where).
        """
        if self._open is None:
            raise StoreError(self._not_open())
        return self._read_round(after_id, flt, limit, [], _READ_ROUNDS)

    def _read_round(
        self, after_id: int, flt: Filter, limit: int, got: list[Record], rounds: int
    ) -> Deferred[Page]:
        readers = self._readers
        if readers is None:
            return succeed(Page(got, after_id))  # closed meanwhile: what was read
        cached = self.after_cached(after_id, flt, limit - len(got))
        if cached is not None:
            got.extend(cached)
            full = len(got) >= limit
            return succeed(Page(got, got[-1].id if full else max(after_id, self._visible)))
        if rounds == 0:
            return succeed(Page(got, after_id))
        # Captured here, in the reactor thread: the read cannot see past it.
        upto = min(self._visible, self._cache_start() - 1)
        deletes = len(self._deleted)

        def read(result: tuple[list[Record], int]) -> Page | Deferred[Page]:
            records, floor = result
            if floor > self._floor:  # a retention committed, not reported yet
                self._floor = floor
                self._cache.drop_below(floor)
            gone = set(self._deleted[deletes:])  # deleted (and answered) meanwhile
            got.extend(r for r in records if r.run not in gone)
            if len(got) >= limit:
                return Page(got, got[-1].id)
            return self._read_round(upto, flt, limit, got, rounds - 1)

        d = readers.run(read_records, flt, after_id, upto, limit - len(got))
        return d.addCallback(read)

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
        # Whatever a client may see is committed: the file has it all.
        return reads.series(self._db(), run, name, low, high, segment)

    def delete_run(self, run: str) -> Deferred[int]:
        """
        Delete the run's events, after those appended before (in queue
        order); fires with how many there were once the delete is
        committed: until then readers still see them.
        """
        opened = self._open
        if opened is None:
            raise StoreError(self._not_open())
        return self._put(opened, ("delete", run), _Pending(self._seq + 1, (), run))

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
        self._seq += 1
        self._open.feeder.put(self._seq, ("trim", cutoff, limit))
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

    def _on_lost(self, first: int, last: int, message: str, full: bool) -> None:
        """Events ``first`` to ``last`` will never be stored."""
        self._lost.append((first, last, message, full))

    def _forget_cached(self, run: str) -> None:
        self._cache.keep(lambda r: r.run != run)

    def _is_lost(self, event_id: int) -> bool:
        return any(a <= event_id <= b for a, b, _, _ in self._lost)

    def _on_done(self, seq: int, done: int, deleted: dict[int, int | str]) -> None:
        """
        The writer is done with every item up to ``seq``: ids up to ``done``
        are committed or lost. Each batch becomes visible, in order, just
        before its ``append()`` Deferred fires (so the Hub offers it to live
        clients in the same turn as readers first see it).
        """
        self._reported.append((seq, done, deleted))
        if self._reporting:
            return  # a callback below re-entered (a close): the loop below takes it
        self._reporting = True
        try:
            while self._reported:
                self._done_through(*self._reported.popleft())
        finally:
            self._reporting = False

    def _done_through(self, seq: int, done: int, deleted: dict[int, int | str]) -> None:
        self._done = max(self._done, done)
        pending = self._pending
        while pending and pending[0].seq <= seq:
            entry = pending.popleft()
            if entry.run is not None:
                result = deleted.get(entry.seq, 0)
                if isinstance(result, str):
                    entry.done.errback(StoreError(result))
                    continue
                self._forget_cached(entry.run)
                self._deleted.append(entry.run)
                entry.done.callback(result)
                continue
            records = entry.records
            stored = [r for r in records if not self._is_lost(r.id)] if self._lost else records
            self._cache.extend(stored)
            self._visible = records[-1].id
            entry.done.callback(list(stored))
        ready = [w for w in self._waiters if w[1] <= self._done]
        self._waiters = [w for w in self._waiters if w[1] > self._done]
        for low, upto, d in ready:
            lost = next((r for r in self._lost if r[0] <= upto and r[1] > low), None)
            if lost is None:
                d.callback(None)
            else:
                d.errback((DiskFullError if lost[3] else StoreError)(lost[2]))
        if self._lost:
            # A later sync() starts above them: keep only what a waiter may need.
            lowest = min((low for low, _, _ in self._waiters), default=self._done)
            self._lost = [r for r in self._lost if r[1] > lowest]
