"""
Reads of the history file: pure functions on a :class:`sqlite3.Connection`.

They run in the reactor thread, so each is bounded in cost by what it
returns, never by the history it does not. A :class:`Filter` is answered
through the indexes of schema 2 (``schema.py``): its run globs are resolved
against the runs on disk (a skip through the run index, one probe per run),
its name globs against the series table, and each (run, type), type, run or
(run, metric) it leaves is one range of an index in id order; the ranges are
merged by id. The Filter itself has the last word on every row, so what is
read is exactly what the Hub would have sent (``fnmatch`` globs, ``[...]``
classes included: SQLite's GLOB is never asked).
"""

from __future__ import annotations

import heapq
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from trainstream.store import downsample, rollup
from trainstream.store.filter import Filter
from trainstream.store.records import Point, Record, SeriesSummary
from trainstream.store.rows import decode

#: ``(id, type, run, name, json)``: what ``decode`` makes a Record of.
Row = tuple[int, str, str, str | None, str]

_COLUMNS = "id, type, run, name, json"
_CHUNK = 2000
#: Index ranges merged at most for one read; a filter needing more (runs by
#: the hundred) is read by type, and the Filter drops the rest.
MAX_RANGES = 256

#: One range: an index, its equality condition, the condition's parameters.
_Range = tuple[str, str, tuple[str, ...]]


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
    matches, in id order, until it returns ``False``.
    """
    if upto <= after_id:
        return
    accepts = flt.accepts
    cursors: list[sqlite3.Cursor] = []
    try:
        for index, where, params in plan(db, flt):
            cursors.append(db.execute(range_sql(index, where), (*params, after_id, upto)))
        rows: Iterable[Row] = cursors[0] if len(cursors) == 1 else heapq.merge(*cursors)
        for row in rows:
            if accepts(row[1], row[2], row[3]) and not take(row):
                return
    finally:
        for cursor in cursors:
            cursor.close()  # ends the read: the WAL can be checkpointed past it


def rows_between(db: sqlite3.Connection, after_id: int, before_id: int) -> Iterator[Row]:
    """Every row with ``after_id < id < before_id``, in id order (read in chunks)."""
    cursor = after_id
    while True:
        rows: list[Row] = db.execute(
            f"SELECT {_COLUMNS} FROM events WHERE id > ? AND id < ? ORDER BY id LIMIT {_CHUNK}",
            (cursor, before_id),
        ).fetchall()
        if not rows:
            return
        yield from rows
        cursor = rows[-1][0]


def registry(db: sqlite3.Connection) -> tuple[list[Record], dict[tuple[str, str], SeriesSummary]]:
    """The status, hparams and alert events, and each series' summary."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM events WHERE type IN ('status', 'hparams', 'alert') ORDER BY id"
    ).fetchall()
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
    """
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


def segments(db: sqlite3.Connection) -> dict[tuple[str, str], tuple[int, int]]:
    """Each series' (run, name) -> (current segment, last step)."""
    rows = db.execute("SELECT run, name, segment, last_step FROM series").fetchall()
    return {(run, name): (segment, step) for run, name, segment, step in rows}


def _last_id(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()[0])


def series(
    db: sqlite3.Connection, run: str, name: str, low: int, high: int, segment: int | None
) -> tuple[list[Point], int]:
    """The committed points of a series with ``low <= step <= high``; and the last id committed."""
    db.execute("BEGIN")  # one snapshot for both reads
    try:
        on_disk = _last_id(db)
        where = "type = 'metric' AND run = ? AND name = ? AND step BETWEEN ? AND ?"
        params: tuple[Any, ...] = (run, name, low, high)
        if segment is not None:
            where, params = where + " AND segment = ?", (*params, segment)
        rows = db.execute(
            f"SELECT step, value, time FROM events WHERE {where} ORDER BY id", params
        ).fetchall()
    finally:
        db.execute("COMMIT")
    return [(step, math.nan if value is None else value, t) for step, value, t in rows], on_disk


def run_count(db: sqlite3.Connection, run: str) -> tuple[int, int]:
    """How many events of ``run`` are committed; and the last id committed."""
    db.execute("BEGIN")
    try:
        on_disk = _last_id(db)
        count = int(db.execute("SELECT COUNT(*) FROM events WHERE run = ?", (run,)).fetchone()[0])
    finally:
        db.execute("COMMIT")
    return count, on_disk
