"""
Whatever a client is shown or told is on disk: live clients, readers and
the registries see a batch only once it is committed; a delete answers once
it is; a full disk refuses its batch with a clear error, says so in health,
shows nothing of it, and recovers by itself when space frees.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from typing import Any

import websocket
from twisted.trial.unittest import SynchronousTestCase

from tests.faultkit import Ledger, Server, SSEReader, call, stored_events, ws_connect, ws_until
from tests.test_store_lifecycle import Pump, open_store
from tests.test_subscription import FakeSink
from trainstream.errors import DiskFullError
from trainstream.hub import Hub
from trainstream.store import writer
from trainstream.store.filter import Filter
from trainstream.store.sqlite import SQLiteStore

EVERYTHING = Filter()


def log(i: int, run: str = "r", size: int = 10) -> dict[str, object]:
    return {"type": "log", "run": run, "level": "info", "message": f"{i}:" + "x" * size}


def wait_for_reports(pump: Pump, within: float = 10) -> None:
    """Until the writer thread has reported something (left unrun)."""
    deadline = time.monotonic() + within
    while pump.calls.empty():
        if time.monotonic() > deadline:
            raise AssertionError(f"the writer reported nothing within {within} s")
        time.sleep(0.01)


def run_reports(pump: Pump) -> None:
    while not pump.calls.empty():
        f, args = pump.calls.get()
        f(*args)


class CommitFirstTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pump = Pump()
        self.store = open_store(self, self.mktemp() + ".sqlite3", self.pump)
        self.hub = Hub(self.store)
        self.sink = FakeSink()
        self.subscription = self.hub.subscribe(self.sink, EVERYTHING)
        self.subscription.start(None)
        self.observed: list[int] = []
        self.hub.observers.append(lambda records: self.observed.extend(r.id for r in records))

    def test_nothing_is_shown_before_it_is_committed(self) -> None:
        accepted, first, last = self.hub.accept([log(i) for i in range(3)])
        self.assertEqual((accepted, first, last), (3, 1, 3))
        wait_for_reports(self.pump)  # committed on disk; the reactor not told yet
        self.assertEqual(self.sink.ids, [])
        self.assertEqual(self.observed, [])
        self.assertEqual(self.store.after(0, EVERYTHING), [])
        self.assertEqual(self.store.after(0, Filter(runs=("r",))), [])
        self.assertEqual(self.hub.last_id, 0)
        late = FakeSink()
        self.hub.subscribe(late, EVERYTHING).start(0)  # a resume sees nothing either
        self.assertEqual(late.ids, [])
        self.pump.until(self.store.sync())
        self.assertEqual(self.sink.ids, [1, 2, 3])
        self.assertEqual(late.ids, [1, 2, 3])
        self.assertEqual(self.observed, [1, 2, 3])
        self.assertEqual(self.hub.last_id, 3)
        self.assertEqual([r.id for r in self.store.after(0, EVERYTHING)], [1, 2, 3])

    def test_batches_are_shown_in_order_each_once(self) -> None:
        for n in range(5):
            self.hub.accept([log(n * 10 + i) for i in range(10)])
        self.pump.until(self.store.sync())
        self.assertEqual(self.sink.ids, list(range(1, 51)))
        again = FakeSink()
        self.hub.subscribe(again, EVERYTHING).start(0)
        self.assertEqual(again.ids, list(range(1, 51)))

    def test_a_delete_answers_once_it_is_committed(self) -> None:
        self.hub.accept([log(i, "gone") for i in range(4)] + [log(9, "kept")])
        self.pump.until(self.store.sync())
        deleted = self.store.delete_run("gone")
        time.sleep(0.3)  # long enough to commit: not answered until the reactor is told
        self.assertNoResult(deleted)
        self.assertEqual(self.pump.until(deleted), 4)
        self.assertEqual(self.store.after(0, Filter(runs=("gone",))), [])
        with sqlite3.connect(self.store.path) as db:
            self.assertEqual(db.execute("SELECT COUNT(*) FROM events").fetchone()[0], 1)


def schema_pages(path: str) -> int:
    """Pages of an empty history file, for a page cap just above it."""
    pump = Pump()
    store = SQLiteStore(path, pump)
    store.start()
    store.close()
    with sqlite3.connect(path) as db:
        pages: int = db.execute("PRAGMA page_count").fetchone()[0]
    os.unlink(path)
    return pages


class FullDiskTests(SynchronousTestCase):
    """A disk that fills up, without root: SQLite's ``max_page_count`` in the writer."""

    def start(self, spare_pages: int) -> SQLiteStore:
        path = self.mktemp() + ".sqlite3"
        pages = schema_pages(path) + spare_pages
        old = os.environ.get(writer.MAX_PAGES_ENV)
        os.environ[writer.MAX_PAGES_ENV] = str(pages)
        try:
            self.pump = Pump()
            store = open_store(self, path, self.pump)
        finally:
            if old is None:
                del os.environ[writer.MAX_PAGES_ENV]
            else:
                os.environ[writer.MAX_PAGES_ENV] = old
        self.hub = Hub(store)
        self.sink = FakeSink()
        self.hub.subscribe(self.sink, EVERYTHING).start(None)
        return store

    def test_refused_not_shown_reported_and_over_once_space_frees(self) -> None:
        store = self.start(spare_pages=40)
        self.hub.accept([log(i, "old", 1000) for i in range(60)])  # ~60 KB: fits
        self.pump.until(store.sync())
        self.assertEqual(len(self.sink.ids), 60)

        _, first, last = self.hub.accept([log(i, "big", 1000) for i in range(400)])
        with self.assertRaises(DiskFullError) as refused:
            self.pump.until(store.sync())
        message = str(refused.exception)
        self.assertIn(f"history file {store.path}: the disk is full", message)
        self.assertIn("filesystem ", message)
        self.assertIn("400 events were not stored", message)
        self.assertNotIn("rollback", message.lower())
        # Nothing of it was shown, or is served.
        self.assertEqual(len(self.sink.ids), 60)
        self.assertEqual(store.after(0, Filter(runs=("big",))), [])
        self.assertEqual(len(store.after(0, EVERYTHING)), 60)
        self.assertEqual(self.hub.last_id, 60)  # no client may hold a refused id
        (problem,) = store.health().problems
        self.assertIn("the disk is full", problem)
        self.assertIn(store.path, problem)
        self.assertEqual(store.health().events_lost, 0)  # refused, not lost: never acknowledged

        # Space frees (the old run deleted); the writer sees it by itself.
        self.assertEqual(self.pump.until(store.delete_run("old")), 60)
        deadline = time.monotonic() + 10
        while store.health().problems:
            self.assertLess(time.monotonic(), deadline, store.health().problems)
            time.sleep(0.05)
            run_reports(self.pump)
        _, again, _ = self.hub.accept([log(i, "new", 1000) for i in range(20)])
        self.assertGreater(again, last)
        self.pump.until(store.sync())
        self.assertEqual([r.id for r in store.after(0, EVERYTHING)], list(range(again, again + 20)))
        self.assertEqual(self.sink.ids[60:], list(range(again, again + 20)))
        self.assertGreater(first, 60)


