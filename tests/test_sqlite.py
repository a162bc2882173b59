"""
The SQLite history: commits off the reactor thread, acks after commit,
survives kill -9, ids continue across restarts, one owner per file.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import connect_sse
from tests.test_processes import spawn_twistd
from tests.test_store_lifecycle import assert_free
from trainstream.errors import StoreError
from trainstream.hub import Hub
from trainstream.server import StreamServer
from trainstream.store.sqlite import SQLiteStore


def log(i: int, run: str = "r") -> dict[str, object]:
    return {"type": "log", "run": run, "level": "info", "message": f"m{i}", "time": 1.0}


def metric(step: int, value: float, run: str = "r") -> dict[str, object]:
    return {"type": "metric", "run": run, "name": "loss", "step": step, "value": value, "time": 2.0}


class StoreTests(TestCase):
    """The store with a real writer thread and the real reactor."""

    def open(self, path: str, **kw: Any) -> SQLiteStore:
        store = SQLiteStore(path, reactor.callFromThread, **kw)
        store.start()
        self.addCleanup(store.close)
        return store

    def test_sync_after_commit_and_reopen(self) -> Deferred[None]:
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = self.open(path)
            hub = Hub(store)
            hub.accept([log(i) for i in range(100)] + [metric(1, float("nan"))])
            await store.sync()
            # Committed: another connection sees it all.
            with sqlite3.connect(path) as other:
                self.assertEqual(other.execute("SELECT COUNT(*) FROM events").fetchone()[0], 101)
            epoch = store.epoch
            store.close()
            again = self.open(path)
            self.assertEqual((again.last_id, again.epoch), (101, epoch))
            hub2 = Hub(again)
            _, first, _ = hub2.accept([log(200)])
            self.assertEqual(first, 102)
            await again.sync()
            replay = again.after(95, lambda r: True)
            self.assertEqual([r.id for r in replay], [96, 97, 98, 99, 100, 101, 102])
            self.assertIn('"value":"NaN"', replay[5].json)
            self.assertNotEqual(replay[5].event["value"], replay[5].event["value"])  # a float NaN
            self.assertEqual(again.series("r", "loss")[0][0], 1)

        return Deferred.fromCoroutine(go())

    def test_reads_span_disk_and_cache(self) -> Deferred[None]:
        """A small cache: old events come from disk, new ones from memory, none twice."""
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = self.open(path, cache_events=10)
            hub = Hub(store)
            hub.accept([metric(i, i * 0.5) for i in range(50)])
            await store.sync()
            hub.accept([metric(i, i * 0.5) for i in range(50, 60)])
            # Readers see only what is committed (and so offered to live clients).
            ids = [r.id for r in store.after(0, lambda r: True)]
            self.assertEqual(ids, list(range(1, 51)))
            await store.sync()
            ids = [r.id for r in store.after(0, lambda r: True)]
            self.assertEqual(ids, list(range(1, 61)))
            steps = [p[0] for p in store.series("r", "loss", 45, 55)]
            self.assertEqual(steps, list(range(45, 56)))

        return Deferred.fromCoroutine(go())

    def test_delete_run(self) -> Deferred[None]:
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = self.open(path)
            hub = Hub(store)
            hub.accept([log(i, "gone") for i in range(5)] + [log(9, "kept")])
            deleted = store.delete_run("gone")
            hub.accept([log(10, "gone")])  # after the delete: kept
            self.assertEqual(await deleted, 5)
            await store.sync()
            with sqlite3.connect(path) as other:
                rows = other.execute("SELECT id, run FROM events ORDER BY id").fetchall()
            self.assertEqual(rows, [(6, "kept"), (7, "gone")])

        return Deferred.fromCoroutine(go())


def started(path: str, **kw: Any) -> SQLiteStore:
    store = SQLiteStore(path, reactor.callFromThread, **kw)
    store.start()
    return store


class OwnershipTests(SynchronousTestCase):
    def test_second_owner_refused(self) -> None:
        path = self.mktemp() + ".sqlite3"
        first = started(path)
        self.addCleanup(first.close)
        second = SQLiteStore(path, reactor.callFromThread)  # constructing takes nothing
        with self.assertRaises(StoreError) as e:
            second.start()
        message = str(e.exception)
        self.assertIn(path, message)
        self.assertIn(f"pid {os.getpid()}", message)
        first.close()
        second.start()  # free again: the failed start left nothing behind
        second.close()

    def test_newer_schema_refused(self) -> None:
        path = self.mktemp() + ".sqlite3"
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 99")
        with self.assertRaises(StoreError) as e:
            started(path)
        self.assertIn("schema version 99", str(e.exception))
        assert_free(path)

    def test_not_a_database(self) -> None:
        path = self.mktemp() + ".sqlite3"
        with open(path, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        with self.assertRaises(StoreError) as e:
            started(path)
        self.assertIn(path, str(e.exception))
        assert_free(path)


def post(rest: str, events: list[dict[str, object]]) -> dict[str, Any]:
    request = urllib.request.Request(
        rest + "/events",
        data=json.dumps(events).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        result: dict[str, Any] = json.load(answer)
        return result


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        result: dict[str, Any] = json.load(answer)
        return result


class CrashTests(TestCase):
    timeout = 120

    def start(self, db: str, ports_file: str, *extra: str) -> Any:
        if os.path.exists(ports_file):
            os.unlink(ports_file)
        return spawn_twistd(
            self,
            f"--db={db}",
            "--sse=tcp:0:interface=127.0.0.1",
            "--ws=tcp:0:interface=127.0.0.1",
            "--rest=tcp:0:interface=127.0.0.1",
            f"--ports-file={ports_file}",
            *extra,
        )

    def test_acked_events_survive_kill_9(self) -> Deferred[None]:
        """
        Every event the server acknowledged is there after SIGKILL and a
        restart; ids go on from there; a client holding an id from before
        the crash gets exactly what it missed.
        """
        db = os.path.abspath(self.mktemp() + ".sqlite3")
        ports_file = os.path.abspath(self.mktemp())

        async def go() -> None:
            from twisted.internet.threads import deferToThread

            proto = self.start(db, ports_file)
            await proto.listening
            with open(ports_file) as f:
                urls = json.load(f)
            acked: list[int] = []
            for batch in range(20):
                answer = await deferToThread(
                    post, urls["rest"], [log(batch * 50 + i) for i in range(50)]
                )
                acked.extend(range(answer["first_id"], answer["last_id"] + 1))
            seen_before = acked[500]
            assert proto.transport is not None
            os.kill(proto.transport.pid, signal.SIGKILL)
            await proto.ended
            # A second server may have the file once the first is dead.
            again = self.start(db, ports_file)
            await again.listening
            with open(ports_file) as f:
                urls = json.load(f)
            stored = await deferToThread(get, urls["rest"] + "/events?after=0&limit=10000")
            ids = [e["id"] for e in stored["events"]]
            self.assertEqual(ids, acked)
            answer = await deferToThread(post, urls["rest"], [log(9999)])
            self.assertEqual(answer["first_id"], acked[-1] + 1)
            sse = await connect_sse(urls["sse"], **{"Last-Event-ID": str(seen_before)})
            await sse.wait_for(len(acked) - 501 + 1)
            self.assertEqual([e["id"] for e in sse.events], [*acked[501:], acked[-1] + 1])
            assert again.transport is not None
            os.kill(again.transport.pid, signal.SIGTERM)
            await again.ended

        return Deferred.fromCoroutine(go())

    def test_second_server_on_one_file_is_refused(self) -> Deferred[None]:
        db = os.path.abspath(self.mktemp() + ".sqlite3")

        async def go() -> None:
            first = self.start(db, os.path.abspath(self.mktemp()))
            await first.listening
            second = self.start(db, os.path.abspath(self.mktemp()))
            second.listening.addErrback(lambda _: None)
            code = await second.ended
            text = second.output.decode(errors="replace")
            self.assertNotEqual(code, 0)
            assert first.transport is not None
            self.assertIn(f"history file {db} is in use", text)
            self.assertIn(f"pid {first.transport.pid}", text)
            self.assertNotIn("Traceback", text)
            os.kill(first.transport.pid, signal.SIGTERM)
            await first.ended

        return Deferred.fromCoroutine(go())

    def test_embedded_refused_is_told_where_the_running_server_is(self) -> Deferred[None]:
        """
        Embedded code on the default history while ``twistd trainstream``
        runs: the error names that server's dashboard and how to publish to
        it, or how to have a history of its own.
        """
        db = os.path.abspath(self.mktemp() + ".sqlite3")
        ports_file = os.path.abspath(self.mktemp())

        async def go() -> None:
            first = self.start(db, ports_file)
            await first.listening
            with open(ports_file) as f:
                urls = json.load(f)
            second = StreamServer({"db": db, "listen": "tcp:0:interface=127.0.0.1"}, reactor)
            with self.assertRaises(StoreError) as caught:
                await second.start()
            self.assertFalse(second.listening)
            text = str(caught.exception)
            assert first.transport is not None
            self.assertIn(f"pid {first.transport.pid}, dashboard {urls['dashboard']}", text)
            base = urls["dashboard"].rstrip("/")
            self.assertIn(f"trainstream.client.Publisher({base!r}, 'my-run')", text)
            self.assertIn("{'memory': True}", text)
            os.kill(first.transport.pid, signal.SIGTERM)
            await first.ended

        return Deferred.fromCoroutine(go())


class RetentionTests(TestCase):
    def test_retain_days_drops_the_oldest_and_moves_the_floor(self) -> Deferred[None]:
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = started(path, cache_events=5)
            self.addCleanup(store.close)
            store._now = lambda: 100 * 86400.0
            hub = Hub(store)
            old = [dict(log(i), time=50 * 86400.0) for i in range(30)]
            new = [dict(log(i), time=99.5 * 86400.0) for i in range(30, 40)]
            hub.accept(old + new)
            await store.sync()
            floor = await store.trim(retain_days=10, max_db_mb=None)
            self.assertEqual((floor, store.oldest_id), (31, 31))
            self.assertEqual([r.id for r in store.after(0, lambda r: True)], list(range(31, 41)))
            with sqlite3.connect(path) as other:
                self.assertEqual(other.execute("SELECT MIN(id) FROM events").fetchone()[0], 31)
            # A client resuming from before the floor is told first.
            from tests.test_subscription import FakeSink
            from trainstream.store.filter import Filter

            sink = FakeSink()
            sub = hub.subscribe(sink, Filter())  # type: ignore[arg-type]
            sub.start(5)
            await sub.live()  # the replay reads the disk off the reactor thread
            self.assertEqual(sink.resets[0][1], 31)
            self.assertEqual(sink.ids, list(range(31, 41)))

        return Deferred.fromCoroutine(go())

    def test_max_db_mb_keeps_the_file_under_its_limit(self) -> Deferred[None]:
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = started(path)
            self.addCleanup(store.close)
            hub = Hub(store)
            for batch in range(40):  # about 12 MB of events
                hub.accept(
                    [
                        dict(log(i), message="x" * 300)
                        for i in range(batch * 1000, batch * 1000 + 1000)
                    ]
                )
            await store.sync()
            floor = await store.trim(retain_days=None, max_db_mb=4)
            with sqlite3.connect(path) as other:
                pages, free, size = (
                    other.execute(f"PRAGMA {p}").fetchone()[0]
                    for p in ("page_count", "freelist_count", "page_size")
                )
                count = other.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            self.assertLessEqual((pages - free) * size, 4 * 1024 * 1024)
            self.assertGreater(count, 1000)
            self.assertEqual(floor, hub.last_id - count + 1)  # the newest are kept

        return Deferred.fromCoroutine(go())


class RegistryRestartTests(TestCase):
    def test_runs_registry_is_the_same_after_a_restart(self) -> Deferred[None]:
        """The registry rebuilt from the file's summaries equals the live one."""
        from trainstream.server import StreamServer

        path = self.mktemp() + ".sqlite3"
        config = {"db": path, "listen": "tcp:0:interface=127.0.0.1"}

        async def go() -> None:
            first = StreamServer(config, reactor)
            await first.start()
            first.hub.accept(
                [
                    {"type": "status", "run": "a", "state": "created"},
                    {"type": "hparams", "run": "a", "params": {"lr": 0.1}},
                    *[metric(i, 1.0 / (i + 1), "a") for i in range(50)],
                    metric(50, float("nan"), "a"),
                    {"type": "status", "run": "b", "state": "failed", "message": "OOM"},
                    *[metric(i, float(i), "b") for i in range(7)],
                ]
            )
            await first.store.sync()  # the registry hears of a batch once it is committed
            await first.store.sync()  # and of the NaN alert it published for it
            live = {info.run: info.detail() for info in first.runs.all()}
            alerts = first.runs.nan_alerts_total
            await first.stop()
            first.close()
            second = StreamServer(config, reactor)
            self.addCleanup(second.close)
            await second.start()  # the registry loads from the file as the server starts
            self.addCleanup(second.stop)
            rebuilt = {info.run: info.detail() for info in second.runs.all()}
            self.assertEqual(alerts, 1)
            for run in ("a", "b"):
                for key in ("state", "hparams", "last_step", "created", "updated"):
                    self.assertEqual(rebuilt[run][key], live[run][key], (run, key))
                self.assertEqual(
                    json.dumps(rebuilt[run]["metrics"], default=str),
                    json.dumps(live[run]["metrics"], default=str),
                )
            # The NaN was alerted before the restart: not again.
            second.hub.accept([metric(51, float("nan"), "a")])
            await second.store.sync()
            self.assertEqual(second.runs.nan_alerts_total, 0)

        return Deferred.fromCoroutine(go())


