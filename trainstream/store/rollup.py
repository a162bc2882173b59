"""
Multi-resolution rollups of metric series in SQLite, kept up to date at write
time, so a downsampled view of a long series reads a few thousand rows
instead of scanning millions.

Pure functions on a :class:`sqlite3.Connection`: no reactor, no threads. The
writer thread calls :func:`update` inside the same transaction that inserts
the raw ``events`` rows; a reader calls :func:`query`.

Levels ``k = 1..6`` cut the steps of each ``(run, name, segment)`` series
into buckets of ``16**k`` steps (16, 256, 4096, 65536, 1M, 16M), bucket
``step // 16**k``. A ``rollup`` row holds one bucket's point count, its
minimum point and maximum point among the non-NaN values (``(step, value,
time)``; ties go to the smaller step, then to the earlier arrival) and its
first NaN point (smallest step, then earliest arrival), so a NaN is never
hidden: as in :func:`trainstream.store.downsample`, NaN ranks above every
number.

What :func:`query` guarantees, for the points of one series with
``from_step <= step <= to_step`` (the *range*: ``n`` points, first and last
steps ``first`` and ``last``) and ``max_points >= 2``:

* ``n <= max(max_points, exact_limit)``: exactly ``downsample(points,
  max_points)`` of those points, read from ``events`` in ``(step, id)``
  order. So when ``n <= max_points``: all of them, in step order, ``False``.
* otherwise ``(points, True)``, where

  - every point is a real point of the range (never invented or averaged),
    each at most once, sorted by step (a same-step pair: lower value first);
  - output buckets are those of ``downsample`` (``max_points // 2`` equal
    slices of ``[first, last]``) and each holds at most two points, its
    lowest and highest offer, so there are at most ``max_points``;
  - the range's lowest value and its highest value (NaN ranks above every
    number, as in ``downsample``) are present, and so is the range's first
    NaN by step: a lone spike, up or down, is never hidden. Which of several
    equal-valued points is shown is unspecified (``downsample`` shows the
    first);
  - how buckets are filled: the range is cut exactly, edges included, into
    aligned blocks: buckets of one rollup level ``L`` in the middle (the
    finest level whose bucket count over the range, at most
    ``min(n, last // 16**L - first // 16**L + 1)``, is at most
    ``raw_limit``), finer levels towards the edges, and the raw points of
    the last < 16 steps at each edge. A block offers its lowest, highest
    and first NaN point, each to the output bucket of its own step. An output
    bucket made of whole blocks therefore shows the same values as
    ``downsample``; one that shares a block with its neighbour may show a
    less extreme pair, or nothing (so fewer than ``max_points`` points can
    come back), because the shared block's other points are not seen.

Cost: two index probes for ``first`` and ``last``; at most 13 range sums on
the coarsest blocks to count ``n`` (one row per level-6 bucket in the
middle: few unless steps are spread out far beyond ``16**6`` per point);
then either at most ``exact_limit`` raw points, or three range scans of
about ``raw_limit`` rows at level ``L`` that SQLite itself folds per output
bucket (``GROUP BY``; a bare column beside ``min()``/``max()`` comes from
the row holding it), plus fewer than 16 rows per finer level and the raw
points of fewer than 16 steps at each edge. Python handles a few offers per
output bucket, never the series.

Consistency is the caller's: every metric row inserted into ``events`` must
go through :func:`update` in the same transaction, and rows deleted from
``events`` must be removed from the rollups too: :func:`delete_run` for a
run, :func:`trim` for retention (``id <= last_id``), :func:`refresh` for
other deletions, :func:`rebuild` for everything (a migration).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from trainstream.store import Point, downsample

#: Rollup levels: level ``k`` has buckets of ``16**k`` steps.
LEVELS = (1, 2, 3, 4, 5, 6)
_SHIFT = 4  # log2(16)

_MIN_STEP = -(2**63)
_MAX_STEP = 2**63 - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollup (
    run TEXT NOT NULL,
    name TEXT NOT NULL,
    segment INTEGER NOT NULL,
    level INTEGER NOT NULL,     -- bucket width 16**level steps
    bucket INTEGER NOT NULL,    -- step // 16**level
    count INTEGER NOT NULL,     -- points in the bucket, NaN included
    min_step INTEGER,           -- lowest non-NaN point; NULL when all are NaN
    min_value REAL,
    min_time REAL,
    max_step INTEGER,           -- highest non-NaN point; NULL when all are NaN
    max_value REAL,
    max_time REAL,
    nan_step INTEGER,           -- first NaN point; NULL when the bucket has none
    nan_time REAL,
    PRIMARY KEY (run, name, segment, level, bucket)
) WITHOUT ROWID;
"""

