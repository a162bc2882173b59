"""
The durable history: SQLite in WAL mode, written by one thread of its own.

The reactor never waits on disk for a write: ``append`` hands records to the
writer thread and returns; the writer commits whatever has queued up in one
transaction, then tells the reactor how far it got, and ``sync()`` Deferreds
fire. An event is acknowledged (REST 200, WebSocket ``ack``, ``flush()``) only
once committed, so a crash of the process loses nothing acknowledged.

The newest events also stay in memory (``cache_events``), so live clients,
short replays and the runs registry rarely touch the disk.

Schema version 1; a migration is a function from version N to N+1 run in one
transaction at open (see ``_MIGRATIONS``); a file newer than this code is
refused rather than guessed at.

One server process owns a file at a time: an exclusive ``flock`` on
``PATH.lock`` holding the owner's pid; a second server is refused with an
error naming the file and that pid.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import itertools
import json
import math
import os
import pickle
import queue
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

import trainstream
from trainstream.errors import StoreError
from trainstream.store import Point, Record, SeriesSummary, downsample, rollup
from trainstream.store.memory import records_after
from trainstream.store.writer import connect

_log = Logger()

SCHEMA_VERSION = 1

_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,   -- the event id, and by that its index
    type TEXT NOT NULL,
    run TEXT NOT NULL,
    name TEXT,
    step INTEGER,
    value REAL,               -- metric value, NULL for NaN (SQLite has no NaN)
    time REAL NOT NULL,
    json TEXT NOT NULL,
    segment INTEGER           -- metric: segment of its series (a new one per rewind)
);
CREATE INDEX events_series ON events (run, name, segment, step) WHERE type = 'metric';
CREATE INDEX events_run ON events (run);
-- One row per series: where it stands, so a restart need not scan events.
CREATE INDEX events_registry ON events (id) WHERE type IN ('status', 'hparams', 'alert');
-- One row per series: where it stands and its summary over its whole life
-- (min/max over finite values), so a restart scans no points.
CREATE TABLE series (
    run TEXT NOT NULL,
    name TEXT NOT NULL,
    segment INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    count INTEGER NOT NULL,
    min REAL,
    max REAL,
    last_value REAL,          -- NULL for NaN
    last_time REAL NOT NULL,
    last_id INTEGER NOT NULL,
    PRIMARY KEY (run, name)
);
"""

_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    # version N -> N + 1, e.g. 1: lambda db: db.execute("ALTER TABLE ..."),
}

_STOP = object()


def _row(r: Record) -> tuple[Any, ...]:
    e = r.event
    value = e.get("value")
    if not isinstance(value, int | float) or value != value:
        value = None  # not a metric, or NaN: SQLite would store NULL anyway
    segment = r.segment if r.type == "metric" else None
    return (r.id, r.type, r.run, r.name, e.get("step"), value, e["time"], r.json, segment)


def _add_rows(
    records: Sequence[Record], rows: list[tuple[Any, ...]], series: dict[tuple[str, str], list[Any]]
) -> None:
    """One pass over a batch: its rows, and its series summaries (writer thread)."""
    append = rows.append
    for r in records:
        if r.type != "metric":
            append(_row(r))
            continue
        e = r.event
        value, step, t = e["value"], e["step"], e["time"]
        stored = value if value == value else None  # SQLite has no NaN
        append((r.id, "metric", r.run, r.name, step, stored, t, r.json, r.segment))
        key = (r.run, r.name or "")
        summary = series.get(key)
        finite = stored if stored is not None and -math.inf < stored < math.inf else None  # type: ignore[operator]
        if summary is None:
            series[key] = [r.segment, step, 1, finite, finite, stored, t, r.id]
            continue
        summary[0] = r.segment
        summary[1] = step
        summary[2] += 1
        if finite is not None:
            if summary[3] is None or finite < summary[3]:
                summary[3] = finite
            if summary[4] is None or finite > summary[4]:
                summary[4] = finite
        summary[5] = stored
        summary[6] = t
        summary[7] = r.id


