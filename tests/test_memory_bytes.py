"""
Memory is bounded in bytes: the recent-events cache (the whole of a memory
history, the SQLite history's cache) keeps as many events as fit in
``--cache-mb``, each counted as its JSON plus a fixed overhead, and holds
each one once, as its JSON (``bench/memory.py`` measures the server).
"""

from __future__ import annotations

import gc
import math
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_store_lifecycle import Pump, open_store
from trainstream.config import DEFAULT_CACHE_MB, Config
from trainstream.errors import ConfigError
from trainstream.hub import make_record
from trainstream.server import StreamServer
from trainstream.store.cache import DEFAULT_CACHE_BYTES, RECORD_OVERHEAD, RecentEvents
from trainstream.store.memory import MemoryStore
from trainstream.store.records import Record
from trainstream.tap import Options

MIB = 2**20


def log(i: int, size: int = 1000, run: str = "r") -> Record:
    """A log record as the Hub makes one, its JSON ``size`` characters long (at least ~90)."""
    event: dict[str, object] = {"type": "log", "run": run, "level": "info", "time": 1.0}
    room = size - len(make_record(i, {**event, "message": ""}).json)
    return make_record(i, {**event, "message": "x" * max(1, room)})


def metric(i: int, step: int, value: float = 0.5, name: str = "loss") -> Record:
    event = {"type": "metric", "run": "r", "name": name, "step": step, "value": value, "time": 2.0}
    return make_record(i, event)


def cost(record: Record) -> int:
    return record.size + RECORD_OVERHEAD


def holds_a_dict(record: Record) -> bool:
    return any(isinstance(x, dict) for x in gc.get_referents(record))


class RecentEventsBytesTests(SynchronousTestCase):
    def test_bounded_by_bytes_oldest_first(self) -> None:
        records = [log(i) for i in range(1, 26)]
        cache = RecentEvents(max_bytes=10 * cost(records[0]))
        self.assertFalse(cache.extend(records[:10]))
        self.assertTrue(cache.extend(records[10:]))
        self.assertEqual([r.id for r in cache], list(range(16, 26)))
        self.assertEqual(cache.first_id, 16)
        self.assertLessEqual(cache.bytes, cache.max_bytes)
        self.assertEqual(cache.bytes, sum(cost(r) for r in records[15:]))
        # Found by id as before.
        self.assertIsNone(cache.get(15))
        self.assertEqual(cache.get(20), records[19])
        self.assertEqual([r.id for r in cache.after(22)], [23, 24, 25])

    def test_tiny_events_are_bounded_too(self) -> None:
        """Each record counts its overhead, so a flood of tiny events stops at the bound."""
        records = [
            make_record(i, {"type": "status", "run": "r", "time": 1.0, "state": "running"})
            for i in range(1, 5001)
        ]
        cache = RecentEvents(max_bytes=100 * RECORD_OVERHEAD)
        cache.extend(records)
        self.assertLess(len(cache), 100)
        self.assertGreater(len(cache), 50)
        self.assertEqual(cache.first_id, 5001 - len(cache))

    def test_a_count_bound_also_holds(self) -> None:
        cache = RecentEvents(max_bytes=MIB, max_records=7)
        cache.extend([log(i, 10) for i in range(1, 21)])
        self.assertEqual([r.id for r in cache], list(range(14, 21)))

    def test_a_record_bigger_than_the_bound_is_not_kept(self) -> None:
        cache = RecentEvents(max_bytes=1000)
        self.assertTrue(cache.extend([log(1, 5000)]))
        self.assertEqual((len(cache), cache.first_id, cache.bytes), (0, None, 0))

    def test_cached_records_hold_no_dict_and_still_give_event(self) -> None:
        records = [log(1, 60_000), metric(2, 7, float("nan"))]
        in_flight = [r.event for r in records]
        cache = RecentEvents(max_bytes=MIB)
        cache.extend(records)
        cached = list(cache)
        self.assertFalse(any(holds_a_dict(r) for r in cached))
        # What is in flight keeps its dict: fan-out and observers decode nothing.
        self.assertTrue(all(holds_a_dict(r) for r in records))
        self.assertIs(records[0].event, in_flight[0])
        # The JSON is one string, shared: the message is held once.
        self.assertIs(cached[0].json, records[0].json)
        self.assertEqual(cached[0], records[0])
        self.assertEqual(cached[0].event, in_flight[0])
        self.assertEqual(cached[0].event["message"], in_flight[0]["message"])
        self.assertTrue(math.isnan(cached[1].event["value"]))  # type: ignore[arg-type]
        self.assertEqual(cached[1].event["step"], 7)

    def test_dropped_records_are_released_at_once(self) -> None:
        """Not kept alive until the list is compacted: the bound is what is held."""
        records = [log(i, 2000) for i in range(1, 41)]
        texts = [r.json for r in records]
        cache = RecentEvents(max_bytes=10 * cost(records[0]))
        cache.extend(records)
        del records
        gc.collect()
        for i, text in enumerate(texts):
            holders = [x for x in gc.get_referrers(text) if isinstance(x, Record)]
            self.assertEqual(len(holders), 1 if i >= 30 else 0, i + 1)

    def test_keep_and_drop_below_count_bytes(self) -> None:
        records = [log(i, 500, run="a" if i % 2 else "b") for i in range(1, 21)]
        cache = RecentEvents(max_bytes=20 * cost(records[0]))
        cache.extend(records)
        self.assertEqual(cache.keep(lambda r: r.run == "a"), 10)
        self.assertEqual(cache.bytes, sum(cost(r) for r in cache))
        cache.drop_below(11)
        self.assertEqual([r.id for r in cache], [11, 13, 15, 17, 19])
        self.assertEqual(cache.bytes, 5 * cost(records[0]))
        # The room freed is used again: 15 more fit before anything is dropped.
        self.assertFalse(cache.extend([log(i, 500) for i in range(21, 36)]))
        self.assertTrue(cache.extend([log(36, 500)]))
        self.assertEqual(cache.first_id, 13)
        cache.clear()
        self.assertEqual((len(cache), cache.bytes), (0, 0))