_UPSERT = """
INSERT INTO rollup VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run, name, segment, level, bucket) DO UPDATE SET
    count = count + excluded.count,
    {min}
    {max}
    nan_step = CASE WHEN excluded.nan_step IS NOT NULL
        AND (nan_step IS NULL OR excluded.nan_step < nan_step)
        THEN excluded.nan_step ELSE nan_step END,
    nan_time = CASE WHEN excluded.nan_step IS NOT NULL
        AND (nan_step IS NULL OR excluded.nan_step < nan_step)
        THEN excluded.nan_time ELSE nan_time END
""".format(
    min="".join(
        f"min_{col} = CASE WHEN excluded.min_step IS NOT NULL AND (min_step IS NULL"
        " OR excluded.min_value < min_value OR (excluded.min_value = min_value"
        f" AND excluded.min_step < min_step)) THEN excluded.min_{col} ELSE min_{col} END,\n"
        for col in ("value", "time", "step")  # step last: the others compare the old one
    ),
    max="".join(
        f"max_{col} = CASE WHEN excluded.max_step IS NOT NULL AND (max_step IS NULL"
        " OR excluded.max_value > max_value OR (excluded.max_value = max_value"
        f" AND excluded.max_step < max_step)) THEN excluded.max_{col} ELSE max_{col} END,\n"
        for col in ("value", "time", "step")
    ),
)

_SERIES = "type = 'metric' AND run = ? AND name = ? AND segment = ?"


def ensure_schema(db: sqlite3.Connection) -> None:
    """Create the ``rollup`` table if missing (inside the caller's schema transaction)."""
    db.execute(SCHEMA)


# An aggregate, mutable while a batch is folded:
# [count, min_step, min_value, min_time, max_step, max_value, max_time, nan_step, nan_time]
_Agg = list[Any]


def _merge(into: _Agg, other: _Agg) -> None:
    """Fold aggregate ``other`` (arrived later) into ``into``."""
    into[0] += other[0]
    s = other[1]
    if s is not None:
        if into[1] is None or other[2] < into[2] or (other[2] == into[2] and s < into[1]):
            into[1], into[2], into[3] = s, other[2], other[3]
        s = other[4]
        if into[4] is None or other[5] > into[5] or (other[5] == into[5] and s < into[4]):
            into[4], into[5], into[6] = s, other[5], other[6]
    s = other[7]
    if s is not None and (into[7] is None or s < into[7]):
        into[7], into[8] = s, other[8]


def update(
    db: sqlite3.Connection,
    points: Sequence[tuple[str, str, int, int, float | None, float]],
) -> None:
    """
    Add ``points`` — ``(run, name, segment, step, value, time)`` in arrival
    order, ``value`` ``None`` (or NaN) for NaN — to the rollups of every
    level. Aggregates the batch in Python first, then upserts each touched
    bucket row once. Call it inside the transaction that inserts the same
    points into ``events``.
    """
    if not points:
        return
    level = _level1(points)
    rows: list[tuple[Any, ...]] = []
    for k in LEVELS:
        if k > 1:
            coarser: dict[tuple[str, str, int, int], _Agg] = {}
            for (run, name, segment, bucket), a in level.items():
                key = (run, name, segment, bucket >> _SHIFT)
                into = coarser.get(key)
                if into is None:
                    coarser[key] = a.copy()
                else:
                    _merge(into, a)
            level = coarser
        rows.extend(
            (run, name, segment, k, bucket, *a) for (run, name, segment, bucket), a in level.items()
        )
    db.executemany(_UPSERT, rows)


