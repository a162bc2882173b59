"""
Reads of the history file: pure functions on a :class:`sqlite3.Connection`.

Replays and polls run them in the store's read threads (``readers.py``),
never in the reactor thread; the few the reactor still makes (at start, a
metric history) are bounded in cost by what they return. A :class:`Filter`
is answered
through the indexes of schema 2 (``schema.py``): its run globs are resolved
against the runs on disk (a skip through the run index, one probe per run),
its name globs against the series table, and each (run, type), type, run or
(run, metric) it leaves is one range of an index in id order; the ranges are
merged by id. The Filter itself has the last word on every row, so what is
read is exactly what the Hub would have sent (``fnmatch`` globs, ``[...]``
classes included: SQLite's GLOB is never asked).

A damaged file (see ``schema.damaged``) never ends a read with a traceback.
What the server reads at start (``registry``, ``segments``) and the reads of
the Python API raise :class:`StoreError`, one line naming the file and what
to do (``_reading``: the one place that translates). A replay or a poll goes
on instead: an unreadable stretch of the file (``scan``) or a row that is no
event is left out, with one logged error line naming the file and the ids;
a metric history whose rollups cannot be read is answered from its points.
"""

from __future__ import annotations

import functools
import heapq
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from twisted.logger import Logger

from trainstream.store import downsample, rollup, schema
from trainstream.store.filter import Filter
from trainstream.store.records import Point, Record, SeriesSummary
from trainstream.store.rows import RowError, decode

_log = Logger()
_P = ParamSpec("_P")
_T = TypeVar("_T")

#: ``(id, type, run, name, json)``: what ``decode`` makes a Record of.
Row = tuple[int, str, str, str | None, str]

_COLUMNS = "id, type, run, name, json"
_CHUNK = 2000
#: Index ranges merged at most for one read; a filter needing more (runs by
#: the hundred) is read by type, and the Filter drops the rest.
MAX_RANGES = 256

#: One range: an index, its equality condition, the condition's parameters.
_Range = tuple[str, str, tuple[str, ...]]
#: Told of each stretch ``scan`` cannot read: the last id read before it,
#: the id reading goes on after (``None``: nothing after it could be read),
#: and what SQLite said.
Skipped = Callable[[int, int | None, str], None]


def path_of(db: sqlite3.Connection) -> str:
    """The file ``db`` reads (for messages)."""
    try:
        return str(db.execute("PRAGMA database_list").fetchone()[2])
    except (sqlite3.Error, TypeError):
        return "(unknown)"


