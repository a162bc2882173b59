"""
Benchmark: durable metric history on SQLite with write-time rollups
(:mod:`trainstream.store.rollup`). Targets (issue "Durable history on
SQLite"): a ``max_points=2000`` query over a series of 10 million points in
<= 50 ms without loading the series into Python; ingest >= 50,000 metric
events/s.

1. Builds a file database (in a temporary directory, removed afterwards)
   holding one series of N points (10,000,000; ``--quick``: 1,000,000) and
   three smaller series, the way the writer thread does: batches of events
   inserted into ``events`` and folded into the rollups by ``update`` in the
   same transaction. Then times ``query(..., max_points=2000)`` over the
   whole series and over sub-ranges: the first (cold: a new connection, empty
   SQLite page cache, OS cache warm) query, then repetitions on the same
   connection (median, p99).
2. Ingest: batches of 1000 metric events over 10 series (100 steps x 10
   metrics) into a fresh database by one thread: per batch, ``BEGIN``,
   ``executemany`` insert, ``update``, ``COMMIT``; events/s from the median
   batch time, with and without the rollups.

It prints figures and never fails on speed::

    .venv/bin/python bench/sqlite_scale.py [--quick] [--points N] [--reps 30] [--db PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _common import machine_lines, percentile, use_tree

use_tree()

from trainstream.store.rollup import query, update  # noqa: E402
from trainstream.store.schema import migrate  # noqa: E402

INSERT = (
    "INSERT INTO events (type, run, name, step, value, time, json, segment)"
    " VALUES ('metric', ?, ?, ?, ?, ?, ?, ?)"
)

Event = tuple[str, str, int, int, float | None, float]  # run, name, segment, step, value, time


def connect(path: Path) -> sqlite3.Connection:
    """As the store opens its file: WAL, synchronous=NORMAL, autocommit mode."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def create(path: Path) -> sqlite3.Connection:
    """A new file with the store's own schema: every index it has costs each insert."""
    db = connect(path)
    migrate(db, str(path))
    return db


def rows(events: list[Event]) -> list[tuple[object, ...]]:
    """The ``events`` rows of a batch, with a short JSON text like the real one."""
    return [
        (
            run,
            name,
            step,
            value,
            t,
            f'{{"type":"metric","run":"{run}","name":"{name}","step":{step},'
            f'"value":{"NaN" if value is None else value!r},"time":{t!r}}}',
            segment,
        )
        for run, name, segment, step, value, t in events
    ]


def write(db: sqlite3.Connection, batch: list[tuple[object, ...]], events: list[Event]) -> None:
    """One writer transaction: the raw rows and their rollups."""
    db.execute("BEGIN")
    db.executemany(INSERT, batch)
    update(db, events)
    db.execute("COMMIT")


def big_series(n: int, seed: int) -> Iterator[Event]:
    """``n`` points of run ``big`` metric ``loss`` (a noisy walk, one spike, a few NaN),
    interleaved with three smaller series."""
    rng = random.Random(seed)
    value = 1.0
    t = 1.7e9
    spike = n * 2 // 3
    for step in range(n):
        value = abs(value + rng.gauss(0.0, 0.01))
        t += 0.001
        v: float | None = value
        if step == spike:
            v = 1e6
        elif step % 1_000_003 == 999_999:
            v = None
        yield ("big", "loss", 0, step, v, t)
        if step % 50 == 0:
            for name in ("lr", "acc", "grad_norm"):
                yield ("big", name, 0, step, rng.random(), t)


def chunks(source: Iterator[Event], size: int) -> Iterator[list[Event]]:
    batch: list[Event] = []
    for e in source:
        batch.append(e)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def build(path: Path, n: int, batch_size: int) -> None:
    db = create(path)
    start = time.perf_counter()
    in_db = 0.0
    count = 0
    next_report = 1_000_000
    for events in chunks(big_series(n, seed=1), batch_size):
        batch = rows(events)
        t0 = time.perf_counter()
        write(db, batch, events)
        in_db += time.perf_counter() - t0
        count += len(events)
        if count >= next_report:
            elapsed = time.perf_counter() - start
            print(f"    {count:>11,} events  {elapsed:7.1f} s", flush=True)
            next_report += 1_000_000
    elapsed = time.perf_counter() - start
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    rollup_rows = sqlite3.connect(path).execute("SELECT count(*) FROM rollup").fetchone()[0]
    print(
        f"  build: {count:,} events in {elapsed:.1f} s = {count / elapsed:,.0f} events/s overall"
        f" ({count / in_db:,.0f} events/s in insert+update+commit; batches of {batch_size}),"
        f" file {path.stat().st_size / 2**20:,.0f} MiB, {rollup_rows:,} rollup rows"
    )