def _level1(
    points: Iterable[tuple[str, str, int, int, float | None, float]],
) -> dict[tuple[str, str, int, int], _Agg]:
    """The level-1 aggregates of ``points`` (in arrival order)."""
    level: dict[tuple[str, str, int, int], _Agg] = {}
    get = level.get
    for run, name, segment, step, value, time in points:
        key = (run, name, segment, step >> _SHIFT)
        a = get(key)
        if value is None or value != value:
            if a is None:
                level[key] = [1, None, None, None, None, None, None, step, time]
            else:
                a[0] += 1
                if a[7] is None or step < a[7]:
                    a[7] = step
                    a[8] = time
        elif a is None:
            level[key] = [1, step, value, time, step, value, time, None, None]
        else:
            a[0] += 1
            if a[1] is None:
                a[1:7] = [step, value, time, step, value, time]
                continue
            if value < a[2] or (value == a[2] and step < a[1]):
                a[1] = step
                a[2] = value
                a[3] = time
            if value > a[5] or (value == a[5] and step < a[4]):
                a[4] = step
                a[5] = value
                a[6] = time
    return level


def delete_run(db: sqlite3.Connection, run: str) -> None:
    """Forget the rollups of every series of ``run`` (with its ``events`` rows)."""
    db.execute("DELETE FROM rollup WHERE run = ?", (run,))


def trim(db: sqlite3.Connection, last_id: int) -> int:
    """
    ``DELETE FROM events WHERE id <= last_id`` (retention) and bring the
    rollups of the series that lost points back in line, recomputing only
    the buckets around the steps removed (:func:`refresh`). Inside the
    caller's transaction. Returns the number of ``events`` rows deleted.
    """
    ranges = db.execute(
        "SELECT run, name, segment, min(step), max(step) FROM events WHERE id <= ?"
        " AND type = 'metric' AND name IS NOT NULL AND step IS NOT NULL"
        " AND segment IS NOT NULL GROUP BY run, name, segment",
        (last_id,),
    ).fetchall()
    deleted = db.execute("DELETE FROM events WHERE id <= ?", (last_id,)).rowcount
    refresh(db, ranges)
    return int(deleted)


def refresh(db: sqlite3.Connection, ranges: Iterable[tuple[str, str, int, int, int]]) -> None:
    """
    Recompute the rollup buckets of every level that hold a step of
    ``(run, name, segment, low_step, high_step)``, from what ``events`` holds
    now: level 1 from the raw points of those buckets, each coarser level
    from the rows of the level below. Call after deleting points of those
    step ranges from ``events``, in the same transaction.
    """
    for run, name, segment, lo, hi in ranges:
        key = (run, name, segment)
        where = "run = ? AND name = ? AND segment = ? AND level = ? AND bucket >= ? AND bucket <= ?"
        a, b = lo >> _SHIFT, hi >> _SHIFT
        level = _level1(
            (run, name, segment, step, value, t)
            for step, value, t in db.execute(
                f"SELECT step, value, time FROM events WHERE {_SERIES}"
                " AND step >= ? AND step <= ? ORDER BY id",
                (*key, a << _SHIFT, ((b + 1) << _SHIFT) - 1),
            )
        )
        for k in LEVELS:
            shift = _SHIFT * k
            a, b = lo >> shift, hi >> shift
            if k > 1:
                level = {}
                for bucket, *agg in db.execute(
                    "SELECT bucket, count, min_step, min_value, min_time, max_step, max_value,"
                    f" max_time, nan_step, nan_time FROM rollup WHERE {where} ORDER BY bucket",
                    (*key, k - 1, a << _SHIFT, ((b + 1) << _SHIFT) - 1),
                ):
                    into = level.get((*key, bucket >> _SHIFT))
                    if into is None:
                        level[(*key, bucket >> _SHIFT)] = agg
                    else:
                        _merge(into, agg)
            db.execute(f"DELETE FROM rollup WHERE {where}", (*key, k, a, b))
            db.executemany(
                "INSERT INTO rollup VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*key, k, bucket, *agg) for (_, _, _, bucket), agg in level.items()],
            )


