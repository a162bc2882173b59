"""
The SQLite writer, a process of its own (``python -m trainstream.store.writer PATH``).

Inserting rows, keeping rollups and series summaries and committing is
Python work that holds the GIL; in the server's process it competed with the
reactor (ingest stopped near one core's worth for both). Here it runs on the
other core. The server's writer thread sends batches of ready rows over a
pipe and waits for the answer; the reactor thread never waits for either.

Protocol (pickle frames, the parent is trusted): the parent sends ``(ops,
trims)`` or ``None`` to stop; ``ops`` is a list of ``("rows", rows, series,
last_id)``, ``("delete", run)`` and ``("probe", nbytes)`` applied in order in
one transaction, ``trims`` a list of ``(cutoff_time, max_bytes)`` applied
after it. The child answers ``(committed_last_id, error, floors, deleted)``:
``error`` (a string) when the transaction was rolled back, each floor the
new oldest id, ``None`` for an empty history, or a string saying why that
retention failed; ``deleted`` the events each delete removed, in order. A
probe takes ``nbytes`` of new pages and gives them back in the same
transaction: whether the disk has room again after it was full.

The process ignores SIGINT (a terminal's Ctrl-C is the server's to handle:
it commits what is queued, then closes this process's stdin) and ends when
its stdin does, so it never outlives the server by more than a transaction.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from typing import Any

from trainstream import gcpolicy
from trainstream.store import rollup

INSERT = (
    "INSERT INTO events (id, type, run, name, step, value, time, json, segment) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
UPSERT_SERIES = (
    "INSERT INTO series (run, name, segment, last_step, count, min, max, last_value, "
    "last_time, last_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run, name) DO UPDATE SET segment = excluded.segment, "
    "last_step = excluded.last_step, count = count + excluded.count, "
    "min = MIN(COALESCE(min, excluded.min), COALESCE(excluded.min, min)), "
    "max = MAX(COALESCE(max, excluded.max), COALESCE(excluded.max, max)), "
    "last_value = excluded.last_value, last_time = excluded.last_time, "
    "last_id = excluded.last_id"
)


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives the process being killed (the OS
    # has the WAL); only a power loss may take the last commits.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def points(
    rows: Sequence[tuple[Any, ...]],
) -> list[tuple[str, str, int, int, float | None, float]]:
    """The metric rows of a batch as rollup points: (run, name, segment, step, value, time)."""
    return [(r[2], r[3], r[8], r[4], r[5], r[6]) for r in rows if r[1] == "metric"]


def apply(db: sqlite3.Connection, ops: Sequence[tuple[Any, ...]]) -> tuple[int, list[int]]:
    """
    Apply ``ops`` in one transaction: the last id committed (0 if none) and
    how many events each delete removed.
    """
    last = 0
    deleted: list[int] = []
    db.execute("BEGIN")
    try:
        for op in ops:
            if op[0] == "rows":
                _, rows, series, last_id = op
                db.executemany(INSERT, rows)
                rollup.update(db, points(rows))
                db.executemany(UPSERT_SERIES, series)
                last = last_id
            elif op[0] == "probe":
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('space_probe', zeroblob(?))",
                    (op[1],),
                )
                db.execute("DELETE FROM meta WHERE key = 'space_probe'")
            else:  # ("delete", run): after the inserts queued before it
                run = op[1]
                removed = db.execute("DELETE FROM events WHERE run = ?", (run,)).rowcount
                db.execute("DELETE FROM series WHERE run = ?", (run,))
                rollup.delete_run(db, run)
                deleted.append(removed)
        if last:
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_id'", (str(last),))
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return last, deleted


def _rollback(db: sqlite3.Connection) -> None:
    """
    Undo the open transaction, if SQLite has not already (it does on a full
    disk): a failing ROLLBACK must not hide the error that caused it.
    """
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def trim(db: sqlite3.Connection, cutoff: float | None, limit: int | None) -> int | None:
    """Delete the oldest events past the retention; the new floor (None: empty)."""
    chunk = 10_000
    if cutoff is not None:
        while True:
            rows = db.execute(
                "SELECT id, time FROM events ORDER BY id LIMIT ?", (chunk,)
            ).fetchall()
            old = [i for i, t in itertools.takewhile(lambda r: r[1] < cutoff, rows)]
            if not old:
                break
            _delete_through(db, old[-1])
            if len(old) < len(rows):
                break
    if limit is not None:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        for _ in range(10_000):  # bounded: each pass removes a chunk
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            used = (pages - free) * page_size
            if used <= limit:
                break
            low, high = db.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
            if low is None:
                break
            # Ids are dense: drop the share of them the excess is, a bit more.
            excess = (used - limit) / used
            n = min(chunk, max(100, int(excess * (high - low + 1) * 1.05) + 1))
            _delete_through(db, min(high, low + n - 1))
    oldest = db.execute("SELECT MIN(id) FROM events").fetchone()[0]
    return int(oldest) if oldest is not None else None


def _delete_through(db: sqlite3.Connection, last_id: int) -> None:
    db.execute("BEGIN")
    rollup.trim(db, last_id)  # deletes the events, repairs their rollups
    db.execute("UPDATE meta SET value = ? WHERE key = 'floor'", (str(last_id + 1),))
    db.execute("COMMIT")


#: For tests: cap the file at this many pages, as if the disk were that small
#: (SQLite's ``max_page_count``; a write past it fails as a full disk does).
MAX_PAGES_ENV = "TRAINSTREAM_TEST_MAX_PAGES"


class Checkpointer:
    """
    Copies the WAL back into the file beside the writer, never in its way.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses 1,000
    pages of WAL: that commit took about 30 ms, and since clients see a batch
    only once it is committed, every one of them waited for it (the p99 of
    ``bench/latency.py``). Here the writer's connection does not checkpoint;
    a thread of this process does, PASSIVE (it never blocks the writer), on
    a connection of its own, at most every ``interval`` seconds after a
    commit. SQLite's checkpoint code runs without the GIL.
    """

    def __init__(self, path: str, interval: float = 0.25) -> None:
        self._path = path
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A commit was made: checkpoint soon."""
        self._wake.set()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        try:
            while not self._stopping.is_set():
                self._wake.wait()
                self._wake.clear()
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    pass  # busy or full: the next commit asks again
                self._stopping.wait(self._interval)
        finally:
            db.close()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(30)