def time_query(
    path: Path,
    label: str,
    call: Callable[[sqlite3.Connection], tuple[list[object], bool]],
    reps: int,
) -> None:
    db = connect(path)
    t0 = time.perf_counter()
    points, downsampled = call(db)
    cold = (time.perf_counter() - t0) * 1000
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call(db)
        times.append((time.perf_counter() - t0) * 1000)
    db.close()
    print(
        f"  {label:<34} cold={cold:7.2f}  median={statistics.median(times):7.2f}"
        f"  p99={percentile(times, 99):7.2f} ms  ({len(points)} points,"
        f" downsampled={downsampled})"
    )


def queries(path: Path, n: int, reps: int) -> None:
    print(f"  query(max_points=2000), {reps} repetitions after the cold one:")
    time_query(path, "full range", lambda db: query(db, "big", "loss", 0, None, None, 2000), reps)
    rng = random.Random(7)
    # The exact path at its largest (exact_limit points read raw), then the
    # rollup path just above it, then random sub-ranges.
    ranges = [(n // 3, n // 3 + 4_000 - 1), (n // 3, n // 3 + 20_000 - 1)]
    for _ in range(5):
        length = int(math.exp(rng.uniform(math.log(50_000), math.log(n * 0.9))))
        start = rng.randrange(0, n - length)
        ranges.append((start, start + length - 1))
    for lo, hi in ranges:
        time_query(
            path,
            f"steps {lo:,}..{hi:,}",
            lambda db, lo=lo, hi=hi: query(db, "big", "loss", 0, lo, hi, 2000),
            reps,
        )
    time_query(
        path,
        "series lr (n/50 points, sparse)",
        lambda db: query(db, "big", "lr", 0, None, None, 2000),
        reps,
    )


def ingest(path: Path, batches: int, with_rollup: bool) -> None:
    db = create(path)
    times: list[float] = []
    update_times: list[float] = []
    t_start = time.perf_counter()
    total = 0
    names = [f"m{i}" for i in range(10)]
    for b in range(batches):
        events: list[Event] = [
            ("run", name, 0, b * 100 + s, math.sin(b * 100 + s) + i, 1.7e9 + b + s / 100)
            for s in range(100)
            for i, name in enumerate(names)
        ]
        batch = rows(events)  # the writer has the JSON already: not timed
        t0 = time.perf_counter()
        db.execute("BEGIN")
        db.executemany(INSERT, batch)
        t1 = time.perf_counter()
        if with_rollup:
            update(db, events)
        t2 = time.perf_counter()
        db.execute("COMMIT")
        times.append(time.perf_counter() - t0)
        update_times.append(t2 - t1)
        total += len(events)
    wall = time.perf_counter() - t_start
    db.close()
    median = statistics.median(times)
    print(
        f"  {'with' if with_rollup else 'without'} rollups: {batches} batches of 1000,"
        f" median batch {median * 1000:.2f} ms (update {statistics.median(update_times) * 1000:.2f}"
        f" ms), p99 {percentile(times, 99) * 1000:.2f} ms -> {1000 / median:,.0f} events/s"
        f" (median), {total / sum(times):,.0f} events/s (mean),"
        f" {total / wall:,.0f} events/s incl. building rows"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1,000,000 points, fewer batches")
    parser.add_argument("--points", type=int, default=None, help="points in the big series")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=5_000, help="events per build transaction")
    parser.add_argument("--ingest-batches", type=int, default=None)
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="build the history in this file and keep it; reuse it if it exists",
    )
    args = parser.parse_args(argv)
    n = args.points or (1_000_000 if args.quick else 10_000_000)
    batches = args.ingest_batches or (300 if args.quick else 2_000)

    for line in machine_lines():
        print(line)
    print(f"sqlite:  {sqlite3.sqlite_version}; load average {os.getloadavg()[0]:.2f} at start")
    # A SIGTERM unwinds like Ctrl-C, so the temporary directory goes too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="trainstream-sqlite-scale-") as tmp:
        print(f"1. history of {n:,} points")
        path = args.db or Path(tmp) / "history.sqlite"
        if path.exists():
            print(f"  reusing {path}")
        else:
            build(path, n, args.batch)
        queries(path, n, args.reps)
        print("2. ingest, one writer thread")
        for with_rollup in (True, False):
            ingest(Path(tmp) / f"ingest-{with_rollup}.sqlite", batches, with_rollup)


if __name__ == "__main__":
    main()