class RollbackTests(SynchronousTestCase):
    def test_a_full_disk_is_the_error_not_a_failed_rollback(self) -> None:
        path = self.mktemp() + ".sqlite3"
        store = SQLiteStore(path, Pump())
        store.start()
        store.close()
        db = writer.connect(path)
        self.addCleanup(db.close)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        rows: list[Any] = [
            (i, "log", "r", None, None, None, 1.0, "x" * 4000, None) for i in range(1, 50)
        ]
        with self.assertRaises(sqlite3.Error) as e:
            writer.apply(db, [("rows", rows, [], 49)])
        self.assertIn("database or disk is full", str(e.exception))
        self.assertFalse(db.in_transaction)


class StoppedWriterTests(SynchronousTestCase):
    """
    From outside, with no hook: the writer process stopped (SIGSTOP), so
    nothing can commit. No answer, ack or event may reach a client until it
    goes on (SIGCONT).
    """

    def test_nothing_is_answered_or_shown_until_the_writer_commits(self) -> None:
        server = Server(self, os.path.abspath(self.mktemp()) + ".sqlite3").start()
        status, _ = call("POST", server.rest + "/events", [log(0, "gone")])
        self.assertEqual(status, 200)
        reader = SSEReader(server, Ledger(), after=None)
        reader.start()
        self.addCleanup(reader.stop)
        self.assertTrue(reader.connected.wait(10))
        ws = ws_connect(server.ws)
        self.addCleanup(ws.close)
        (writer_pid,) = server.writers()
        os.kill(writer_pid, signal.SIGSTOP)
        self.addCleanup(os.kill, writer_pid, signal.SIGCONT)

        answers: dict[str, Any] = {}

        def ask(key: str, method: str, path: str, body: object = None) -> None:
            answers[key] = call(method, server.rest + path, body, timeout=30)

        threads = [
            threading.Thread(target=ask, args=("post", "POST", "/events", [log(1, "a")])),
            threading.Thread(target=ask, args=("delete", "DELETE", "/runs/gone")),
        ]
        for t in threads:
            t.start()
        ws.send(json.dumps({"op": "publish", "events": [log(2, "b")]}))
        time.sleep(1.5)
        self.assertEqual(answers, {})
        with self.assertRaises(websocket.WebSocketTimeoutException):  # no ack within 1 s
            ws_until(ws, lambda m: True, 1)
        self.assertEqual([e["run"] for e in reader.events], [])
        status, page = call("GET", server.rest + "/events?after=0")
        self.assertEqual([e["run"] for e in page["events"]], ["gone"])
        self.assertEqual(call("GET", server.rest + "/runs/a")[0], 404)
        self.assertEqual(call("GET", server.rest + "/runs/gone")[0], 200)  # not deleted yet

        os.kill(writer_pid, signal.SIGCONT)
        for t in threads:
            t.join(30)
        self.assertEqual(answers["post"][0], 200, answers)
        self.assertEqual(answers["delete"], (200, {"run": "gone", "deleted": 1}))
        _, ended = ws_until(ws, lambda m: m["op"] == "ack", 10)
        self.assertIsNone(ended)
        self.assertTrue(
            reader.read_until(lambda: {"a", "b"} <= {e["run"] for e in reader.events}, 5, 15)
        )
        self.assertEqual(call("GET", server.rest + "/runs/gone")[0], 404)