class RecordTests(SynchronousTestCase):
    def test_slim_is_equal_and_decodes_on_demand(self) -> None:
        record = metric(5, 3, float("inf"))
        slim = record.slim()
        self.assertFalse(holds_a_dict(slim))
        self.assertIs(slim.slim(), slim)
        self.assertEqual(slim, record)
        self.assertEqual(hash(slim), hash(record))
        self.assertEqual(slim.event, {**record.event})
        self.assertIsNot(slim.event, slim.event)  # decoded each time: never a second copy kept
        self.assertEqual((slim.size, slim.segment, slim.name), (record.size, 0, "loss"))


class MemoryStoreBytesTests(SynchronousTestCase):
    def test_history_is_bounded_by_bytes(self) -> None:
        records = [log(i, 60_000) for i in range(1, 101)]
        store = MemoryStore(max_bytes=10 * cost(records[0]))
        store.append(records[:50])
        store.append(records[50:])
        kept = store.after(0, lambda r: True)
        self.assertEqual([r.id for r in kept], list(range(91, 101)))
        self.assertEqual(store.oldest_id, 91)
        self.assertFalse(any(holds_a_dict(r) for r in kept))
        self.assertEqual(kept[-1].event["message"], records[-1].event["message"])

    def test_default_bound(self) -> None:
        """32 MiB: a server's growth stays well under the bench targets (bench/memory.py)."""
        self.assertEqual(DEFAULT_CACHE_MB, 32.0)
        self.assertEqual(DEFAULT_CACHE_BYTES, 32 * MIB)
        store = MemoryStore()
        store.append([log(i, 60_000) for i in range(1, 1001)])
        kept = len(store.after(0, lambda r: True))
        self.assertEqual(kept, 32 * MIB // cost(log(1, 60_000)))

    def test_reads_decode_slim_metrics(self) -> None:
        store = MemoryStore(max_bytes=MIB)
        store.append([metric(i, step=i * 10, value=i / 4) for i in range(1, 6)])
        store.append([metric(6, step=5, name="acc")])
        self.assertEqual(
            [p[:2] for p in store.series("r", "loss")],
            [(10, 0.25), (20, 0.5), (30, 0.75), (40, 1.0), (50, 1.25)],
        )
        self.assertEqual(store.segments(), {("r", "loss"): (0, 50), ("r", "acc"): (0, 5)})


class SQLiteStoreBytesTests(SynchronousTestCase):
    def test_cache_is_bounded_by_bytes(self) -> None:
        """The newest events by bytes stay in memory, slim; older ones read from the file."""
        pump = Pump()
        records = [log(i, 20_000) for i in range(1, 41)]
        store = open_store(self, self.mktemp() + ".sqlite3", pump, cache_bytes=8 * cost(records[0]))
        store.append(records)
        pump.until(store.sync())
        cache = store._cache
        self.assertEqual([r.id for r in cache], list(range(33, 41)))
        self.assertFalse(any(holds_a_dict(r) for r in cache))
        everything = store.after(0, lambda r: True)
        self.assertEqual([r.id for r in everything], list(range(1, 41)))
        self.assertEqual([r.json for r in everything], [r.json for r in records])


class CacheOptionTests(SynchronousTestCase):
    def test_checked(self) -> None:
        self.assertEqual(Config().cache_mb, DEFAULT_CACHE_MB)
        self.assertEqual(Config(cache_mb=8).cache_mb, 8.0)
        self.assertIsInstance(Config(cache_mb=8).cache_mb, float)
        self.assertEqual(Config.from_value({"cache-mb": 0.5}).cache_mb, 0.5)
        bad: Any
        for bad in (0, -1, math.nan, math.inf, "32", True, None):
            with self.assertRaises(ConfigError) as caught:
                Config(cache_mb=bad)
            self.assertIn("'cache_mb'", str(caught.exception))

    def test_twistd_option(self) -> None:
        options = Options()
        options.parseOptions(["--memory", "--cache-mb", "4"])
        self.assertEqual(options.config.cache_mb, 4.0)
        with self.assertRaises(Exception) as caught:
            Options().parseOptions(["--cache-mb", "0"])
        self.assertIn("cache_mb", str(caught.exception))

    def test_bounds_the_memory_history(self) -> None:
        server = StreamServer({"memory": True, "cache_mb": 1}, MemoryReactorClock())
        big = {"type": "log", "run": "r", "level": "info", "time": 1.0, "message": "x" * 60_000}
        server.hub.accept([big] * 40)
        kept = server.store.after(0, lambda r: True)
        self.assertEqual(len(kept), MIB // cost(kept[0]))
        self.assertEqual(kept[-1].id, 40)
        self.assertFalse(any(holds_a_dict(r) for r in kept))

    def test_bounds_the_sqlite_cache(self) -> None:
        path = self.mktemp() + ".sqlite3"
        server = StreamServer({"db": path, "cache_mb": 2, "max_history": 50}, MemoryReactorClock())
        cache = server.store._cache  # type: ignore[attr-defined]
        self.assertEqual((cache.max_bytes, cache.max_records), (2 * MIB, 50))
