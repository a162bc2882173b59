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
``from_step <= step <= to_step`` (the *range*; ``n`` of them) and
``max_points >= 2``:

* ``n <= raw_limit`` (which covers ``n <= max_points``): the answer is
  exactly ``downsample(points, max_points)`` of those points, read from
  ``events`` in ``(step, id)`` order. In particular, when ``n <=
  max_points`` it is all of them, in step order, with ``False``.
* ``n > raw_limit``: ``(points, True)`` where ``points`` are real points of
  the range (never invented or averaged), sorted by step (a same-step pair in
  one output bucket: the lower value first), at most two per output bucket
  and so at most ``max_points``. Output buckets are those of ``downsample``:
  ``max_points // 2`` equal slices of ``[first, last]``, the first and last
  steps of the range. The range is covered exactly, edges included, by
  aligned blocks: rollup buckets of one level ``L`` (the finest whose bucket
  count over the range is at most ``raw_limit``) in the middle, finer rollup
  buckets towards the edges and raw points for the last < 16 steps at each
  edge. Every block offers its minimum, maximum and first NaN point, each to
  the output bucket of its own step, which keeps the lowest and highest of
  its offers (NaN above every number; ties to the smaller step). Therefore:

  - the range's lowest value (its first point by step) is present; so is its
    highest value (likewise); if the range holds a NaN, its first NaN is
    present (a NaN is the highest value); a lone spike is always present;
  - where a block straddles output buckets, points of it other than its
    extremes are not seen, so an output bucket may show a less extreme pair
    than ``downsample`` would, or nothing. With ``raw_limit`` rows or more
    per level chosen this only happens when output buckets are narrower than
    rollup buckets, at the straddled edges.

``query`` reads at most about ``raw_limit + 2 * 15 * 6`` rollup rows plus
the raw points of at most 2 * 15 steps, and counts the range with a few
index lookups (coarsest blocks), never scanning the series. The counting is
bounded by the number of level-6 rows in the range, which is small unless
steps are spread over far more than ``16**6`` per point.

Consistency is the caller's: every metric row inserted into ``events`` must
go through :func:`update` in the same transaction, and rows deleted from
``events`` must be removed from the rollups too (:func:`delete_run`, or
:func:`rebuild`).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
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


def delete_run(db: sqlite3.Connection, run: str) -> None:
    """Forget the rollups of every series of ``run`` (with its ``events`` rows)."""
    db.execute("DELETE FROM rollup WHERE run = ?", (run,))


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
) -> tuple[list[Point], bool]:
    """
    The points of series ``(run, name, segment)`` with ``from_step <= step
    <= to_step`` (either bound ``None`` for open), thinned to at most
    ``max_points`` like :func:`trainstream.store.downsample`; see the module
    docstring for exactly what is guaranteed. Returns ``(points, downsampled)``.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
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
    if count <= max_points or count <= raw_limit:
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

    def offer(points: list[Point]) -> None:
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

    for level, a, b in _cover(first, last, top):
        if level == 0:
            offer(raw(a, b))
            continue
        offers: list[Point] = []
        for r in db.execute(
            "SELECT min_step, min_value, min_time, max_step, max_value, max_time,"
            " nan_step, nan_time FROM rollup WHERE run = ? AND name = ? AND segment = ?"
            " AND level = ? AND bucket >= ? AND bucket <= ? ORDER BY bucket",
            (*key, level, a, b),
        ):
            if r[0] is not None:
                offers.append((r[0], r[1], r[2]))
                offers.append((r[3], r[4], r[5]))
            if r[6] is not None:
                offers.append((r[6], math.nan, r[7]))
        offer(offers)

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


__all__ = ["LEVELS", "SCHEMA", "delete_run", "ensure_schema", "query", "rebuild", "update"]