def _reading(
    fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
) -> Callable[Concatenate[sqlite3.Connection, _P], _T]:
    """
    ``fn`` with what a damaged file makes it raise (SQLite's errors, a row
    that is no event) raised as one :class:`StoreError` naming the file.
    """

    def read(db: sqlite3.Connection, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(db, *args, **kwargs)
        except sqlite3.ProgrammingError:
            raise  # ours, not the file's
        except sqlite3.Error as e:
            raise schema.translated(path_of(db), e) from None
        except RowError as e:
            raise schema.damaged(path_of(db), str(e)) from None

    functools.update_wrapper(read, fn)
    return read


#: What was logged already, so a client polling a damaged file does not
#: repeat the same line on every poll (bounded).
_said: set[tuple[str, str]] = set()


def _say(db: sqlite3.Connection, key: str, what: str) -> None:
    """Log one line about a damaged part of ``db``'s file, once per part."""
    path = path_of(db)
    if (path, key) in _said:
        return
    if len(_said) > 10_000:
        _said.clear()
    _said.add((path, key))
    _log.error(
        "history file {path}: {what}; run `python -m trainstream check {path}`",
        path=path,
        what=what,
    )


def _logged(db: sqlite3.Connection) -> Skipped:
    def skipped(last_read: int, resume: int | None, why: str) -> None:
        upto = "the end" if resume is None else f"id {resume}"
        _say(
            db,
            f"{last_read}:{resume}",
            f"the events after id {last_read} up to {upto} cannot be read ({why}); "
            "they are left out",
        )

    return skipped


def _bad_row(db: sqlite3.Connection, row: tuple[Any, ...], error: Exception) -> None:
    """A row that is no event, met by a replay: said, and left out."""
    if isinstance(error, TypeError) and all(isinstance(v, str) for v in row[1:3]):
        raise error  # not the row's fault
    _say(db, f"row {row[0]!r}", f"{error}; it is left out")


def scan(
    db: sqlite3.Connection,
    columns: str,
    after_id: int,
    before_id: int,
    skipped: Skipped,
    where: str = "",
    params: tuple[Any, ...] = (),
) -> Iterator[tuple[Any, ...]]:
    """
    The rows (``columns``, the id first) with ``after_id < id < before_id``
    and ``where``, in id order, read in chunks. A stretch SQLite cannot read
    (a damaged page: an error, or rows below the highest id that never come)
    is told to ``skipped``, and reading goes on after it.
    """
    cond = f"{where} AND " if where else ""
    sql = f"SELECT {columns} FROM events WHERE {cond}id > ? AND id < ? ORDER BY id"
    cursor = after_id
    top: int | None = None  # the highest id there is to read (None: unknown), once asked
    asked = False
    while True:
        n = 0
        why = ""
        try:
            rows = db.execute(f"{sql} LIMIT {_CHUNK}", (*params, cursor, before_id))
            try:
                for row in rows:
                    if not (type(row[0]) is int and cursor < row[0] < before_id):
                        why = "its pages do not hold the events in id order"
                        break
                    n += 1
                    cursor = row[0]
                    yield row
            finally:
                rows.close()  # ends the read: the WAL can be checkpointed past it
        except sqlite3.DatabaseError as e:
            if not schema.is_damage(e):
                raise
            why = str(e)
        if not why and n == _CHUNK:
            continue
        if not asked:
            top, asked = _highest(db, cond, params, after_id, before_id), True
        if not why:
            if top is None or cursor >= top:
                return
            why = f"a damaged page ends the reading before id {top}"
        resume = _readable_after(db, f"{sql} LIMIT 1", params, cursor, top, before_id)
        skipped(cursor, resume, why)
        if resume is None:
            return
        cursor = resume


def _highest(
    db: sqlite3.Connection, cond: str, params: tuple[Any, ...], after_id: int, before_id: int
) -> int | None:
    """
    The highest id ``scan`` has to reach (one probe of the index's end);
    ``None`` if that cannot be read either.
    """
    try:
        (top,) = db.execute(
            f"SELECT MAX(id) FROM events WHERE {cond}id > ? AND id < ?",
            (*params, after_id, before_id),
        ).fetchone()
    except sqlite3.DatabaseError as e:
        if not schema.is_damage(e):
            raise
        return None
    return top if type(top) is int and top < before_id else after_id


def _readable_after(
    db: sqlite3.Connection,
    probe: str,
    params: tuple[Any, ...],
    last: int,
    top: int | None,
    before_id: int,
) -> int | None:
    """
    The least ``x`` in ``(last, top]`` from which the rows after it can be
    read again (found by doubling, then halving, the distance); ``None``
    if there is none. With ``top`` unknown, ``x`` goes up to ``before_id - 1``.
    """

    def readable(x: int) -> bool:
        if top is not None and x >= top:
            return True  # nothing after it to read
        try:
            rows = db.execute(probe, (*params, x, before_id)).fetchall()
        except sqlite3.DatabaseError as e:
            if not schema.is_damage(e):
                raise
            return False
        if not rows:
            return top is None  # short of the highest id: a damaged page hides the rest
        return type(rows[0][0]) is int and x < rows[0][0] < before_id

    end = before_id - 1 if top is None else top
    if last >= end:
        return None
    low, distance = last, 1
    while True:  # low cannot be read from, high can
        high = min(last + distance, end)
        if readable(high):
            break
        if high == end:
            return None
        low, distance = high, distance * 2
    while high - low > 1:
        middle = (low + high) // 2
        if readable(middle):
            high = middle
        else:
            low = middle
    return high


def distinct(db: sqlite3.Connection, column: str, index: str) -> list[str]:
    """
    Each value of ``column`` in ``events``, skipping through ``index`` (one
    probe per value, not a row per event).
    """
    probe = f"SELECT MIN({column}) FROM events INDEXED BY {index}"
    return [
        value
        for (value,) in db.execute(
            f"WITH RECURSIVE v(x) AS (SELECT ({probe}) "
            f"UNION ALL SELECT ({probe} WHERE {column} > v.x) FROM v WHERE v.x IS NOT NULL) "
            "SELECT x FROM v WHERE x IS NOT NULL"
        )
    ]


_TABLE: _Range = ("", "", ())  # every event: a scan of the table


def _product(runs: list[str] | None, kinds: Iterable[str]) -> list[_Range]:
    if runs is None:
        return [("events_type", "type = ?", (kind,)) for kind in kinds]
    return [("events_run_type", "run = ? AND type = ?", (r, k)) for r in runs for k in kinds]


def plan(db: sqlite3.Connection, flt: Filter) -> list[_Range]:
    """
    The index ranges whose rows, merged by id, hold every event on disk that
    ``flt`` matches, and few others.
    """
    types = flt.wanted_types
    runs: list[str] | None = None
    if flt.filters_runs:
        runs = [r for r in distinct(db, "run", "events_run_type") if flt.run_matches(r)]
        if not runs:
            return []
    if runs is None and types is None and not flt.filters_names:
        return [_TABLE]
    kinds = sorted(types) if types is not None else distinct(db, "type", "events_type")
    if flt.filters_names and "metric" in kinds:
        # Names bind only events that carry one: metrics, by series; alerts
        # come by their type and the Filter sorts them.
        wanted = None if runs is None else set(runs)
        ranges = _product(runs, [k for k in kinds if k != "metric"]) + [
            ("events_metric", "type = 'metric' AND run = ? AND name = ?", (run, name))
            for run, name in db.execute("SELECT run, name FROM series ORDER BY run, name")
            if (wanted is None or run in wanted) and flt.name_matches(name)
        ]
    else:
        ranges = _product(runs, kinds)
    if len(ranges) <= MAX_RANGES:
        return ranges
    return _product(None, kinds) if len(kinds) <= MAX_RANGES else [_TABLE]


def range_sql(index: str, where: str) -> str:
    """The query of one range (``index`` ``""``: the table), ``id > ? AND id <= ?`` last."""
    if not index:
        return f"SELECT {_COLUMNS} FROM events WHERE id > ? AND id <= ? ORDER BY id"
    return (
        f"SELECT {_COLUMNS} FROM events INDEXED BY {index} "
        f"WHERE {where} AND id > ? AND id <= ? ORDER BY id"
    )


def select(
    db: sqlite3.Connection, flt: Filter, after_id: int, upto: int, take: Callable[[Row], bool]
) -> None:
    """
    Hand ``take`` each row with ``after_id < id <= upto`` that ``flt``
    matches, in id order, until it returns ``False``. In a damaged file,
    what cannot be read, or is no event (``take`` raises ``RowError``), is
    left out, and said once.
    """
    if upto <= after_id:
        return
    accepts = flt.accepts
    seen = after_id  # every row up to here was handed on (or left out)
    cursors: list[sqlite3.Cursor] = []
    try:
        for index, where, params in plan(db, flt):
            cursors.append(db.execute(range_sql(index, where), (*params, after_id, upto)))
        rows: Iterable[Row] = cursors[0] if len(cursors) == 1 else heapq.merge(*cursors)
        for row in rows:
            seen = row[0]
            try:
                if accepts(row[1], row[2], row[3]) and not take(row):
                    return
            except (RowError, TypeError) as e:
                _bad_row(db, row, e)
        return
    except sqlite3.DatabaseError as e:
        if not schema.is_damage(e):
            raise
        _say(db, "index", f"a filtered read cannot be read by index ({e}); it goes on by id")
    finally:
        for cursor in cursors:
            cursor.close()  # ends the read: the WAL can be checkpointed past it
    # Damaged: the rest from the table itself, stepping over what cannot be read.
    for row in scan(db, _COLUMNS, seen, upto + 1, _logged(db)):
        try:
            if accepts(row[1], row[2], row[3]) and not take(row):
                return
        except (RowError, TypeError) as e:
            _bad_row(db, row, e)


def records_between(db: sqlite3.Connection, after_id: int, before_id: int) -> Iterator[Record]:
    """
    Every record with ``after_id < id < before_id``, in id order (read in
    chunks); in a damaged file, without what cannot be read or decoded
    (each said once).
    """
    for row in scan(db, _COLUMNS, after_id, before_id, _logged(db)):
        try:
            record = decode(row)
        except RowError as e:
            _bad_row(db, row, e)
            continue
        yield record


@_reading
def registry(db: sqlite3.Connection) -> tuple[list[Record], dict[tuple[str, str], SeriesSummary]]:
    """
    The status, hparams and alert events, and each series' summary; for a
    run that has none of those (only logs), its first and last event, so
    the registry knows every run the file holds.
    """
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM events WHERE type IN ('status', 'hparams', 'alert') ORDER BY id"
    ).fetchall()
    known = {row[2] for row in rows}
    known.update(run for (run,) in db.execute("SELECT DISTINCT run FROM series"))
    for run in distinct(db, "run", "events_run_type"):
        if run in known:
            continue
        for order in ("ASC", "DESC"):
            rows.extend(
                db.execute(
                    f"SELECT {_COLUMNS} FROM events INDEXED BY events_run_type "
                    f"WHERE run = ? AND type = 'log' ORDER BY id {order} LIMIT 1",
                    (run,),
                )
            )
    rows = sorted({row[0]: row for row in rows}.values(), key=lambda row: row[0])
    summaries = {
        (run, name): SeriesSummary(
            count, step, math.nan if value is None else value, low, high, t, last_id
        )
        for run, name, step, count, low, high, value, t, last_id in db.execute(
            "SELECT run, name, last_step, count, min, max, last_value, last_time, last_id "
            "FROM series"
        )
    }
    return [decode(row) for row in rows], summaries


