"""
``python -m trainstream repair PATH``: a new history file made of what a
damaged one still holds.

Refused while a server holds the file (its lock, ``lock.py``, is taken for
the whole repair, so none can start meanwhile). The new file is written
beside the old one (``PATH.repairing``) by the same code a server writes
with: ``schema.migrate`` makes it, each readable event row, in id order, is
decoded (``rows.decode``) and applied as the writer process applies a batch
(``rows.add_rows``, ``writer.apply``), which rebuilds the series summaries
and the rollups. Then the damaged file (with its ``-wal`` and ``-shm``) is
moved to ``PATH.damaged-<UTC time>`` and the new one takes its place. The
epoch is kept if it can be read (else the new file's is used), and
``last_id`` is the highest id the old file shows anywhere (its meta, its
events, its series summaries), so no id it shows is given again.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from attrs import frozen

from trainstream.errors import StoreError
from trainstream.store.check import Readable, open_read_only, readable_copy
from trainstream.store.lock import FileLock, holder_pid
from trainstream.store.reads import scan
from trainstream.store.records import Record
from trainstream.store.rows import RowError, add_rows, decode, rows_op
from trainstream.store.schema import migrate
from trainstream.store.writer import apply, connect

_BATCH = 5000
_SIDE_FILES = ("-wal", "-shm")


@frozen
class Repaired:
    """What a repair did."""

    path: str
    #: Where the damaged file is now.
    aside: str
    found: Readable
    #: Events copied into the new file.
    recovered: int
    #: Rows that were read but could not be stored (``rows.row_problem``).
    refused: int
    last_id: int
    epoch_kept: bool

    def lines(self) -> list[str]:
        lost = self.found.lost_at_most(self.last_id)
        bad = self.found.bad_count + self.refused
        if not self.found.unreadable:
            lost_text = f"{bad} lost"
        elif lost is None:
            lost_text = "an unknown number lost"
        else:
            lost_text = f"at most {lost + bad} lost"
        out = [f"repaired history file {self.path}: {self.recovered} events recovered, {lost_text}"]
        out += [f"  {line}" for line in self.found.describe()]
        if self.refused:
            out.append(f"  {self.refused} events could not be stored again")
        epoch = "kept" if self.epoch_kept else "new (the old one could not be read)"
        out.append(f"  epoch {epoch}; new events get ids after {self.last_id}")
        out.append(f"  the damaged file is now {self.aside}")
        return out


def repair(path: str, now: Callable[[], float] = time.time) -> Repaired:
    """
    Replace the history file ``path`` with what can be read of it.

    :raises StoreError: when there is no such file, a server holds it, or
        the new file cannot be written (the old one is then left in place).
    """
    if not os.path.isfile(path):
        raise StoreError(f"there is no history file at {path}: nothing to repair")
    lock = _lock(path)
    try:
        temp = path + ".repairing"
        _remove(temp)
        try:
            result = _rebuild(path, temp)
        except (sqlite3.Error, OSError) as e:
            _remove(temp)
            raise StoreError(
                f"cannot write the repaired history {temp}: {e}; {path} is left as it was"
            ) from None
        except BaseException:  # Ctrl-C: the old file stays, as it was
            _remove(temp)
            raise
        aside = _aside(path, now())
        for suffix in ("", *_SIDE_FILES):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
        os.replace(temp, path)
    finally:
        lock.release()
    found, recovered, refused, last_id, epoch_kept = result
    return Repaired(path, aside, found, recovered, refused, last_id, epoch_kept)


def _lock(path: str) -> FileLock:
    """The file's lock, so no server starts on it meanwhile."""
    try:
        return FileLock(path)
    except StoreError:
        pid = _holder(path)
        if pid is None:
            raise  # held by what a server left behind: the lock says what to do
        raise StoreError(
            f"history file {path} is in use by a running trainstream server (pid {pid}): "
            "stop that server, then repair the file"
        ) from None
    except OSError as e:
        raise StoreError(f"cannot lock history file {path}: {e.strerror}") from None


