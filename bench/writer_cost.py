"""
Benchmark: what the SQLite writer spends per metric row, and on what.

The writer process's own function (``trainstream.store.writer.apply``) on
rows shaped like ``bench/ingest.py``'s (2 runs x 10 series, 2000-row
transactions), in this process, CPU time per row (median of the
transactions after the first 10), for the schema as it is and with parts
taken away: the two indexes of filtered reads by type made partial (no
metric rows), no index on events but its id, and each of those without the
rollups. Variants take turns within each round. It prints figures and never
fails on them::

    PYTHONPATH=. .venv/bin/python bench/writer_cost.py [--rounds 3] [--batches 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import machine_lines

from trainstream.store import rollup, schema, writer

BATCH = 2000
RUNS = 2
NAMES = 10
_INDEXES = ("events_type", "events_run_type", "events_metric", "events_series")


def batch_rows(number: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """One transaction's event rows and series rows, as the feeder makes them."""
    t = time.time()
    rows = []
    base = number * BATCH
    per_series = BATCH // (RUNS * NAMES)
    for i in range(BATCH):
        event_id = base + i + 1
        run, name = f"ingest-{i % RUNS}", f"m{(i // RUNS) % NAMES}"
        step = number * per_series + i // (RUNS * NAMES)
        value = round(((i * 7919) % 1000) / 997.0, 6)
        text = (
            f'{{"id":{event_id},"type":"metric","run":"{run}","time":{t!r},'
            f'"name":"{name}","step":{step},"value":{value!r}}}'
        )
        rows.append((event_id, "metric", run, name, step, value, t, text, 0))
    series = [
        (f"ingest-{r}", f"m{n}", 0, number * per_series, per_series, 0.0, 1.0, 0.5, t, base + BATCH)
        for r in range(RUNS)
        for n in range(NAMES)
    ]
    return rows, series


def _partial(db: Any) -> None:
    db.execute("DROP INDEX events_type")
    db.execute("DROP INDEX events_run_type")
    db.execute("CREATE INDEX events_type ON events (type) WHERE type != 'metric'")
    db.execute("CREATE INDEX events_run_type ON events (run, type) WHERE type != 'metric'")


def _no_indexes(db: Any) -> None:
    for index in _INDEXES:
        db.execute(f"DROP INDEX {index}")


VARIANTS: dict[str, Callable[[Any], None] | None] = {
    "schema as it is": None,
    "type indexes partial": _partial,
    "no event indexes": _no_indexes,
}


def measure(change: Callable[[Any], None] | None, batches: int, rollups: bool) -> float:
    """Microseconds of CPU per row, median over the transactions after the first 10."""
    folder = tempfile.mkdtemp(prefix="trainstream-writer-cost-")
    path = os.path.join(folder, "history.sqlite3")
    db = writer.connect(path)
    schema.migrate(db, path)
    if change is not None:
        change(db)
    data = [batch_rows(n) for n in range(batches)]
    update = rollup.update
    if not rollups:
        rollup.update = lambda db, points: None  # type: ignore[assignment]
    try:
        times = []
        for rows, series in data:
            started = time.process_time()
            writer.apply(db, [("rows", rows, series, rows[-1][0])])
            times.append(time.process_time() - started)
    finally:
        rollup.update = update  # type: ignore[assignment]
        db.close()
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    return statistics.median(times[10:]) / BATCH * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args(argv)
    args.rounds = max(1, min(args.rounds, 20))
    args.batches = max(12, min(args.batches, 1000))
    print("writer_cost: the SQLite writer's CPU per metric row")
    for line in machine_lines():
        print("  " + line)
    figures: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for rollups in (True, False):
            for label, change in VARIANTS.items():
                key = label + ("" if rollups else ", no rollups")
                figures.setdefault(key, []).append(measure(change, args.batches, rollups))
    reference = statistics.median(figures["schema as it is"])
    for key, values in figures.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {key:<38} {median:6.2f} us/row ({runs}); {median / reference:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
