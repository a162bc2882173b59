"""
``python -m trainstream check PATH``: is a history file whole? It only reads
(a running server may hold the file meanwhile).

Three looks, each saying what it found: SQLite's own ``integrity_check``
(every page, every index entry), the layout and ``meta`` as a server opening
the file would judge them (``schema.read_meta``), and every event row read
in id order and decoded as a replay would (``reads.scan``, ``rows.event_of``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from attrs import Factory, define

from trainstream.store import reads, schema
from trainstream.store.rows import RowError, event_of

#: Problems ``integrity_check`` lists at most (a page torn apart gives hundreds).
_INTEGRITY_LINES = 5
#: Ids of rows that are no event, listed at most.
_LISTED = 10


@define
class Readable:
    """What reading every event row of a file in id order found."""

    events: int = 0
    #: Ids of rows that are no event, and why (the first ``_LISTED``).
    bad_rows: list[tuple[object, str]] = Factory(list)
    bad_count: int = 0
    #: Stretches that could not be read: (last id read before, where reading
    #: went on (``None``: nowhere), what SQLite said).
    unreadable: list[tuple[int, int | None, str]] = Factory(list)
    highest: int = 0

    def skipped(self, last: int, resume: int | None, why: str) -> None:
        self.unreadable.append((last, resume, why))

    def bad(self, event_id: object, why: str) -> None:
        self.bad_count += 1
        if len(self.bad_rows) < _LISTED:
            self.bad_rows.append((event_id, why))

    def lost_at_most(self, last_id: int | None) -> int | None:
        """Events the unreadable stretches may have held (``None``: unknown)."""
        total = 0
        for last, resume, _ in self.unreadable:
            end = resume if resume is not None else last_id
            if end is None or end <= last:
                return None  # unreadable to the end, and where the end was is not known
            total += end - last
        return total

    def describe(self) -> list[str]:
        lines = []
        for last, resume, why in self.unreadable:
            upto = "the end" if resume is None else f"id {resume}"
            lines.append(f"events after id {last} up to {upto} cannot be read ({why})")
        if self.bad_count == 1:
            event_id, why = self.bad_rows[0]
            lines.append(f"event {event_id!r} {why}")
        elif self.bad_count:
            listed = ", ".join(f"{i!r}" for i, _ in self.bad_rows)
            more = "" if self.bad_count <= len(self.bad_rows) else ", ..."
            event_id, why = self.bad_rows[0]
            lines.append(
                f"{self.bad_count} rows are no event (ids {listed}{more}); event {event_id!r} {why}"
            )
        return lines


def open_read_only(path: str) -> sqlite3.Connection:
    """``path`` opened for reading only (its WAL is read, nothing is written)."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


def truncated(path: str) -> tuple[int, int] | None:
    """
    ``(pages, pages_there)`` when the file is shorter than its header says
    (cut off: SQLite then refuses to read any of it), else ``None``.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
        size = os.path.getsize(path)
    except OSError:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # else SQLite counts the pages itself
    if not valid or page_size < 512 or page_size & (page_size - 1):
        return None
    there = size // page_size
    return (pages, there) if there < pages else None


@contextlib.contextmanager
def readable_copy(path: str) -> Iterator[str]:
    """
    A file to read ``path``'s events from: itself, or for a cut-off file a
    copy (beside it, removed after) whose header says what is there, so
    SQLite reads the pages it has instead of refusing them all.
    """
    cut = truncated(path)
    if cut is None:
        yield path
        return
    folder = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path) or ".")
    try:
        copy = os.path.join(folder, "history.sqlite3")
        shutil.copyfile(path, copy)
        if os.path.exists(path + "-wal"):
            shutil.copyfile(path + "-wal", copy + "-wal")
        with open(copy, "r+b") as f:
            f.seek(28)
            f.write(cut[1].to_bytes(4, "big"))
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_all(db: sqlite3.Connection, columns: str = "id, type, run, name, json") -> Readable:
    """Read and decode every event row of ``db`` (``columns`` start as a ``Row``)."""
    found = Readable()
    for row in reads.scan(db, columns, 0, 2**63 - 1, found.skipped):
        found.highest = row[0]
        try:
            event_of(row[:5])
        except RowError as e:
            found.bad(row[0], e.why)
            continue
        found.events += 1
    return found


@define
class Report:
    """What ``check`` found, in the order it looked: each line, and whether it is a problem."""

    path: str
    found: list[tuple[bool, str]] = Factory(list)

    @property
    def ok(self) -> bool:
        return not any(problem for problem, _ in self.found)

    def problem(self, line: str) -> None:
        self.found.append((True, line))

    def note(self, line: str) -> None:
        self.found.append((False, line))

    def lines(self) -> list[str]:
        if self.ok:
            return [f"history file {self.path}: ok", *(f"  {line}" for _, line in self.found)]
        out = [f"history file {self.path} is damaged:"]
        out += [f"  {line}" for _, line in self.found]
        out.append(
            f"to keep what can be read: python -m trainstream repair {shlex.quote(self.path)} "
            "(the damaged file is kept beside it)"
        )
        return out


def check(path: str) -> Report:
    """Look at the history file ``path`` without changing it."""
    report = Report(path)
    if not os.path.isfile(path):
        report.problem("there is no such file")
        return report
    cut = truncated(path)
    if cut is not None:
        report.problem(f"it is cut off: {cut[1]} of the {cut[0]} pages its header says it has")
    try:
        with readable_copy(path) as readable:
            db = open_read_only(readable)
            try:
                _look(db, path, report)
            finally:
                db.close()
    except (sqlite3.Error, OSError) as e:
        report.problem(f"it cannot be read: {e}")
    return report


def _look(db: sqlite3.Connection, path: str, report: Report) -> None:
    try:
        found = [r[0] for r in db.execute(f"PRAGMA integrity_check({_INTEGRITY_LINES})")]
    except sqlite3.DatabaseError as e:
        if str(e) in schema.NOT_SQLITE:
            report.problem(f"it is not a SQLite database ({e})")
            return
        found = [str(e)]
    if found == ["ok"]:
        report.note("integrity_check: ok")
    else:
        lines = [line for text in found for line in text.splitlines()]
        for line in lines[:_INTEGRITY_LINES]:
            report.problem(f"integrity_check: {line}")
        if len(lines) > _INTEGRITY_LINES:
            report.problem("integrity_check: ...")
    last_id: int | None = None
    try:
        meta = schema.read_meta(db, path)
    except schema.DamagedError as e:
        report.problem(f"meta: {e.what}")
    except sqlite3.Error as e:
        report.problem(f"meta: cannot be checked ({e})")
    else:
        last_id = meta.last_id
        report.note(f"meta: epoch {meta.epoch}, last_id {meta.last_id}, floor {meta.floor}")
    try:
        readable = read_all(db)
    except sqlite3.Error as e:
        report.problem(f"events: cannot be read ({e})")
        return
    if not (readable.unreadable or readable.bad_count):
        report.note(f"events: {readable.events}, every one decodes")
        return
    lost = readable.lost_at_most(last_id)
    at_most = "an unknown number" if lost is None else f"at most {lost + readable.bad_count}"
    report.problem(f"events: {readable.events} readable, {at_most} lost:")
    for line in readable.describe():
        report.problem(f"  {line}")