def _mute_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gcpolicy.tune()
    db = connect(path)
    db.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's job
    checkpointer = Checkpointer(path)
    pages = os.environ.get(MAX_PAGES_ENV)
    if pages:
        db.execute(f"PRAGMA max_page_count = {int(pages)}")
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            message = pickle.load(source)
        except (EOFError, pickle.UnpicklingError):
            # The server is gone: what it sent whole is committed; a message
            # it was killed in the middle of sending was never acknowledged.
            break
        if message is None:
            break
        ops, trims = message
        error: str | None = None
        last = 0
        deleted: list[int] = []
        try:
            last, deleted = apply(db, ops)
        except Exception as e:  # rolled back; the server decides what next
            error = f"{type(e).__name__}: {e}" if not isinstance(e, sqlite3.Error) else str(e)
        floors: list[int | str | None] = []
        for cutoff, limit in trims:
            try:
                floors.append(trim(db, cutoff, limit))
            except Exception as e:
                _rollback(db)
                floors.append(f"retention: {e}")
        try:
            pickle.dump((last, error, floors, deleted), sink, protocol=pickle.HIGHEST_PROTOCOL)
            sink.flush()
        except OSError:  # the server was killed (kill -9): what it sent is committed
            _mute_stdout()  # nor a second BrokenPipeError as Python flushes it at exit
            break
        if error is None:
            checkpointer.poke()
    checkpointer.stop()
    db.close()


if __name__ == "__main__":
    main(sys.argv[1])
