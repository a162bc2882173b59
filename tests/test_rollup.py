"""
Tests for :mod:`trainstream.store.rollup`: rollups kept at write time and the
downsampled queries answered from them, against brute force.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from trainstream.store import Point, downsample
from trainstream.store.rollup import (
    LEVELS,
    _cover,
    delete_run,
    ensure_schema,
    query,
    rebuild,
    trim,
    update,
)

EVENTS = """
CREATE TABLE events (id INTEGER PRIMARY KEY, type TEXT NOT NULL, run TEXT NOT NULL,
    name TEXT, step INTEGER, value REAL, time REAL NOT NULL, json TEXT NOT NULL,
    segment INTEGER);
CREATE INDEX events_series ON events (run, name, segment, step) WHERE type = 'metric';
"""

RUN, NAME, SEGMENT = "r", "loss", 0


def make_db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(EVENTS)
    db.execute("BEGIN")
    ensure_schema(db)
    db.execute("COMMIT")
    return db


def ingest(
    db: sqlite3.Connection,
    points: Sequence[tuple[str, str, int, int, float, float]],
    batch: int,
) -> None:
    """Store ``points`` the way a writer does: each batch's rows and rollups in one transaction."""
    for start in range(0, len(points), batch):
        chunk = [
            (r, n, s, st_, None if math.isnan(v) else v, t)
            for r, n, s, st_, v, t in points[start : start + batch]
        ]
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO events (type, run, name, step, value, time, json, segment)"
            " VALUES ('metric', ?, ?, ?, ?, ?, '{}', ?)",
            [(r, n, st_, v, t, s) for r, n, s, st_, v, t in chunk],
        )
        # Rows the rollups must ignore: another type, in the same run.
        db.execute(
            "INSERT INTO events (type, run, name, step, value, time, json, segment)"
            " VALUES ('log', ?, ?, 5, 1e300, 0, '{}', ?)",
            (RUN, NAME, SEGMENT),
        )
        update(db, chunk)
        db.execute("COMMIT")


def norm(points: Sequence[Point]) -> list[tuple[int, object, float]]:
    """Points comparable with ``==`` (NaN != NaN otherwise)."""
    return [(s, "nan" if math.isnan(v) else v, t) for s, v, t in points]


def rank(value: float) -> tuple[int, float]:
    return (1, 0.0) if math.isnan(value) else (0, value)


values = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
gaps = st.one_of(
    st.integers(0, 3),
    st.integers(0, 40),
    st.integers(0, 5_000),
    st.integers(0, 300_000),
    st.integers(0, 40_000_000),
    st.integers(0, 2**54),  # a span too wide to bucket in SQLite's 64-bit integers
)
starts = st.one_of(st.integers(-1000, 10**9), st.integers(2**61, 2**62))
series = st.lists(st.tuples(gaps, values), min_size=0, max_size=150)


def build(
    pairs: list[tuple[int, float]], start: int
) -> list[tuple[str, str, int, int, float, float]]:
    """One series from (gap, value) pairs, plus a few points of two other series."""
    out: list[tuple[str, str, int, int, float, float]] = []
    step = start
    for i, (gap, value) in enumerate(pairs):
        step += gap
        out.append((RUN, NAME, SEGMENT, step, value, float(i)))
        if i % 7 == 0:  # same run and name, another segment; another name
            out.append((RUN, NAME, SEGMENT + 1, step, -1e308, -1.0))
            out.append((RUN, "acc", SEGMENT, step, 1e308, -2.0))
    return out


def raw_series(points: Sequence[tuple[str, str, int, int, float, float]]) -> list[Point]:
    """Brute force: the series' points in (step, arrival) order."""
    mine = [(st_, v, t) for r, n, s, st_, v, t in points if (r, n, s) == (RUN, NAME, SEGMENT)]
    return sorted(mine, key=lambda p: p[0])


class CoverTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        lo=st.integers(-(2**40), 2**40),
        length=st.integers(1, 2**30),
        top=st.sampled_from(LEVELS),
    )
    def test_partition(self, lo: int, length: int, top: int) -> None:
        """The blocks are aligned, in order, and cover the range exactly once."""
        hi = lo + length - 1
        nxt = lo
        for level, a, b in _cover(lo, hi, top):
            self.assertLessEqual(a, b)
            self.assertLessEqual(level, top)
            width = 16**level
            self.assertEqual(a * width, nxt)
            nxt = (b + 1) * width
            if level == 0:
                self.assertLess(b - a, 15 * 2 + 1)  # raw only at the edges
        self.assertEqual(nxt, hi + 1)


class RollupRowTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(pairs=series, start=starts, batch=st.integers(1, 60))
    def test_rows_match_brute_force(
        self, pairs: list[tuple[int, float]], start: int, batch: int
    ) -> None:
        """Every rollup row holds its bucket's count, min, max and first NaN."""
        points = build(pairs, start)
        db = make_db()
        ingest(db, points, batch)
        raw = raw_series(points)
        for level in LEVELS:
            width = 16**level
            expected: dict[int, list[Point]] = {}
            for p in raw:
                expected.setdefault(p[0] // width, []).append(p)
            rows = db.execute(
                "SELECT bucket, count, min_step, min_value, min_time, max_step, max_value,"
                " max_time, nan_step, nan_time FROM rollup"
                " WHERE run = ? AND name = ? AND segment = ? AND level = ? ORDER BY bucket",
                (RUN, NAME, SEGMENT, level),
            ).fetchall()
            self.assertEqual([r[0] for r in rows], sorted(expected))
            for bucket, count, *rest in rows:
                inside = expected[bucket]
                self.assertEqual(count, len(inside))
                finite = [p for p in inside if not math.isnan(p[1])]
                nans = [p for p in inside if math.isnan(p[1])]
                if finite:
                    low = min(finite, key=lambda p: (p[1], p[0]))  # first of equals
                    high = min(finite, key=lambda p: (-p[1], p[0]))
                    self.assertEqual(tuple(rest[0:3]), low)
                    self.assertEqual(tuple(rest[3:6]), high)
                else:
                    self.assertEqual(rest[0:6], [None] * 6)
                if nans:
                    self.assertEqual(tuple(rest[6:8]), (nans[0][0], nans[0][2]))
                else:
                    self.assertEqual(rest[6:8], [None, None])

    def test_ties_keep_the_first_arrival(self) -> None:
        """Equal values at the same step, in separate batches: the first one stays."""
        db = make_db()
        points = [(RUN, NAME, SEGMENT, 7, v, t) for t, v in enumerate([1.0, 1.0, 0.0, math.nan])]
        points += [(RUN, NAME, SEGMENT, 7, v, 10.0 + t) for t, v in enumerate([0.0, 1.0, math.nan])]
        ingest(db, points, 1)
        for level in LEVELS:
            row = db.execute(
                "SELECT count, min_step, min_value, min_time, max_step, max_value, max_time,"
                " nan_step, nan_time FROM rollup WHERE level = ?",
                (level,),
            ).fetchone()
            self.assertEqual(row, (7, 7, 0.0, 2.0, 7, 1.0, 0.0, 7, 3.0))

    @settings(max_examples=30, deadline=None)
    @given(pairs=series, start=starts, batch=st.integers(1, 60))
    def test_rebuild_and_delete_run(
        self, pairs: list[tuple[int, float]], start: int, batch: int
    ) -> None:
        """rebuild() recomputes the same rows from events; delete_run() drops a run's."""
        db = make_db()
        ingest(db, build(pairs, start), batch)
        everything = "SELECT * FROM rollup ORDER BY run, name, segment, level, bucket"
        before = db.execute(everything).fetchall()
        db.execute("BEGIN")
        rebuild(db, chunk=7)
        db.execute("COMMIT")
        self.assertEqual(db.execute(everything).fetchall(), before)
        ingest(db, [("other", NAME, SEGMENT, 1, 1.0, 0.0)], 1)
        delete_run(db, RUN)
        self.assertEqual(db.execute("SELECT DISTINCT run FROM rollup").fetchall(), [("other",)])

    @settings(max_examples=100, deadline=None)
    @given(
        pairs=series,
        start=starts,
        batch=st.integers(1, 60),
        cut=st.floats(0, 1.05),
        rewind=st.booleans(),
    )
    def test_trim(
        self, pairs: list[tuple[int, float]], start: int, batch: int, cut: float, rewind: bool
    ) -> None:
        """After trim(db, last_id), the rollups equal a rebuild from what events keeps."""
        db = make_db()
        points = build(pairs, start)
        if rewind:  # later points at earlier steps, same segment: trims leave holes
            points += build(pairs[::-1], start)
        ingest(db, points, batch)
        last_id = round(db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0] * cut)
        everything = "SELECT * FROM rollup ORDER BY run, name, segment, level, bucket"
        db.execute("BEGIN")
        remaining = db.execute("SELECT count(*) FROM events WHERE id > ?", (last_id,)).fetchone()
        trim(db, last_id)
        self.assertEqual(db.execute("SELECT count(*) FROM events").fetchone(), remaining)
        trimmed = db.execute(everything).fetchall()
        rebuild(db)
        db.execute("COMMIT")
        self.assertEqual(trimmed, db.execute(everything).fetchall())


class QueryTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(
        pairs=series,
        start=starts,
        batch=st.integers(1, 200),
        bounds=st.tuples(
            st.one_of(st.none(), st.floats(-0.1, 1.1)),
            st.one_of(st.none(), st.floats(-0.1, 1.1)),
        ),
        max_points=st.integers(2, 40),
        raw_limit=st.one_of(st.integers(0, 40), st.just(20_000)),
        exact_limit=st.one_of(st.integers(0, 60), st.just(4_000)),
    )
    def test_against_brute_force(
        self,
        pairs: list[tuple[int, float]],
        start: int,
        batch: int,
        bounds: tuple[float | None, float | None],
        max_points: int,
        raw_limit: int,
        exact_limit: int,
    ) -> None:
        """
        The documented guarantees, against the raw points: exact when few;
        otherwise real points of the range, sorted, at most max_points, with
        the range's lowest and highest (NaN highest) points present.
        """
        points = build(pairs, start)
        db = make_db()
        ingest(db, points, batch)
        everything = raw_series(points)
        end = everything[-1][0] if everything else start

        def at(f: float | None) -> int | None:
            return None if f is None else start + round((end - start) * f)

        from_step, to_step = at(bounds[0]), at(bounds[1])
        raw = [
            p
            for p in everything
            if (from_step is None or p[0] >= from_step) and (to_step is None or p[0] <= to_step)
        ]
        got, dropped = query(
            db, RUN, NAME, SEGMENT, from_step, to_step, max_points, raw_limit, exact_limit
        )

        if len(raw) <= max_points or len(raw) <= exact_limit:
            expected, expected_dropped = downsample(raw, max_points)
            self.assertEqual(norm(got), norm(expected))
            self.assertEqual(dropped, expected_dropped)
            if len(raw) <= max_points:
                self.assertEqual(norm(got), norm(raw))
                self.assertFalse(dropped)
            return

        self.assertTrue(dropped)
        self.assertLessEqual(len(got), max_points)
        steps = [p[0] for p in got]
        self.assertEqual(steps, sorted(steps))
        pool = norm(raw)
        for p in norm(got):
            self.assertIn(p, pool)
            pool.remove(p)  # each real point at most once
        # The lowest and the highest (NaN above all) values; the first NaN.
        ranks = [rank(p[1]) for p in got]
        self.assertIn(min(rank(p[1]) for p in raw), ranks)
        self.assertIn(max(rank(p[1]) for p in raw), ranks)
        nans = [p[0] for p in raw if math.isnan(p[1])]
        if nans:
            self.assertIn(nans[0], [p[0] for p in got if math.isnan(p[1])])

    def test_empty_and_bad_arguments(self) -> None:
        db = make_db()
        self.assertEqual(query(db, RUN, NAME, SEGMENT, None, None, 10), ([], False))
        ingest(db, build([(1, 1.0), (1, 2.0)], 0), 10)
        self.assertEqual(query(db, RUN, NAME, SEGMENT, 5, 4, 10), ([], False))
        self.assertEqual(query(db, RUN, NAME, SEGMENT, 3, None, 10), ([], False))
        self.assertEqual(query(db, RUN, "other", SEGMENT, None, None, 10), ([], False))
        self.assertRaises(ValueError, query, db, RUN, NAME, SEGMENT, None, None, 1)


