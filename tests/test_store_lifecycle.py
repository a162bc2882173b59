"""
A store's life, deterministically: constructing does nothing, ``start()``
takes the file, ``close()`` gives it back with every report made, a failed
start leaves nothing held, a store starts again after ``close()``; the
schema migrates; and the Twisted services that run a store.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from trainstream.errors import StoreError
from trainstream.store import Filter, Record, rollup, schema
from trainstream.store.feeder import Feeder
from trainstream.store.lock import FileLock
from trainstream.store.memory import MemoryStore
from trainstream.store.service import RetentionService, StoreService
from trainstream.store.sqlite import SQLiteStore


def record(
    event_id: int, kind: str = "log", run: str = "r", name: str | None = None, step: int = 0
) -> Record:
    """A record as the Hub makes one (fields a store looks at, its JSON)."""
    event: dict[str, object] = {"id": event_id, "type": kind, "run": run, "time": 1.0}
    if kind == "metric":
        event.update(name=name or "loss", step=step, value=0.5)
    elif kind == "alert":
        event.update(kind="nan", message="m", **({"name": name} if name else {}))
    elif kind == "log":
        event.update(level="info", message=f"m{event_id}")
    elif kind == "status":
        event.update(state="running")
    else:
        event.update(params={"lr": 0.1})
    return Record(
        id=event_id,
        type=kind,
        run=run,
        name=event.get("name"),  # type: ignore[arg-type]
        event=event,
        json=json.dumps(event, separators=(",", ":")),
    )


class Pump:
    """
    The ``call_from_thread`` of a store under test: the writer thread's
    reports wait here until the test runs them, so what the reactor thread
    knows is what the test says.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )

    def __call__(self, f: Callable[..., object], *args: Any) -> None:
        self.calls.put((f, args))

    def until(self, d: Deferred[Any], within: float = 30) -> Any:
        """Run the reports as they come until ``d`` fires (bounded); its result."""
        results: list[Any] = []
        d.addBoth(results.append)
        deadline = time.monotonic() + within
        while not results:
            f, args = self.calls.get(timeout=max(0.01, deadline - time.monotonic()))
            f(*args)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


def open_store(
    test: SynchronousTestCase, path: str, pump: Callable[..., object], **kw: Any
) -> SQLiteStore:
    store = SQLiteStore(path, pump, **kw)
    store.start()
    test.addCleanup(store.close)
    return store


def writer_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "trainstream-sqlite")


def assert_free(path: str) -> None:
    """Nobody holds ``path``'s lock: this process may take it at once."""
    FileLock(path).release()