def rebuild(db: sqlite3.Connection, chunk: int = 50_000) -> None:
    """
    Recompute every rollup from the metric rows of ``events``, reading them
    ``chunk`` at a time in id order (for a migration, or after rows of
    ``events`` were removed by other means than :func:`delete_run`).
    Inside the caller's transaction.
    """
    db.execute("DELETE FROM rollup")
    after = 0
    while True:
        batch = db.execute(
            "SELECT id, run, name, segment, step, value, time FROM events"
            " WHERE id > ? AND type = 'metric' AND name IS NOT NULL AND step IS NOT NULL"
            " ORDER BY id LIMIT ?",
            (after, chunk),
        ).fetchall()
        if not batch:
            return
        after = batch[-1][0]
        update(db, [(r, n, s if s is not None else 0, st, v, t) for _, r, n, s, st, v, t in batch])


def _cover(lo: int, hi: int, top: int) -> list[tuple[int, int, int]]:
    """
    Cut ``[lo, hi]`` into aligned blocks, in step order: ``(level, a, b)``
    is rollup buckets ``a..b`` of ``level``, ``(0, a, b)`` raw steps
    ``a..b``. Buckets of ``top`` in the middle, finer ones towards the edges.
    """
    blocks: list[tuple[int, int, int]] = []

    def cut(lo: int, hi: int, level: int) -> None:
        while lo <= hi:
            if level == 0:
                blocks.append((0, lo, hi))
                return
            shift = _SHIFT * level
            a = -(-lo >> shift)  # first bucket starting at or after lo
            b = ((hi + 1) >> shift) - 1  # last bucket ending at or before hi
            if a > b:
                level -= 1
                continue
            cut(lo, (a << shift) - 1, level - 1)
            blocks.append((level, a, b))
            lo, level = (b + 1) << shift, level - 1

    cut(lo, hi, top)
    return blocks


def _value(v: float | None) -> float:
    return math.nan if v is None else v