def _holder(path: str) -> int | None:
    """The pid in the file's lock, if that process is alive."""
    return holder_pid(path)


def _aside(path: str, when: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    aside, n = f"{path}.damaged-{stamp}", 1
    while any(os.path.exists(aside + s) for s in ("", *_SIDE_FILES)):
        n += 1
        aside = f"{path}.damaged-{stamp}-{n}"
    return aside


def _remove(path: str) -> None:
    for suffix in ("", *_SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _rebuild(path: str, temp: str) -> tuple[Readable, int, int, int, bool]:
    """Write ``temp`` from what ``path`` holds; (found, copied, refused, last_id, epoch kept)."""
    with readable_copy(path) as readable:
        return _write(readable, temp)


def _write(path: str, temp: str) -> tuple[Readable, int, int, int, bool]:
    found = Readable()
    old: dict[str, int | str] = {}
    source: sqlite3.Connection | None = None
    with contextlib.suppress(sqlite3.Error):
        source = open_read_only(path)
        old = _old_meta(source)
    db = connect(temp)
    try:
        migrate(db, temp)
        copied = refused = 0
        if source is not None:
            copied, refused = _copy(source, db, found)
        epoch = old.get("epoch")
        # Every id the old file shows it gave: none may be given again.
        given = (old.get(k) for k in ("last_id", "max_event", "max_series"))
        last_id = max([found.highest, *(v for v in given if isinstance(v, int))])
        lowest = db.execute("SELECT MIN(id) FROM events").fetchone()[0]
        floor = old.get("floor")
        if not isinstance(lowest, int):
            lowest = last_id + 1  # no event: the next id is the oldest there can be
        floor = min(floor, lowest) if isinstance(floor, int) and floor >= 1 else lowest
        db.execute("BEGIN")
        if isinstance(epoch, str):
            db.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_id'", (str(last_id),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'floor'", (str(floor),))
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=DELETE")  # one file to move into place
    finally:
        db.close()
        if source is not None:
            source.close()
    return found, copied, refused, last_id, isinstance(epoch, str)


def _old_meta(db: sqlite3.Connection) -> dict[str, int | str]:
    """What can be read of where the damaged file stood, each value on its own."""
    out: dict[str, int | str] = {}
    with contextlib.suppress(sqlite3.Error):
        for key, value in db.execute("SELECT key, value FROM meta"):
            if key == "epoch" and isinstance(value, str) and value:
                out["epoch"] = value
            elif key in ("last_id", "floor"):
                with contextlib.suppress(TypeError, ValueError):
                    out[key] = int(value)
    for key, sql in (
        ("max_event", "SELECT MAX(id) FROM events"),
        ("max_series", "SELECT MAX(last_id) FROM series"),
    ):
        with contextlib.suppress(sqlite3.Error):
            value = db.execute(sql).fetchone()[0]
            if type(value) is int:
                out[key] = value
    return out


def _copy(source: sqlite3.Connection, db: sqlite3.Connection, found: Readable) -> tuple[int, int]:
    """Every readable event of ``source`` into ``db``, in id order; (copied, refused)."""
    copied = refused = 0
    batch: list[Record] = []

    def flush() -> None:
        nonlocal copied, refused
        rows: list[tuple[Any, ...]] = []
        series: dict[tuple[str, str], list[Any]] = {}
        bad: list[tuple[int, str]] = []
        add_rows(batch, rows, series, bad)
        apply(db, [rows_op(rows, series, batch[-1].id)])
        copied += len(rows)
        refused += len(bad)
        batch.clear()

    columns = "id, type, run, name, json, segment"
    for row in scan(source, columns, 0, 2**63 - 1, found.skipped):
        found.highest = row[0]
        segment = row[5] if type(row[5]) is int else 0
        try:
            batch.append(decode(row[:5], segment))
        except RowError as e:
            found.bad(row[0], e.why)
            continue
        found.events += 1
        if len(batch) >= _BATCH:
            flush()
    if batch:
        flush()
    return copied, refused