class LifecycleTests(SynchronousTestCase):
    def test_constructing_does_no_io(self) -> None:
        """No directory, file, lock, thread or process until ``start()``."""
        directory = os.path.abspath(self.mktemp())
        path = os.path.join(directory, "history.sqlite3")
        threads = threading.active_count()
        store = SQLiteStore(path, Pump())
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(threading.active_count(), threads)
        self.assertIsNone(store._child)
        self.assertEqual(store.health().problems, ())
        for use in (
            lambda: store.last_id,
            lambda: store.append([record(1)]),
            lambda: store.after(0, Filter()),
        ):
            with self.assertRaises(StoreError) as e:
                use()
            self.assertIn(f"history file {path} is not open: start() the store", str(e.exception))
        store.close()  # closing what never started: nothing to do
        self.assertFalse(os.path.exists(directory))

    def test_started_again_after_close(self) -> None:
        """Same process, same object: the file, its ids and its epoch go on."""
        path = self.mktemp() + ".sqlite3"
        pump = Pump()
        store = open_store(self, path, pump)
        epoch = store.epoch
        store.append([record(i) for i in range(1, 11)])
        pump.until(store.sync())
        store.close()
        with self.assertRaises(StoreError) as e:
            store.append([record(11)])
        self.assertIn(f"history file {path} is closed", str(e.exception))
        assert_free(path)
        self.assertEqual(writer_threads(), 0)
        store.start()
        self.assertEqual((store.last_id, store.epoch), (10, epoch))
        with self.assertRaises(StoreError):
            SQLiteStore(path, pump).start()  # held again
        store.append([record(11, run="other")])
        pump.until(store.sync())
        self.assertEqual([r.id for r in store.after(0, Filter(runs=("other",)))], [11])
        self.assertEqual([r.id for r in store.after(8, lambda r: True)], [9, 10, 11])
        store.close()
        with sqlite3.connect(path) as db:
            self.assertEqual(db.execute("SELECT COUNT(*) FROM events").fetchone()[0], 11)

    def test_close_makes_every_report(self) -> None:
        """
        ``close()`` returns with every ``sync()`` answered, even when the
        reactor never ran the writer thread's calls (none here ever run).
        """
        path = self.mktemp() + ".sqlite3"
        store = open_store(self, path, lambda f, *a: None)
        store.append([record(i) for i in range(1, 6)])
        synced = store.sync()
        self.assertNoResult(synced)
        store.close()
        self.assertIsNone(self.successResultOf(synced))
        store.start()
        self.assertEqual(store.last_id, 5)

    def test_a_failed_start_leaves_it_closed(self) -> None:
        """No writer process: a clear error; nothing held; it starts once it can."""
        path = self.mktemp() + ".sqlite3"
        can_spawn = False
        spawn = Feeder._spawn

        def no_process(feeder: Feeder) -> Any:
            if not can_spawn:
                raise OSError(11, "Resource temporarily unavailable")
            return spawn(feeder)

        self.patch(Feeder, "_spawn", no_process)
        store = SQLiteStore(path, Pump())
        with self.assertRaises(StoreError) as e:
            store.start()
        message = str(e.exception)
        self.assertIn(f"history file {path}: cannot start its writer process", message)
        self.assertNotIn("\n", message)
        assert_free(path)
        self.assertEqual(writer_threads(), 0)
        with self.assertRaises(StoreError):
            store.append([record(1)])
        self.assertIsNone(store._child)
        can_spawn = True
        store.start()
        self.addCleanup(store.close)
        self.assertEqual(store.last_id, 0)
        self.assertIsNotNone(store._child)

    def test_a_damaged_meta_row_is_one_clear_line(self) -> None:
        path = self.mktemp() + ".sqlite3"
        made = SQLiteStore(path, Pump())
        made.start()
        made.close()
        for change, shown in (
            ("UPDATE meta SET value = 'x7' WHERE key = 'last_id'", "'x7'"),
            ("DELETE FROM meta WHERE key = 'last_id'", "missing"),
        ):
            with sqlite3.connect(path) as db:
                db.execute(change)
            with self.assertRaises(StoreError) as e:
                SQLiteStore(path, Pump()).start()
            message = str(e.exception)
            self.assertIn(f"history file {path} is damaged", message)
            self.assertIn(f"'last_id' is {shown}", message)
            self.assertIn("move it aside", message)
            assert_free(path)


class MigrationTests(SynchronousTestCase):
    def test_a_version_1_file_gains_the_read_indexes(self) -> None:
        """A file of the first schema is migrated in place; its events are read by index."""
        path = self.mktemp() + ".sqlite3"
        db = sqlite3.connect(path, isolation_level=None)
        for statement in schema._SCHEMA_1.split(";"):
            if statement.strip():
                db.execute(statement)
        rollup.ensure_schema(db)
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)", [("epoch", "e1"), ("last_id", "3"), ("floor", "1")]
        )
        for r in (record(1, run="a"), record(2, "metric", "b"), record(3, run="b")):
            db.execute(
                "INSERT INTO events (id, type, run, name, step, value, time, json, segment) "
                "VALUES (?, ?, ?, ?, ?, ?, 1.0, ?, ?)",
                (r.id, r.type, r.run, r.name, r.event.get("step"), r.event.get("value"), r.json, 0),
            )
        db.execute("PRAGMA user_version = 1")
        db.close()
        store = open_store(self, path, Pump())
        self.assertEqual((store.epoch, store.last_id), ("e1", 3))
        self.assertEqual([r.id for r in store.after(0, Filter(runs=("b",), types=("log",)))], [3])
        with sqlite3.connect(path) as other:
            version = other.execute("PRAGMA user_version").fetchone()[0]
            indexes = {
                row[0] for row in other.execute("SELECT name FROM sqlite_master WHERE type='index'")
            }
        self.assertEqual(version, schema.SCHEMA_VERSION)
        self.assertLessEqual({"events_type", "events_run_type", "events_metric"}, indexes)
        self.assertNotIn("events_run", indexes)  # (run, type) serves it