def query(
    db: sqlite3.Connection,
    run: str,
    name: str,
    segment: int,
    from_step: int | None,
    to_step: int | None,
    max_points: int,
    raw_limit: int = 20_000,
    exact_limit: int = 4_000,
) -> tuple[list[Point], bool]:
    """
    The points of series ``(run, name, segment)`` with ``from_step <= step
    <= to_step`` (either bound ``None`` for open), thinned to at most
    ``max_points`` like :func:`trainstream.store.downsample`; see the module
    docstring for exactly what is guaranteed. Returns ``(points, downsampled)``.

    :param raw_limit: the most rollup rows to read at the level chosen.
    :param exact_limit: ranges of up to this many points (or ``max_points``)
        are read raw and given to ``downsample``: exact, but each raw row
        costs a table lookup.

    Reads in one snapshot: inside the caller's transaction if one is open,
    else in a read transaction of its own.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    if db.in_transaction:
        return _query(
            db, run, name, segment, from_step, to_step, max_points, raw_limit, exact_limit
        )
    db.execute("BEGIN")
    try:
        return _query(
            db, run, name, segment, from_step, to_step, max_points, raw_limit, exact_limit
        )
    finally:
        db.execute("COMMIT")


def _query(
    db: sqlite3.Connection,
    run: str,
    name: str,
    segment: int,
    from_step: int | None,
    to_step: int | None,
    max_points: int,
    raw_limit: int,
    exact_limit: int,
) -> tuple[list[Point], bool]:
    lo = _MIN_STEP if from_step is None else max(from_step, _MIN_STEP)
    hi = _MAX_STEP if to_step is None else min(to_step, _MAX_STEP)
    if lo > hi:
        return [], False
    key = (run, name, segment)
    row = db.execute(
        f"SELECT step FROM events WHERE {_SERIES} AND step >= ? AND step <= ?"
        " ORDER BY step LIMIT 1",
        (*key, lo, hi),
    ).fetchone()
    if row is None:
        return [], False
    first: int = row[0]
    last: int = db.execute(
        f"SELECT step FROM events WHERE {_SERIES} AND step >= ? AND step <= ?"
        " ORDER BY step DESC LIMIT 1",
        (*key, lo, hi),
    ).fetchone()[0]

    def raw(a: int, b: int) -> list[Point]:
        return [
            (s, _value(v), t)
            for s, v, t in db.execute(
                f"SELECT step, value, time FROM events WHERE {_SERIES}"
                " AND step >= ? AND step <= ? ORDER BY step, id",
                (*key, a, b),
            )
        ]

    count = 0
    for level, a, b in _cover(first, last, LEVELS[-1]):
        if level == 0:
            sql = f"SELECT count(*) FROM events WHERE {_SERIES} AND step >= ? AND step <= ?"
            count += db.execute(sql, (*key, a, b)).fetchone()[0]
        else:
            sql = (
                "SELECT coalesce(sum(count), 0) FROM rollup WHERE run = ? AND name = ?"
                " AND segment = ? AND level = ? AND bucket >= ? AND bucket <= ?"
            )
            count += db.execute(sql, (*key, level, a, b)).fetchone()[0]
    if count <= max(max_points, exact_limit):
        return downsample(raw(first, last), max_points)

    top = LEVELS[-1]
    for level in LEVELS:
        shift = _SHIFT * level
        if min(count, (last >> shift) - (first >> shift) + 1) <= raw_limit:
            top = level
            break

    buckets = max_points // 2
    span = last - first + 1
    # Per output bucket: the lowest offer as (rank, value, step) and the
    # highest as (rank, value, -step), rank 1 for NaN, with its point; the
    # initial keys rank below and above every offer.
    low_key = [(2, 0.0, 0)] * buckets
    low_point: list[Point | None] = [None] * buckets
    high_key = [(-1, 0.0, 0)] * buckets
    high_point: list[Point | None] = [None] * buckets

    def offer(points: Iterable[Point]) -> None:
        for point in points:
            step, value = point[0], point[1]
            i = (step - first) * buckets // span
            k = (1, 0.0, step) if value != value else (0, value, step)
            if k < low_key[i]:
                low_key[i] = k
                low_point[i] = point
            k = (k[0], k[1], -step)
            if k > high_key[i]:
                high_key[i] = k
                high_point[i] = point

    # SQLite folds each block's rows into output buckets itself (a bare
    # column beside min() or max() comes from the row holding it), so Python
    # sees at most three offers per output bucket and block, not every row;
    # unless the bucket arithmetic could overflow 64 bits: then every row.
    grouped = span * buckets < 2**62
    for level, a, b in _cover(first, last, top):
        if level == 0:
            offer(raw(a, b))
            continue
        for column, agg, point in (
            ("min", "min", "min_step, min_value, min_time"),
            ("max", "max", "max_step, max_value, max_time"),
            ("nan", "min", "nan_step, NULL, nan_time"),
        ):
            where = (
                "FROM rollup WHERE run = ? AND name = ? AND segment = ? AND level = ?"
                f" AND bucket >= ? AND bucket <= ? AND {column}_step IS NOT NULL"
            )
            args: tuple[object, ...] = (*key, level, a, b)
            if grouped:
                sql = (
                    f"SELECT {point}, {agg}({column}_{'step' if column == 'nan' else 'value'})"
                    f" {where} GROUP BY ({column}_step - ?) * ? / ?"
                )
                args += (first, buckets, span)
            else:
                sql = f"SELECT {point} {where}"
            offer((s, _value(v), t) for s, v, t, *_ in db.execute(sql, args))

    out: list[Point] = []
    for i in range(buckets):
        lp, hp = low_point[i], high_point[i]
        if lp is None or hp is None:
            continue
        if lp[0] == hp[0] and low_key[i][:2] == high_key[i][:2]:
            out.append(lp)  # the same point
        elif hp[0] < lp[0]:
            out.extend((hp, lp))
        else:
            out.extend((lp, hp))
    return out, True


__all__ = [
    "LEVELS",
    "SCHEMA",
    "delete_run",
    "ensure_schema",
    "query",
    "rebuild",
    "refresh",
    "trim",
    "update",
]
