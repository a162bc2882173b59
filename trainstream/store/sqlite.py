"""
The durable history: SQLite in WAL mode, written off the reactor thread.

The reactor never waits on disk for a write: ``append`` hands records to the
writer thread and returns; the writer commits whatever has queued up in one
transaction, then tells the reactor how far it got, and ``sync()`` Deferreds
fire. An event is acknowledged (REST 200, WebSocket ``ack``, ``flush()``) only
once committed, so a crash of the process loses nothing acknowledged.

The newest events also stay in memory (``cache_events``), so live clients,
short replays and the runs registry rarely touch the disk.

The writer thread feeds a writer process (``writer.py``). Nothing that
process does can fail the store for good: if it dies (killed, crashed), the
thread starts another and sends it the batch that was not committed (unless
the file shows it was), so nothing accepted is lost and ids stay as given;
meanwhile ``health()`` says so. A row SQLite cannot take (an integer past 64
bits, which every entry point refuses, but a store does not count on it) is
kept out of its transaction, and only its ``sync()`` callers are told. A
batch the process refuses every time is given up after ``_ATTEMPTS``, with
the same kind of error for its callers only.

Schema version 1; a migration is a function from version N to N+1 run in one
transaction at open (see ``_MIGRATIONS``); a file newer than this code is
refused rather than guessed at.

One server process owns a file at a time: an exclusive ``flock`` on
``PATH.lock`` holding the owner's pid; a second server is refused with an
error naming the file and that pid.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import pickle
import queue
import signal
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
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

import trainstream
from trainstream.errors import StoreError
from trainstream.store import (
    Point,
    Record,
    SeriesSummary,
    StoreHealth,
    downsample,
    rollup,
)
from trainstream.store.lock import FileLock
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

#: Times one batch is sent to a writer process (each death or failed write
#: counts) before it is given up: a batch that fails every time must not
#: hold up the ones after it.
_ATTEMPTS = 5
#: Seconds between looks, while idle, at whether the writer process lives.
_WATCH_INTERVAL = 0.5

_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class _WriterGoneError(Exception):
    """The writer process is gone (killed, crashed) or could not be started."""


def _brief(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _INT_MIN <= value <= _INT_MAX


def _row_problem(row: tuple[Any, ...]) -> str | None:
    """
    Why SQLite (or the pipe to the writer process) cannot take ``row``, or
    ``None``. Every entry point validates events, so this is the last line:
    a row that would fail the whole transaction is kept out of it instead.
    """
    event_id, kind, run, name, step, value, t, text, segment = row
    if kind == "metric" and step is None:
        return 'a metric event without "step"'
    for field, number in (("id", event_id), ("step", step), ("segment", segment)):
        if (number is not None or field == "id") and not _is_int64(number):
            return f'"{field}" is {_brief(number)}, not an integer in the 64-bit range'
    if value is not None and not (isinstance(value, float) or _is_int64(value)):
        return f'"value" is {_brief(value)}, not a float or a 64-bit integer'
    if not (isinstance(t, float) or _is_int64(t)) or not math.isfinite(t):
        return f'"time" is {_brief(t)}, not a finite number'
    for field, string in (("type", kind), ("run", run), ("name", name), ("json", text)):
        if string is None and field == "name":
            continue
        if not isinstance(string, str):
            return f'"{field}" is {_brief(string)}, not a string'
        if not string.isascii():
            try:
                string.encode("utf-8")
            except UnicodeEncodeError:
                return f'"{field}" has a lone surrogate, which UTF-8 cannot encode'
    return None


def _row(r: Record) -> tuple[Any, ...]:
    e = r.event
    value = e.get("value")
    if isinstance(value, float) and value != value:
        value = None  # NaN: SQLite would store NULL anyway
    segment = r.segment if r.type == "metric" else None
    return (r.id, r.type, r.run, r.name, e.get("step"), value, e.get("time"), r.json, segment)


def _add_rows(
    records: Sequence[Record],
    rows: list[tuple[Any, ...]],
    series: dict[tuple[str, str], list[Any]],
    bad: list[tuple[int, str]],
) -> None:
    """
    One pass over a batch: its rows, and its series summaries (writer
    thread). A record SQLite cannot take goes to ``bad`` as ``(id, why)``.
    """
    append = rows.append
    for r in records:
        e = r.event
        step: Any = e.get("step")
        value: Any = e.get("value")
        t: Any = e.get("time")
        kind = type(value)
        if (
            r.type == "metric"
            and type(step) is int
            and 0 <= step <= 9223372036854775807
            and (kind is float or (kind is int and _INT_MIN <= value <= _INT_MAX))
            and type(t) is float
            and -1.8e308 < t < 1.8e308
            and r.json.isascii()  # so are its run and name, which it holds
        ):
            # The common row, plainly fine: no need to look at every field.
            stored = None if value != value else value  # NaN: SQLite has no NaN
            append((r.id, "metric", r.run, r.name, step, stored, t, r.json, r.segment))
        else:
            row = _row(r)
            problem = _row_problem(row)
            if problem is not None:
                bad.append((r.id, problem))
                continue
            append(row)
            if r.type != "metric":
                continue
            stored, step, t = row[5], row[4], row[6]
        key = (r.run, r.name or "")
        summary = series.get(key)
        finite = stored if stored is not None and -math.inf < stored < math.inf else None
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
            self._lock = FileLock(path)
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
        # Highest id the writer is done with: committed, or given up (lost).
        self._done = self._last_id
        self._written = self._last_id  # the same, as the writer thread knows it
        # sync() callers: (what was done when it was called, the id it waits
        # for, its Deferred); and the id ranges given up, to fail theirs.
        self._waiters: list[tuple[int, int, Deferred[None]]] = []
        self._lost: list[tuple[int, int, str]] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._trims: list[Deferred[int]] = []
        self._now: Callable[[], float] = time.time
        self._closed = False
        self._closing = threading.Event()
        # Set by the writer thread while its process is down or failing:
        # what happened, for health (None: all is well).
        self._down: str | None = None
        self._failures = 0  # in a row, for the pause between attempts
        #: Times the writer process was started again after it died.
        self.writer_restarts = 0
        #: Accepted events that could not be stored (see ``_give_up``).
        self.events_lost = 0
        # The writer runs in a process of its own (see writer.py); this
        # thread feeds it. The package is found there as it is here.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(trainstream.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._env = env
        try:
            self._child: subprocess.Popen[bytes] | None = self._spawn()
        except OSError as e:
            self._db.close()
            self._lock.release()
            raise StoreError(f"history file {path}: cannot start its writer process: {e}") from None
        self._writer = threading.Thread(
            target=self._write_loop, name="trainstream-sqlite", daemon=True
        )
        self._writer.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        """
        Start a writer process. In a session of its own: a terminal's Ctrl-C
        (SIGINT to its foreground process group) is for the server to
        handle, which then commits what is queued and stops its writer; the
        writer also ends when its stdin does (the server is gone).
        """
        return subprocess.Popen(
            [sys.executable, "-m", "trainstream.store.writer", os.path.abspath(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
            start_new_session=True,
        )

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
        if self._closed:
            raise StoreError(f"history file {self.path} is closed")
        self._cache.extend(records)
        self._last_id = records[-1].id
        self._appended = self._last_id
        self._queue.put(records)

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
        down = self._down
        child = self._child
        if down is None and not self._closed and child is not None:
            code = child.poll()  # no wait: WNOHANG
            if code is not None:
                down = (
                    f"history file {self.path}: the writer process {_exit_text(code)}; "
                    "it is being restarted"
                )
        return StoreHealth((down,) if down else (), self.writer_restarts, self.events_lost)

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

    def announce(self, urls: dict[str, str]) -> None:
        self._lock.announce(urls)

    def close(self) -> None:
        """
        Commit what is queued, stop the writer, release the file (always:
        the same process may open it again at once).
        """
        if self._closed:
            return
        self._closed = True
        self._closing.set()  # no more pauses between attempts
        self._queue.put(_STOP)
        try:
            self._writer.join(60)
            child = self._child
            if self._writer.is_alive() and child is not None:
                # Stuck: it must not write once another may own the file.
                _log.error("history file {path}: writer stuck; killing it", path=self.path)
                child.kill()
                child.wait(10)
        finally:
            self._db.close()
            self._lock.release()

    # The writer thread

    def _write_loop(self) -> None:
        """
        The writer thread: batches what has queued up into ready rows and
        hands them to the writer process (``writer.py``), one transaction at
        a time, then tells the reactor how far the file got. A writer
        process that dies is started again and given the batch it had not
        committed; nothing here ends this thread but ``close()``.
        """
        series: dict[tuple[str, str], list[Any]] = {}
        stop = False
        while not stop:
            try:
                items = [self._queue.get(timeout=_WATCH_INTERVAL)]
            except queue.Empty:
                self._watch()
                continue
            while True:  # take everything queued: one transaction for all
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            try:
                self._write_batch(items, series)
            except Exception:  # a bug: lose this batch, never the store
                series.clear()
                _log.failure("history file {path}: writing a batch failed", path=self.path)
                batches = [i for i in items if i is not _STOP and not isinstance(i, tuple)]
                if batches:
                    first, last = batches[0][0].id, batches[-1][-1].id
                    self._give_up(first, last, "an internal error", last - first + 1)
        self._stop_child()

    def _write_batch(self, items: list[Any], series: dict[tuple[str, str], list[Any]]) -> None:
        ops: list[tuple[Any, ...]] = []
        trims: list[tuple[float | None, int | None]] = []
        rows: list[tuple[Any, ...]] = []
        bad: list[tuple[int, str]] = []
        first = last = 0
        pending = False  # records since the last op
        for item in items:  # in queue order: a delete after inserts sees them
            if item is _STOP:
                continue
            if isinstance(item, tuple) and item[0] == "trim":
                trims.append((item[1], item[2]))
            elif isinstance(item, tuple):
                if pending:
                    ops.append(_rows_op(rows, series, last))
                    rows, pending = [], False
                ops.append(item)
            else:
                _add_rows(item, rows, series, bad)
                first = first or item[0].id
                last = item[-1].id
                pending = True
        if pending:
            # Even with no rows left (all bad), so the file's last id moves on.
            ops.append(_rows_op(rows, series, last))
        for event_id, problem in bad:
            self.events_lost += 1
            message = f"history file {self.path}: event {event_id} cannot be stored: {problem}"
            _log.error("{problem}", problem=message)
            self._lose(event_id, event_id, message)
        if ops or trims:
            self._commit(ops, trims, first, last)

    def _commit(
        self,
        ops: list[tuple[Any, ...]],
        trims: list[tuple[float | None, int | None]],
        first: int,
        last: int,
    ) -> None:
        """
        Have one batch committed, whatever it takes: a writer process that
        died is replaced and sent the batch again (unless the file shows it
        had committed it). Given up after ``_ATTEMPTS``.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                _, error, floors = self._exchange((ops, trims))
            except _WriterGoneError as e:
                self._died(str(e))
                if last and ops and self._disk_last_id() >= last:
                    ops = []  # it had committed them: only the trims are left
                reason = f"the writer process {e}"
            else:
                if error is None:
                    break
                # The transaction was rolled back: nothing of it is stored.
                self._failures += 1
                reason = f"write failed: {error}"
                self._down = f"history file {self.path}: {reason}; retrying"
                _log.error("{problem}", problem=self._down)
            if attempt >= _ATTEMPTS:
                rows = sum(len(op[1]) for op in ops if op[0] == "rows")
                reason = f"{reason}; tried {_ATTEMPTS} times"
                self._give_up(first, last, reason, rows, len(trims) > 0)
                return
            self._pause()
        if self._down is not None:
            _log.info("history file {path}: the writer is back", path=self.path)
        self._down = None
        self._failures = 0
        if last:
            self._written = last
            self._call_from_thread(self._on_commit, last)
        for floor in floors:
            if isinstance(floor, str):  # the retention failed: the floor stays
                _log.error("history file {path}: {e}", path=self.path, e=floor)
                self._call_from_thread(self._on_trim, 0)
            else:  # None: the file holds no event, the next id is the floor
                self._call_from_thread(self._on_trim, self._written + 1 if floor is None else floor)

    def _exchange(self, message: object) -> Any:
        """Send ``message`` to the writer process (started if needed), return its answer."""
        child = self._child
        if child is None:
            try:
                child = self._child = self._spawn()
            except OSError as e:
                raise _WriterGoneError(f"could not be started ({e})") from None
        assert child.stdin is not None and child.stdout is not None
        try:
            pickle.dump(message, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()
            return pickle.load(child.stdout)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            raise _WriterGoneError(_exit_text(_reap(child))) from None

    def _died(self, reason: str) -> None:
        """The writer process is gone: say so; the next exchange starts another."""
        child, self._child = self._child, None
        if child is not None:
            _reap(child)
        self.writer_restarts += 1
        self._failures += 1
        self._down = f"history file {self.path}: the writer process {reason}; restarting it"
        _log.error("{problem}", problem=self._down)

    def _watch(self) -> None:
        """Idle: if the writer process died, start another now, not at the next batch."""
        child = self._child
        code = None if child is None else child.poll()
        if child is not None and code is None:
            return
        if code is not None:
            self._died(_exit_text(code))
        else:
            self._pause()  # none could be started: not in a tight loop
        try:
            self._exchange(([], []))  # starts one; it answers once the file is open
        except _WriterGoneError as e:
            self._died(str(e))
            return
        _log.info("history file {path}: the writer is back", path=self.path)
        self._down = None
        self._failures = 0

    def _pause(self) -> None:
        """Between attempts: longer the more failed in a row (none once closing)."""
        self._closing.wait(min(5.0, 0.05 * 2 ** max(0, self._failures - 1)))

    def _disk_last_id(self) -> int:
        """The last id the file has committed (-1: unknown)."""
        try:
            db = sqlite3.connect(self.path, timeout=5)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return -1
        return int(row[0]) if row else -1

    def _give_up(self, first: int, last: int, reason: str, rows: int, trims: bool = False) -> None:
        """
        The last resort for a batch that fails every time: its ``rows``
        events (ids ``first`` to ``last``) are lost, their ``sync()``
        callers are told, and the batches after it go on. The file's last
        id still moves past them, so no id is ever given twice.
        """
        if rows:
            self.events_lost += rows
            message = (
                f"history file {self.path}: events {first} to {last} could not be stored "
                f"({reason}); they are lost"
            )
            _log.error("{problem}", problem=message)
            self._lose(first, last, message)
            try:
                self._exchange(([("rows", [], [], last)], []))
            except _WriterGoneError as e:
                self._died(str(e))
        if last:
            self._written = max(self._written, last)
            self._call_from_thread(self._on_commit, last)
        if trims:
            self._call_from_thread(self._on_trim, 0)

    def _lose(self, first: int, last: int, message: str) -> None:
        self._call_from_thread(self._on_lost, first, last, message)

    def _stop_child(self) -> None:
        """After the last batch: the writer process ends once its stdin does."""
        child, self._child = self._child, None
        if child is None:
            return
        assert child.stdin is not None
        try:
            pickle.dump(None, child.stdin)
            child.stdin.flush()
        except OSError:
            pass  # gone already
        _reap(child, 30)

    # The reactor thread

    def _on_lost(self, first: int, last: int, message: str) -> None:
        """Events ``first`` to ``last`` will never be stored."""
        self._lost.append((first, last, message))
        kept = [r for r in self._cache if not first <= r.id <= last]
        if len(kept) != len(self._cache):
            self._cache = deque(kept, maxlen=self._cache.maxlen)

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


def _reap(child: subprocess.Popen[bytes], within: float = 2) -> int:
    """
    Close the pipes of a writer process that is done (or whose pipe broke),
    and its exit status; killed if it lingers past ``within`` seconds.
    """
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    try:
        return child.wait(within)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait(10)


def _exit_text(code: int) -> str:
    """``was killed by SIGKILL``, ``exited with status 1``, ..."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


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
