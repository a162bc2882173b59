"""
Filtered reads of the SQLite history: exactly what the Filter matches
(wherever the events are: the file only, the file and the cache, the cache
only), through indexes, at a cost that does not grow with the history the
filter does not match.
"""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.test_store_lifecycle import Pump, open_store, record
from trainstream.store import Filter, Match, Record, reads
from trainstream.store.sqlite import SQLiteStore

RUNS = ("a", "b", "a.b", "c-1", "x:y/z")
NAMES = ("loss", "acc", "train/loss", "lr")


def history(n: int, runs: tuple[str, ...] = RUNS, first: int = 1) -> list[Record]:
    """``n`` events of every type over ``runs`` and ``NAMES``, ids from ``first``."""
    out = []
    for i in range(first, first + n):
        run = runs[i % len(runs)]
        kind = ("metric", "metric", "metric", "log", "status", "alert", "hparams")[i % 7]
        name = NAMES[(i // 7) % len(NAMES)] if kind == "metric" or i % 2 else None
        out.append(record(i, kind, run, name, step=i))
    return out


def vm_steps(store: SQLiteStore, match: Match) -> int:
    """SQLite virtual machine steps one resume from id 0 costs: rows visited, probes made."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    db = db_of(store)
    db.set_progress_handler(count, 1)
    try:
        store.after(0, match, 2000)
    finally:
        db.set_progress_handler(None, 1)
    return steps


def db_of(store: SQLiteStore) -> sqlite3.Connection:
    assert store._open is not None
    return store._open.db


globs = st.sampled_from(
    ["*", "a", "a*", "?", "a.?", "[ab]", "[!a]*", "x:y/*", "c-[0-9]", "zz*", ""]
)
names = st.sampled_from(["*", "loss", "*loss", "train/*", "l?", "[al]*", "zz", ""])
kinds = st.sampled_from(["metric", "log", "status", "alert", "hparams", "nope", "*"])
filters = st.builds(
    Filter,
    runs=st.lists(globs, max_size=2).map(tuple),
    names=st.lists(names, max_size=2).map(tuple),
    types=st.lists(kinds, max_size=3).map(tuple),
)


class FilteredReadTests(SynchronousTestCase):
    def test_exactly_what_the_filter_matches(self) -> None:
        """
        Ids 1-250 in the file only, 251-300 in the file and the cache,
        301-400 appended but not committed as the reactor knows it (so not
        visible): any filter, any resume point, any limit reads what the
        Filter itself picks from the visible ones, records as they were given.
        """
        pump = Pump()
        store = open_store(self, self.mktemp() + ".sqlite3", pump, cache_events=150)
        given_records = history(400)
        store.append(given_records[:300])
        pump.until(store.sync())
        store.append(given_records[300:])  # its reports are never run
        self.assertEqual(store._done, 300)

        @settings(max_examples=400, deadline=None)
        @given(filters, st.integers(0, 400), st.one_of(st.none(), st.integers(1, 60)))
        def check(flt: Filter, after: int, limit: int | None) -> None:
            wanted = [r for r in given_records[:300] if r.id > after and flt.matches(r)]
            got = store.after(after, flt, limit)
            self.assertEqual([r.id for r in got], [r.id for r in wanted[:limit]])
            self.assertEqual([r.event for r in got], [r.event for r in wanted[:limit]])

        check()

    def test_a_deleted_run_is_not_read_from_the_cache_range(self) -> None:
        """A delete shows once it is committed, in the file and the cache alike."""
        pump = Pump()
        store = open_store(self, self.mktemp() + ".sqlite3", pump, cache_events=50)
        store.append(history(100, runs=("gone", "kept")))
        pump.until(store.sync())
        deleted = store.delete_run("gone")
        gone = Filter(runs=("gone",))
        # Until the reactor is told, the cache still serves the run (the file
        # may already have dropped it: a committed delete may show early).
        self.assertEqual(len(store.after_cached(50, gone, None) or ()), 25)
        store.append([record(101, run="kept")])
        pump.until(store.sync())  # the delete is committed with it
        self.assertEqual(self.successResultOf(deleted), 50)
        self.assertEqual(store.after(0, gone), [])
        self.assertEqual(len(store.after(0, Filter(runs=("kept",)))), 51)

    def test_many_runs_are_read_by_type(self) -> None:
        """Past ``MAX_RANGES`` (runs x types) it reads by type and stays exact."""
        pump = Pump()
        store = open_store(self, self.mktemp() + ".sqlite3", pump, cache_events=10)
        runs = tuple(f"r{i:03}" for i in range(300))
        given_records = history(2000, runs=runs)
        store.append(given_records)
        pump.until(store.sync())
        flt = Filter(runs=("r1*", "r2?3", "r0*"), types=("log", "metric"))
        self.assertEqual(reads.plan(db_of(store), flt)[0][0], "events_type")
        wanted = [r.id for r in given_records if flt.matches(r)]
        self.assertEqual([r.id for r in store.after(0, flt)], wanted)
        self.assertEqual([r.id for r in store.after(wanted[10], flt, 5)], wanted[11:16])


#: Filters that match nothing in ``history(..., runs=("a", "b"))``.
NOTHING = (
    Filter(runs=("nomatch*",)),
    Filter(runs=("[!ab]*",)),
    Filter(types=("nope",)),
    Filter(runs=("a",), types=("nope", "other")),
    Filter(types=("metric",), names=("zz*",)),
    Filter(runs=("b",), types=("metric",), names=("zz",)),
)


class CostTests(SynchronousTestCase):
    """What a non-matching filter costs does not depend on the history's length."""

    def open_with(self, n: int) -> SQLiteStore:
        pump = Pump()
        store = open_store(self, self.mktemp() + ".sqlite3", pump, cache_events=100)
        for start in range(1, n + 1, 5000):
            store.append(history(min(5000, n + 1 - start), runs=("a", "b"), first=start))
        pump.until(store.sync())
        return store

    def test_a_filter_matching_nothing_costs_the_same_on_a_long_history(self) -> None:
        short, long = self.open_with(1000), self.open_with(30_000)
        for flt in NOTHING:
            self.assertEqual(short.after(0, flt), [])
            self.assertEqual(long.after(0, flt), [])
            few, many = vm_steps(short, flt), vm_steps(long, flt)
            # An index one level deeper costs a few steps per probe, no more.
            self.assertLessEqual(many, few * 1.25 + 20, flt)
        # What the counter counts: a predicate has to look at every row.
        nothing = NOTHING[0].matches
        few, many = vm_steps(short, nothing), vm_steps(long, nothing)
        self.assertGreater(many, few * 20)

    def test_every_range_is_an_index_search_in_id_order(self) -> None:
        """EXPLAIN QUERY PLAN: a SEARCH of the planned index by rowid range, no sort."""
        store = self.open_with(2000)
        db = db_of(store)
        planned = set()
        for flt in (
            *NOTHING,
            Filter(runs=("a",)),
            Filter(types=("log", "status")),
            Filter(runs=("a", "b"), types=("metric",)),
            Filter(names=("loss",)),
            Filter(runs=("a",), names=("l*",), types=("metric", "alert")),
        ):
            for index, where, params in reads.plan(db, flt):
                planned.add(index)
                sql = reads.range_sql(index, where)
                steps = db.execute("EXPLAIN QUERY PLAN " + sql, (*params, 0, 10)).fetchall()
                details = " / ".join(row[3] for row in steps)
                self.assertEqual(len(steps), 1, details)
                self.assertIn(f"SEARCH events USING INDEX {index} (", details)
                self.assertIn("rowid>? AND rowid<?", details)
        self.assertEqual(planned, {"events_type", "events_run_type", "events_metric"})
        probe = "SELECT MIN(run) FROM events INDEXED BY events_run_type WHERE run > ?"
        details = db.execute("EXPLAIN QUERY PLAN " + probe, ("a",)).fetchall()[0][3]
        self.assertIn("SEARCH events USING COVERING INDEX events_run_type (run>?)", details)