class ScaleTests(SynchronousTestCase):
    """200,000 points: a query reads a small part of them."""

    N = 200_000
    SPIKE = 123_457

    def setUp(self) -> None:
        self.db = make_db()
        points = [
            (RUN, NAME, SEGMENT, step, 1e9 if step == self.SPIKE else math.sin(step / 1000), 0.0)
            for step in range(self.N)
        ]
        ingest(self.db, points, 5_000)

    def vm_steps(self, run: object) -> int:
        """SQLite virtual-machine instructions (in thousands) spent by ``run()``."""
        ticks = [0]

        def tick() -> int:
            ticks[0] += 1
            return 0

        self.db.set_progress_handler(tick, 1000)
        try:
            run()  # type: ignore[operator]
        finally:
            self.db.set_progress_handler(None, 0)
        return ticks[0]

    def test_reads_few_rows(self) -> None:
        """
        A downsampled query over the whole series, or a middle slice, costs
        SQLite well under half the work of reading the raw points (which
        SQLite does at about 9 instructions a row, before Python builds
        200,000 tuples), and keeps the spike. With the default raw_limit the
        whole series is read at level 1 (12,500 rows, folded in SQL).
        """
        scan = self.vm_steps(
            lambda: self.db.execute(
                "SELECT step, value, time FROM events WHERE type = 'metric' AND run = ?"
                " AND name = ? AND segment = ? ORDER BY step",
                (RUN, NAME, SEGMENT),
            ).fetchall()
        )
        results: list[tuple[list[Point], bool]] = []
        for from_step, to_step, max_points, raw_limit in [
            (None, None, 2000, 20_000),
            (None, None, 200, 1_000),
            (50_001, 170_003, 500, 20_000),
        ]:
            cost = self.vm_steps(
                lambda f=from_step, t=to_step, m=max_points, r=raw_limit: results.append(
                    query(self.db, RUN, NAME, SEGMENT, f, t, m, r)
                )
            )
            got, dropped = results[-1]
            self.assertTrue(dropped)
            self.assertLessEqual(len(got), max_points)
            self.assertGreater(len(got), max_points // 2)
            self.assertIn((self.SPIKE, 1e9, 0.0), got)
            lo, hi = from_step or 0, to_step or self.N - 1
            self.assertEqual(got[0][0] >= lo and got[-1][0] <= hi, True)
            self.assertLess(cost, scan / 2, (from_step, to_step, max_points, raw_limit))
        # raw_limit 1000 reads level 2 (782 rows): far less again.
        self.assertLess(
            self.vm_steps(lambda: query(self.db, RUN, NAME, SEGMENT, None, None, 200, 1_000)),
            scan / 20,
        )

    def test_small_range_exact(self) -> None:
        """A range of fewer than max_points points comes back whole."""
        got, dropped = query(self.db, RUN, NAME, SEGMENT, 1000, 2999, 2000)
        self.assertFalse(dropped)
        self.assertEqual([p[0] for p in got], list(range(1000, 3000)))
        self.assertFalse(self.db.in_transaction)

    def test_inside_callers_transaction(self) -> None:
        """In an open transaction, query reads within it and leaves it open."""
        alone = query(self.db, RUN, NAME, SEGMENT, 10, 150_000, 300)
        self.db.execute("BEGIN")
        self.assertEqual(query(self.db, RUN, NAME, SEGMENT, 10, 150_000, 300), alone)
        self.assertTrue(self.db.in_transaction)
        self.db.execute("COMMIT")

    def test_query_plans_use_indexes(self) -> None:
        """No statement of a query scans a table."""
        plans: list[str] = []

        def trace(sql: str) -> None:
            if sql.lstrip().upper().startswith("SELECT"):
                for row in self.db.execute("EXPLAIN QUERY PLAN " + sql).fetchall():
                    plans.append(row[-1])

        # The trace callback sees expanded SQL; collect it, explain afterwards.
        statements: list[str] = []
        self.db.set_trace_callback(statements.append)
        try:
            query(self.db, RUN, NAME, SEGMENT, 17, 180_001, 2000)
        finally:
            self.db.set_trace_callback(None)
        for sql in statements:
            trace(sql)
        self.assertTrue(plans)
        for plan in plans:
            self.assertNotRegex(plan, r"^SCAN (events|rollup)\b", plan)
            self.assertNotIn("FOR ORDER BY", plan)