def _rows_op(
    rows: list[tuple[Any, ...]], series: dict[tuple[str, str], list[Any]], last: int
) -> tuple[Any, ...]:
    """One insert op for the writer process; empties ``series`` for the next."""
    op = ("rows", rows, [(*k, *v) for k, v in series.items()], last)
    series.clear()
    return op


def _record(row: tuple[int, str, str, str | None, str]) -> Record:
    event_id, kind, run, name, text = row
    event = json.loads(text)
    value = event.get("value")
    if kind == "metric" and isinstance(value, str):
        event["value"] = float(value)  # "NaN", "Infinity", "-Infinity" on the wire
    return Record(id=event_id, type=kind, run=run, name=name, event=event, json=text)


class _Lock:
    """``PATH.lock``: an exclusive flock naming the owner's pid."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise StoreError(
                    f"history file {db_path} is in use by another trainstream server "
                    f"(pid {holder}); stop it, or give this one another --db or --memory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def _migrate(db: sqlite3.Connection, path: str) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"history file {path} has schema version {version}, newer than this "
            f"trainstream's {SCHEMA_VERSION}: upgrade trainstream or use another --db"
        )
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            for statement in _SCHEMA_1.split(";"):
                if statement.strip():
                    db.execute(statement)
            rollup.ensure_schema(db)
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            db.execute("INSERT INTO meta VALUES ('last_id', '0')")
            db.execute("INSERT INTO meta VALUES ('floor', '1')")
            version = 1
        while version < SCHEMA_VERSION:
            _MIGRATIONS[version](db)
            version += 1
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            self._lock = _Lock(path)
        except OSError as e:
            raise StoreError(f"cannot open history file {path}: {e.strerror}") from None
        try:
            self._db = connect(path)
            _migrate(self._db, path)
        except sqlite3.DatabaseError as e:
            self._lock.release()
            raise StoreError(f"history file {path} is not a usable SQLite database: {e}") from None
        except BaseException:
            self._lock.release()
            raise
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        self.epoch: str = meta["epoch"]
        self._last_id = int(meta["last_id"])
        self._floor = int(meta["floor"])
        self._call_from_thread = call_from_thread
        self._cache: deque[Record] = deque(maxlen=cache_events)
        self._appended = self._last_id  # highest id handed to the writer
        self._committed = self._last_id  # highest id the writer committed
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._trims: list[Deferred[int]] = []
        self._now: Callable[[], float] = time.time
        self._closed = False
        # The writer runs in a process of its own (see writer.py); this
        # thread feeds it. The package is found there as it is here.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(trainstream.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._child = subprocess.Popen(
            [sys.executable, "-m", "trainstream.store.writer", os.path.abspath(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._writer = threading.Thread(
            target=self._write_loop, name="trainstream-sqlite", daemon=True
        )
        self._writer.start()

    # Store

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def oldest_id(self) -> int:
        return self._floor

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        if self._failure is not None:
            raise StoreError(str(self._failure))
        self._cache.extend(records)
        self._last_id = records[-1].id
        self._appended = self._last_id
        self._queue.put(records)

    def sync(self) -> Deferred[None]:
        """Fires once everything appended so far is committed."""
        if self._failure is not None:
            return fail(
                self._failure
                if isinstance(self._failure, StoreError)
                else StoreError(f"history file {self.path} cannot be written: {self._failure}")
            )
        if self._committed >= self._appended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((self._appended, d))
        return d

    def after(
        self, after_id: int, match: Callable[[Record], bool], limit: int | None = None
    ) -> list[Record]:
        cache = self._cache
        cache_start = cache[0].id if cache else self._last_id + 1
        out: list[Record] = []
        if after_id + 1 < cache_start:
            cursor = after_id
            while True:
                rows = self._db.execute(
                    "SELECT id, type, run, name, json FROM events "
                    "WHERE id > ? AND id < ? ORDER BY id LIMIT 2000",
                    (cursor, cache_start),
                ).fetchall()
                if not rows:
                    break
                for row in rows:
                    record = _record(row)
                    if match(record):
                        out.append(record)
                        if limit is not None and len(out) >= limit:
                            return out
                cursor = rows[-1][0]
            after_id = cache_start - 1
        records_after(cache, after_id, match, limit, out)
        return out

    def registry(self) -> tuple[list[Record], dict[tuple[str, str], SeriesSummary]]:
        """
        What the runs registry needs at start, without reading every point:
        the status, hparams and alert events, and each series' summary.
        """
        rows = self._db.execute(
            "SELECT id, type, run, name, json FROM events "
            "WHERE type IN ('status', 'hparams', 'alert') ORDER BY id"
        ).fetchall()
        summaries = {
            (run, name): SeriesSummary(
                count, step, math.nan if value is None else value, low, high, t, last_id
            )
            for run, name, step, count, low, high, value, t, last_id in self._db.execute(
                "SELECT run, name, last_step, count, min, max, last_value, last_time, last_id "
                "FROM series"
            )
        }
        return [_record(row) for row in rows], summaries

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
        the series); ``sync()`` first to include the newest. All segments
        (``segment`` ``None``) are merged in Python from each one's rollups.
        """
        if segment is not None:
            return rollup.query(self._db, run, name, segment, from_step, to_step, max_points)
        segments = [
            row[0]
            for row in self._db.execute(
                "SELECT DISTINCT segment FROM rollup WHERE run = ? AND name = ? AND level = 1",
                (run, name),
            )
        ]
        points: list[Point] = []
        downsampled = False
        for seg in segments:
            part, thinned = rollup.query(self._db, run, name, seg, from_step, to_step, max_points)
            points.extend(part)
            downsampled |= thinned
        if len(points) > max_points:
            points, _ = downsample(points, max_points)
            downsampled = True
        return points, downsampled

    def segments(self) -> dict[tuple[str, str], tuple[int, int]]:
        rows = self._db.execute("SELECT run, name, segment, last_step FROM series").fetchall()
        return {(run, name): (segment, step) for run, name, segment, step in rows}

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
        db = self._db
        db.execute("BEGIN")  # one snapshot for both reads
        try:
            on_disk = int(db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()[0])
            if segment is None:
                rows = db.execute(
                    "SELECT step, value, time FROM events WHERE type = 'metric' AND run = ? "
                    "AND name = ? AND step BETWEEN ? AND ? ORDER BY id",
                    (run, name, low, high),
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT step, value, time FROM events WHERE type = 'metric' AND run = ? "
                    "AND name = ? AND segment = ? AND step BETWEEN ? AND ? ORDER BY id",
                    (run, name, segment, low, high),
                ).fetchall()
        finally:
            db.execute("COMMIT")
        points: list[Point] = [
            (step, math.nan if value is None else value, t) for step, value, t in rows
        ]
        # Events not committed yet are in the cache only.
        start = bisect.bisect_right(self._cache, on_disk, key=lambda r: r.id)
        for record in itertools.islice(self._cache, start, None):
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
        db = self._db
        db.execute("BEGIN")
        try:
            on_disk = int(db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()[0])
            count = int(
                db.execute("SELECT COUNT(*) FROM events WHERE run = ?", (run,)).fetchone()[0]
            )
        finally:
            db.execute("COMMIT")
        count += sum(1 for r in self._cache if r.id > on_disk and r.run == run)
        kept = [r for r in self._cache if r.run != run]
        if len(kept) != len(self._cache):
            self._cache = deque(kept, maxlen=self._cache.maxlen)
        self._queue.put(("delete", run))
        return count

    def trim(self, retain_days: float | None, max_db_mb: float | None) -> Deferred[int]:
        """
        Drop the oldest events (in id order) older than ``retain_days``, then
        the oldest while the file's used pages exceed ``max_db_mb``; fires
        with the new ``oldest_id``. Done by the writer, between batches.
        """
        d: Deferred[int] = Deferred()
        self._trims.append(d)
        cutoff = None if retain_days is None else self._now() - retain_days * 86400
        limit = None if max_db_mb is None else int(max_db_mb * 1024 * 1024)
        self._queue.put(("trim", cutoff, limit))
        return d

    def _on_trim(self, floor: int) -> None:
        """Reactor thread: events below ``floor`` are gone."""
        self._floor = max(self._floor, floor)
        cache = self._cache
        while cache and cache[0].id < self._floor:
            cache.popleft()
        trims, self._trims = self._trims, []
        for d in trims:
            d.callback(self._floor)

    def close(self) -> None:
        """Commit what is queued, stop the writer, release the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._writer.join(30)
        self._db.close()
        self._lock.release()

    # The writer thread

    def _write_loop(self) -> None:
        """
        The writer thread: batches what has queued up into ready rows and
        hands them to the writer process (``writer.py``), one transaction at
        a time, then tells the reactor how far the file got.
        """
        child = self._child
        assert child.stdin is not None and child.stdout is not None
        series: dict[tuple[str, str], list[Any]] = {}
        stop = False
        while not stop:
            items = [self._queue.get()]
            while True:  # take everything queued: one transaction for all
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            ops: list[tuple[Any, ...]] = []
            trims: list[tuple[float | None, int | None]] = []
            rows: list[tuple[Any, ...]] = []
            last = 0

            for item in items:  # in queue order: a delete after inserts sees them
                if item is _STOP:
                    stop = True
                elif isinstance(item, tuple) and item[0] == "trim":
                    trims.append((item[1], item[2]))
                elif isinstance(item, tuple):
                    if rows:
                        ops.append(_rows_op(rows, series, last))
                        rows = []
                    ops.append(item)
                else:
                    _add_rows(item, rows, series)
                    last = item[-1].id
            if rows:
                ops.append(_rows_op(rows, series, last))
            if not ops and not trims:
                continue
            try:
                pickle.dump((ops, trims), child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                child.stdin.flush()
                committed, error, floors = pickle.load(child.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as e:
                self._failure = StoreError(
                    f"history file {self.path}: the writer process died ({e!r}); "
                    "events since the last acknowledgement are not stored"
                )
                _log.error("history file {path}: writer process died: {e}", path=self.path, e=e)
                self._call_from_thread(self._on_failure)
                return
            if error is not None:
                _log.error("history file {path}: write failed: {e}", path=self.path, e=error)
                self._failure = StoreError(f"history file {self.path}: write failed: {error}")
                self._call_from_thread(self._on_failure)
            if committed:
                self._call_from_thread(self._on_commit, committed)
            for floor in floors:
                if floor != -1:
                    self._call_from_thread(
                        self._on_trim, self._committed + 1 if floor is None else floor
                    )
        try:
            pickle.dump(None, child.stdin)
            child.stdin.close()
        except OSError:
            pass
        child.wait(30)

    def _on_failure(self) -> None:
        """Reactor thread: nothing more will be committed; tell who waits."""
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(self._failure or StoreError(f"history file {self.path} cannot be written"))

    def _on_commit(self, committed: int) -> None:
        """Reactor thread: the writer has committed every id up to ``committed``."""
        self._committed = max(self._committed, committed)
        ready = [d for upto, d in self._waiters if upto <= self._committed]
        self._waiters = [(upto, d) for upto, d in self._waiters if upto > self._committed]
        for d in ready:
            d.callback(None)


class RetentionService(Service):
    """Enforces ``--retain-days`` and ``--max-db-mb`` every ``interval`` seconds."""

    def __init__(
        self,
        store: SQLiteStore,
        clock: Any,
        retain_days: float | None,
        max_db_mb: float | None,
        interval: float = 60.0,
    ) -> None:
        self.store = store
        self.retain_days = retain_days
        self.max_db_mb = max_db_mb
        self._loop = LoopingCall(self._run)
        self._loop.clock = clock
        self.interval = interval

    def _run(self) -> Deferred[int]:
        return self.store.trim(self.retain_days, self.max_db_mb)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