class OrphanWriterTests(SynchronousTestCase):
    def test_a_new_server_waits_for_the_writer_of_a_killed_one(self) -> None:
        """
        ``kill -9`` leaves the writer process with what it was sent; the
        next server must not read where ids stand until it is done, or it
        would give committed ids again.
        """
        server = Server(self, os.path.abspath(self.mktemp()) + ".sqlite3").start()
        status, body = call("POST", server.rest + "/events", [log(i, "a") for i in range(10)])
        self.assertEqual(status, 200)
        (writer_pid,) = server.writers()
        os.kill(writer_pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(writer_pid, signal.SIGKILL) if _alive(writer_pid) else None)
        done: dict[str, Any] = {}

        def publish() -> None:
            try:
                done["answer"] = call("POST", server.rest + "/events", big())
            except OSError as e:  # the server is killed before it answers
                done["error"] = e

        threading.Thread(target=publish).start()
        time.sleep(1.0)  # accepted, sent to the stopped writer (or queued for it)
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)  # type: ignore[union-attr]
        again = threading.Thread(target=server.start)
        again.start()
        time.sleep(2.0)
        self.assertTrue(again.is_alive(), "the new server took the file from a live writer")
        os.kill(writer_pid, signal.SIGCONT)  # it commits what it had, then sees the end
        again.join(45)
        self.assertFalse(again.is_alive())
        with open(os.path.join(server.dir, "server-1.log")) as f:
            killed = f.read()  # where the orphan writer's stderr went: a user's terminal
        self.assertNotIn("Traceback", killed)
        self.assertNotIn("BrokenPipeError", killed)
        stored_before = stored_events(server.rest)
        status, body = call("POST", server.rest + "/events", [log(i, "b") for i in range(5)])
        self.assertEqual(status, 200, body)
        self.assertGreater(body["first_id"], max(stored_before))
        stored = stored_events(server.rest)
        for event_id, event in stored_before.items():
            self.assertEqual(stored[event_id], event)


def big() -> list[dict[str, object]]:
    return [log(i, "big", 200) for i in range(20_000)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
