"""
The threads that read a history file for the reactor thread, so that it
never waits on the disk (``SQLiteStore.read_after``).

A small pool of its own (``READ_THREADS``), started and stopped with the
store, so a burst of reads never starves other users of the reactor's
pool. Each thread has its own read-only connection: in WAL mode readers run
beside the writer process, each on the snapshot its read started on.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from attrs import define
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from trainstream.errors import StoreError
from trainstream.store import reads
from trainstream.store.filter import Filter
from trainstream.store.records import Record
from trainstream.store.rows import decode
from trainstream.store.schema import translated

_T = TypeVar("_T")

#: Threads reading one history file at most.
READ_THREADS = 2


@define
class _Job:
    """One read: cancelled before it starts, it is skipped; while it runs, interrupted."""

    cancelled: bool = False
    db: sqlite3.Connection | None = None  # while it runs


class Readers:
    """
    Reads of the file at ``path`` off the reactor thread. ``run`` is called
    in the reactor thread; its Deferred fires there (through
    ``call_from_thread``), or fails with :class:`StoreError`, once the read
    is done, or once ``stop`` ends it. Cancelling it (a client gone) skips
    the read if it has not started, and interrupts it if it has, so reads
    nobody waits for do not hold up the others.
    """

    def __init__(self, path: str, call_from_thread: Callable[..., object]) -> None:
        self._path = path
        self._call_from_thread = call_from_thread
        self._pool = ThreadPool(0, READ_THREADS, "trainstream-reads")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._waiting: set[Deferred[Any]] = set()
        self._stopping = False

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """
        End the reads under way (interrupted), wait for the threads, close
        their connections; reads not answered yet fail.
        """
        self._stopping = True
        with self._lock:
            for db in self._connections:
                db.interrupt()
        self._pool.stop()
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        waiting, self._waiting = self._waiting, set()
        for d in waiting:
            if not d.called:
                d.errback(StoreError(f"history file {self._path} is closed"))

    def run(self, read: Callable[..., _T], *args: object) -> Deferred[_T]:
        """``read(db, *args)`` in a read thread, ``db`` its connection."""
        job = _Job()

        def cancel(_: Deferred[_T]) -> None:
            with self._lock:
                job.cancelled = True
                if job.db is not None:
                    job.db.interrupt()

        d: Deferred[_T] = Deferred(cancel)
        self._waiting.add(d)

        def done(ok: bool, result: object) -> None:  # in the read thread
            self._call_from_thread(self._answer, d, ok, result)

        self._pool.callInThreadWithCallback(done, self._call, job, read, *args)
        return d

    def _answer(self, d: Deferred[Any], ok: bool, result: object) -> None:
        self._waiting.discard(d)
        if d.called:
            return  # failed by stop() already
        if ok:
            d.callback(result)
        else:
            assert isinstance(result, Failure)
            d.errback(result)

    def _call(self, job: _Job, read: Callable[..., _T], *args: object) -> _T | None:
        db = self._connection()
        with self._lock:
            if job.cancelled:
                return None  # nobody waits for it
            job.db = db
        try:
            return read(db, *args)
        except sqlite3.Error as e:
            if self._stopping:
                raise StoreError(f"history file {self._path} is closed") from None
            if job.cancelled:
                return None
            raise translated(self._path, e) from None
        finally:
            with self._lock:
                job.db = None

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            uri = Path(os.path.abspath(self._path)).as_uri() + "?mode=ro"
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            with self._lock:
                self._connections.append(db)
            self._local.db = db
        return db


def read_records(
    db: sqlite3.Connection, flt: Filter, after_id: int, upto: int, limit: int
) -> tuple[list[Record], int]:
    """
    Up to ``limit`` records with ``after_id < id <= upto`` that ``flt``
    matches, through the indexes (``reads.select``), decoded here (in the
    read thread, not the reactor's); and the file's floor as of then, so
    a retention the reactor has not heard of yet cannot make events vanish
    from a replay unannounced.
    """
    out: list[Record] = []

    def take(row: reads.Row) -> bool:
        out.append(decode(row))
        return len(out) < limit

    reads.select(db, flt, after_id, upto, take)
    # After the rows (the floor only rises): if a retention dropped some of
    # what they skip, this floor is above them. No one transaction for both:
    # a damaged page is stepped over by reads.select statement by statement.
    row = db.execute("SELECT value FROM meta WHERE key = 'floor'").fetchone()
    return out, int(row[0]) if row else 1


__all__ = ["READ_THREADS", "Readers", "read_records"]