class FakeStore(MemoryStore):
    """A memory store that says what was done to it, and whose sync may fail."""

    def __init__(self, sync: Deferred[None] | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._sync = sync

    def start(self) -> None:
        self.calls.append("start")

    def sync(self) -> Deferred[None]:
        self.calls.append("sync")
        return self._sync if self._sync is not None else succeed(None)

    def close(self) -> None:
        self.calls.append("close")


class StoreServiceTests(SynchronousTestCase):
    def test_start_and_stop_a_sqlite_store(self) -> None:
        """Started by the service; its stop fires once all is committed and the file is free."""
        path = self.mktemp() + ".sqlite3"
        pump = Pump()
        store = SQLiteStore(path, pump)
        service = StoreService(store)
        self.assertFalse(os.path.exists(path))
        service.startService()
        self.addCleanup(store.close)
        self.assertTrue(service.running)
        store.append([record(i) for i in range(1, 4)])
        stopped = service.stopService()
        pump.until(stopped)
        self.assertFalse(service.running)
        assert_free(path)
        with self.assertRaises(StoreError):
            store.append([record(4)])
        with sqlite3.connect(path) as db:
            self.assertEqual(db.execute("SELECT COUNT(*) FROM events").fetchone()[0], 3)

    def test_the_stop_waits_for_sync_then_closes(self) -> None:
        synced: Deferred[None] = Deferred()
        store = FakeStore(synced)
        service = StoreService(store)
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(store.calls, ["start", "sync"])
        synced.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(store.calls, ["start", "sync", "close"])

    def test_a_failed_sync_is_logged_and_the_store_closed(self) -> None:
        store = FakeStore(fail(StoreError("history file h: events 3 to 4 are lost")))
        service = StoreService(store)
        service.startService()
        self.assertIsNone(self.successResultOf(service.stopService()))
        self.assertEqual(store.calls, ["start", "sync", "close"])
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)

    def test_a_failed_start_propagates_and_the_service_is_not_running(self) -> None:
        path = self.mktemp() + ".sqlite3"
        holder = open_store(self, path, Pump())
        service = StoreService(SQLiteStore(path, Pump()))
        with self.assertRaises(StoreError) as e:
            service.startService()
        self.assertIn(f"history file {path} is in use", str(e.exception))
        self.assertFalse(service.running)
        self.assertIsNotNone(holder._child)

    def test_a_memory_store_too(self) -> None:
        store = MemoryStore()
        service = StoreService(store)
        service.startService()
        self.successResultOf(service.stopService())


class RetentionServiceTests(SynchronousTestCase):
    def test_trims_at_start_then_every_interval_until_stopped(self) -> None:
        trims: list[tuple[float | None, float | None]] = []

        class Trims:
            def trim(self, retain_days: float | None, max_db_mb: float | None) -> Deferred[int]:
                trims.append((retain_days, max_db_mb))
                return succeed(1)

        clock = Clock()
        service = RetentionService(Trims(), clock, 7.0, None, interval=60.0)
        service.startService()
        self.assertEqual(trims, [(7.0, None)])
        clock.advance(60)
        self.assertEqual(len(trims), 2)
        service.stopService()
        clock.advance(600)
        self.assertEqual(len(trims), 2)