class LogOnlyRunTests(TestCase):
    def test_a_run_of_logs_only_is_known_after_a_restart(self) -> Deferred[None]:
        from trainstream.server import StreamServer

        path = self.mktemp() + ".sqlite3"
        config = {"db": path, "listen": "tcp:0:interface=127.0.0.1"}

        async def go() -> None:
            first = StreamServer(config, reactor)
            await first.start()
            first.hub.accept([log(i, "chatty") for i in range(50)] + [log(0, "once")])
            await first.store.sync()
            live = {info.run: info.detail() for info in first.runs.all()}
            await first.stop()
            first.close()
            second = StreamServer(config, reactor)
            self.addCleanup(second.close)
            await second.start()
            self.addCleanup(second.stop)
            rebuilt = {info.run: info.detail() for info in second.runs.all()}
            self.assertEqual(sorted(rebuilt), ["chatty", "once"])
            for run in rebuilt:
                for key in ("state", "created", "updated"):
                    self.assertEqual(rebuilt[run][key], live[run][key], (run, key))

        return Deferred.fromCoroutine(go())


class SQLiteHistoryRestTests(TestCase):
    """Metric history over REST from the SQLite rollups: spikes, segments, fresh points."""

    def test_history_from_rollups(self) -> Deferred[None]:
        import treq
        from twisted.web.client import HTTPConnectionPool

        from trainstream.server import StreamServer

        path = self.mktemp() + ".sqlite3"
        server = StreamServer({"db": path, "listen": "tcp:0:interface=127.0.0.1"}, reactor)
        pool = HTTPConnectionPool(reactor, persistent=False)

        async def get(query: str) -> dict[str, Any]:
            response = await treq.get(server.urls["rest"] + query, pool=pool)
            result: dict[str, Any] = json.loads(await response.text())
            return result

        async def go() -> None:
            await server.start()
            self.addCleanup(server.close)
            self.addCleanup(server.stop)
            for start in range(0, 60_000, 10_000):
                server.hub.accept([metric(s, 1.0, "big") for s in range(start, start + 10_000)])
            server.hub.accept([metric(31_337, 1000.0, "big")])  # a step back: a new segment
            body = await get("/runs/big/metrics/loss")
            self.assertEqual([p[:2] for p in body["points"]], [[31_337, 1000.0]])
            body = await get("/runs/big/metrics/loss?segments=all&max_points=200")
            self.assertTrue(body["downsampled"])
            self.assertLessEqual(len(body["points"]), 200)
            self.assertIn([31_337, 1000.0], [p[:2] for p in body["points"]])
            server.hub.accept([metric(40_000, -5.0, "big")])  # answered at once, too
            body = await get("/runs/big/metrics/loss?max_points=200")
            self.assertEqual([p[:2] for p in body["points"]], [[31_337, 1000.0], [40_000, -5.0]])

        return Deferred.fromCoroutine(go())


class WriterProcessTests(TestCase):
    def test_writes_in_a_process_of_its_own_and_restarts_it_when_it_dies(
        self,
    ) -> Deferred[None]:
        """
        The rows are written by a child process; if it dies, another takes
        its place and the events it had not committed are stored all the
        same (tests/test_store_recovery.py goes further).
        """
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = started(path)
            self.addCleanup(store.close)
            child = store._child
            assert child is not None
            self.assertNotEqual(child.pid, os.getpid())
            hub = Hub(store)
            hub.accept([log(i) for i in range(10)])
            await store.sync()
            child.kill()
            child.wait(10)
            hub.accept([log(11)])
            await store.sync()
            hub.accept([log(12)])
            await store.sync()
            with sqlite3.connect(path) as other:
                count = other.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            self.assertEqual(count, 12)
            self.assertEqual(store.health().writer_restarts, 1)
            assert store._child is not None
            self.assertNotEqual(store._child.pid, child.pid)

        return Deferred.fromCoroutine(go())