@_reading
def history(
    db: sqlite3.Connection,
    run: str,
    name: str,
    segment: int | None,
    from_step: int | None,
    to_step: int | None,
    max_points: int,
) -> tuple[list[Point], bool]:
    """
    Committed points of a series, thinned from the rollups (no scan of the
    series). All segments (``segment`` ``None``) are merged from each one's.
    Rollups that cannot be read (a damaged file): from the series' points.
    """
    try:
        return _history(db, run, name, segment, from_step, to_step, max_points)
    except sqlite3.DatabaseError as e:
        if not schema.is_damage(e):
            raise
        _say(db, f"rollup {run}/{name}", f"the rollups cannot be read ({e}); read from the events")
    where = "type = 'metric' AND run = ? AND name = ?"
    params: tuple[Any, ...] = (run, name)
    if segment is not None:
        where, params = where + " AND segment = ?", (*params, segment)
    low = -(2**63) if from_step is None else from_step
    high = 2**63 - 1 if to_step is None else to_step
    points = [
        (step, math.nan if value is None else value, t)
        for _, step, value, t in scan(
            db, "id, step, value, time", 0, 2**63 - 1, _logged(db), where, params
        )
        if isinstance(step, int) and low <= step <= high
    ]
    return downsample(points, max_points)


def _history(
    db: sqlite3.Connection,
    run: str,
    name: str,
    segment: int | None,
    from_step: int | None,
    to_step: int | None,
    max_points: int,
) -> tuple[list[Point], bool]:
    if segment is not None:
        return rollup.query(db, run, name, segment, from_step, to_step, max_points)
    segments = [
        row[0]
        for row in db.execute(
            "SELECT DISTINCT segment FROM rollup WHERE run = ? AND name = ? AND level = 1",
            (run, name),
        )
    ]
    points: list[Point] = []
    downsampled = False
    for seg in segments:
        part, thinned = rollup.query(db, run, name, seg, from_step, to_step, max_points)
        points.extend(part)
        downsampled |= thinned
    if len(points) > max_points:
        points, _ = downsample(points, max_points)
        downsampled = True
    return points, downsampled


@_reading
def segments(db: sqlite3.Connection) -> dict[tuple[str, str], tuple[int, int]]:
    """Each series' (run, name) -> (current segment, last step)."""
    rows = db.execute("SELECT run, name, segment, last_step FROM series").fetchall()
    return {(run, name): (segment, step) for run, name, segment, step in rows}


@_reading
def series(
    db: sqlite3.Connection, run: str, name: str, low: int, high: int, segment: int | None
) -> list[Point]:
    """The committed points of a series with ``low <= step <= high``, in id order."""
    where = "type = 'metric' AND run = ? AND name = ? AND step BETWEEN ? AND ?"
    params: tuple[Any, ...] = (run, name, low, high)
    if segment is not None:
        where, params = where + " AND segment = ?", (*params, segment)
    rows = db.execute(
        f"SELECT step, value, time FROM events WHERE {where} ORDER BY id", params
    ).fetchall()
    return [(step, math.nan if value is None else value, t) for step, value, t in rows]
