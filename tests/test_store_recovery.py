"""
The SQLite history never holds the process hostage: a writer process that
dies (killed, crashed) is replaced and handed what it had not committed; a
row SQLite cannot take is kept out instead of killing the writer; health
says so meanwhile; a terminal's Ctrl-C and SIGTERM stop the server with
every accepted event stored, and no traceback.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.clients import plain_bind
from trainstream.errors import StoreError
from trainstream.hub import Hub
from trainstream.store import feeder, rows
from trainstream.store.sqlite import SQLiteStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTEN = "tcp:0:interface=127.0.0.1"


def log(i: int, run: str = "r") -> dict[str, object]:
    return {"type": "log", "run": run, "level": "info", "message": f"m{i}", "time": 1.0}


def metric(step: int, value: object, run: str = "r") -> dict[str, object]:
    return {"type": "metric", "run": run, "name": "loss", "step": step, "value": value, "time": 2.0}


def stored_ids(path: str) -> list[int]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT id FROM events ORDER BY id")]


def started(path: str) -> SQLiteStore:
    store = SQLiteStore(path, reactor.callFromThread)
    store.start()
    return store


def hold_restarts(test: TestCase, store: SQLiteStore) -> threading.Event:
    """Hold the start of a new writer process until the returned event is set."""
    gate = threading.Event()
    assert store._open is not None
    writer = store._open.feeder
    spawn = writer._spawn

    def held() -> Any:
        gate.wait(30)
        return spawn()

    writer._spawn = held  # type: ignore[method-assign]
    test.addCleanup(gate.set)  # before the store's close (cleanups run last first)
    return gate


def kill_writer(store: SQLiteStore) -> int:
    """SIGKILL the writer process and wait until it is gone; its pid."""
    child = store._child
    assert child is not None
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    return child.pid


class WriterDeathTests(TestCase):
    """A real SQLiteStore, its writer thread and process, the real reactor."""

    timeout = 60

    def open(self, path: str) -> SQLiteStore:
        store = started(path)
        self.addCleanup(store.close)
        return store

    def test_killed_writer_is_replaced_and_nothing_accepted_is_lost(self) -> Deferred[None]:
        """
        SIGKILL the writer process: health is degraded, naming the file and
        the signal, while a new one is started; the events acknowledged
        before and those appended meanwhile are all stored, once, with their
        ids; new appends commit; health is ok again; close and reopen of
        the same file in this process work.
        """
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = self.open(path)
            hub = Hub(store)
            hub.accept([log(i) for i in range(10)])
            await store.sync()
            self.assertEqual(store.health().problems, ())
            gate = hold_restarts(self, store)
            dead = kill_writer(store)
            problems = store.health().problems
            self.assertEqual(len(problems), 1)
            self.assertIn(path, problems[0])
            self.assertIn("SIGKILL", problems[0])
            hub.accept([log(i) for i in range(10, 20)])  # while no writer runs
            synced = store.sync()
            self.assertNoResult(synced)
            self.assertTrue(store.health().problems)
            gate.set()
            await synced
            health = store.health()
            self.assertEqual((health.problems, health.writer_restarts), ((), 1))
            assert store._child is not None
            self.assertNotEqual(store._child.pid, dead)
            self.assertEqual(stored_ids(path), list(range(1, 21)))
            hub.accept([log(20)])
            await store.sync()
            self.assertEqual(stored_ids(path), list(range(1, 22)))
            store.close()
            again = self.open(path)  # the flock was released: no "in use by" ourselves
            self.assertEqual(again.last_id, 21)
            self.assertEqual([r.id for r in again.after(0, lambda r: True)], list(range(1, 22)))

        return Deferred.fromCoroutine(go())

    def test_close_right_after_the_writer_died_stores_everything(self) -> None:
        """close() with the writer process dead and events not committed."""
        path = self.mktemp() + ".sqlite3"
        store = started(path)
        hub = Hub(store)
        hub.accept([log(i) for i in range(5)])
        kill_writer(store)
        hub.accept([log(i) for i in range(5, 10)])
        store.close()
        self.assertEqual(stored_ids(path), list(range(1, 11)))
        with self.assertRaises(StoreError) as e:
            hub.accept([log(10)])
        self.assertIn(f"history file {path} is closed", str(e.exception))
        again = started(path)
        again.close()
        self.assertEqual(again.last_id, 10)

    def test_a_row_sqlite_cannot_take_is_kept_out(self) -> Deferred[None]:
        """
        Events that skipped validation with integers past 64 bits (what
        run.log's fast path let through) killed the writer: now those alone
        are refused, named, and the writer process lives on.
        """
        path = self.mktemp() + ".sqlite3"

        async def go() -> None:
            store = self.open(path)
            child = store._child
            hub = Hub(store)
            hub._publish([log(0), metric(1, 1.0), metric(2, 2**70), metric(3, 3.0)])
            with self.assertRaises(StoreError) as e:
                await store.sync()
            message = str(e.exception)
            self.assertIn(path, message)
            self.assertIn("event 3", message)
            self.assertIn('"value"', message)
            self.assertIn("64-bit", message)
            hub._publish([metric(2**63, 1.0, run="big")])  # its own series: no rewind
            with self.assertRaises(StoreError) as e:
                await store.sync()
            self.assertIn('"step"', str(e.exception))
            hub.accept([metric(4, 4.0)])
            await store.sync()
            self.assertEqual(stored_ids(path), [1, 2, 4, 6])
            self.assertEqual([r.id for r in store.after(0, lambda r: True)], [1, 2, 4, 6])
            health = store.health()
            self.assertEqual((health.problems, health.writer_restarts), ((), 0))
            self.assertEqual(health.events_lost, 2)
            self.assertIs(store._child, child)
            store.close()
            self.assertEqual(self.open(path).last_id, 6)  # no id is given twice

        return Deferred.fromCoroutine(go())

    def test_a_batch_that_fails_every_time_is_given_up_alone(self) -> Deferred[None]:
        """
        The last resort: a batch the writer process refuses each time it is
        sent fails its own sync() callers with a clear error after a bounded
        number of tries; the batches after it are stored.
        """
        path = self.mktemp() + ".sqlite3"
        self.patch(rows, "row_problem", lambda row: None)  # let it through

        async def go() -> None:
            store = self.open(path)
            hub = Hub(store)
            hub.accept([log(0)])
            await store.sync()
            hub._publish([log(1), metric(1, 2**70)])
            with self.assertRaises(StoreError) as e:
                await store.sync()
            message = str(e.exception)
            self.assertIn(path, message)
            self.assertIn("events 2 to 3 could not be stored", message)
            self.assertIn("OverflowError", message)
            self.assertIn(f"tried {feeder._ATTEMPTS} times", message)
            hub.accept([log(2)])
            await store.sync()
            self.assertEqual(stored_ids(path), [1, 4])
            health = store.health()
            self.assertEqual((health.problems, health.events_lost), ((), 2))
            store.close()
            self.assertEqual(self.open(path).last_id, 4)

        return Deferred.fromCoroutine(go())


class HealthTests(TestCase):
    timeout = 60

    def test_health_and_metrics_say_the_writer_is_down(self) -> Deferred[None]:
        """GET /api/health: 503 degraded with the reason; /metrics counts restarts."""
        from trainstream.server import StreamServer

        path = self.mktemp() + ".sqlite3"
        server = StreamServer({"db": path, "listen": LISTEN}, reactor)
        pool = HTTPConnectionPool(reactor, persistent=False)

        async def get(url: str) -> tuple[int, str]:
            response = await treq.get(url, pool=pool)
            return response.code, await response.text()

        async def go() -> None:
            await server.start()
            self.addCleanup(server.close)
            self.addCleanup(server.stop)
            store = server.store
            assert isinstance(store, SQLiteStore)
            rest = server.urls["rest"]
            metrics_url = rest.replace("/api", "/metrics")
            code, text = await get(rest + "/health")
            self.assertEqual((code, json.loads(text)["status"]), (200, "ok"))
            gate = hold_restarts(self, store)
            kill_writer(store)
            code, text = await get(rest + "/health")
            body = json.loads(text)
            self.assertEqual((code, body["status"]), (503, "degraded"))
            self.assertIn(path, body["reason"])
            self.assertIn("writer process", body["reason"])
            self.assertEqual(body["reasons"], [body["reason"]])
            _, text = await get(metrics_url)
            self.assertIn("trainstream_store_degraded 1.0", text)
            gate.set()
            server.hub.accept([log(1)])
            await store.sync()
            code, text = await get(rest + "/health")
            body = json.loads(text)
            self.assertEqual((code, body["status"]), (200, "ok"))
            self.assertNotIn("reason", body)
            self.assertEqual(body["store"]["writer_restarts"], 1)
            _, text = await get(metrics_url)
            self.assertIn("trainstream_store_degraded 0.0", text)
            self.assertIn("trainstream_store_writer_restarts_total 1.0", text)

        return Deferred.fromCoroutine(go())


# Terminal signals, with real processes of their own process group.


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_until(process: subprocess.Popen[bytes], marker: bytes, within: float) -> bytes:
    """What ``process`` wrote on stdout up to the line holding ``marker`` (bounded)."""
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise AssertionError(f"no {marker!r} within {within} s; got {seen!r}")
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"ended before {marker!r}; got {seen!r}")
            seen += chunk
    return seen


def start_child(test: SynchronousTestCase, args: list[str]) -> subprocess.Popen[bytes]:
    """``args`` in a session of its own (pipes, the repo importable); killed at cleanup."""
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )

    def kill() -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)

    test.addCleanup(kill)
    return process


EMBEDDED = textwrap.dedent(
    """
    import sys, time
    import trainstream

    try:
        with trainstream.serve({"listen": "tcp:0:interface=127.0.0.1", "db": sys.argv[1]}) as s:
            run = s.run("ctrl-c")
            for step in range(500):
                run.log({"loss": 1.0 / (step + 1)}, step=step)
            run.flush()
            for step in range(500, 1000):  # accepted, not flushed yet
                run.log({"loss": 0.5}, step=step)
            print("ready", flush=True)
            time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    """
)


class TerminalSignalTests(SynchronousTestCase):
    """
    Ctrl-C in a terminal is SIGINT to the whole foreground process group:
    each test starts its process in a group of its own and signals the group.
    """

    def start(self, args: list[str]) -> subprocess.Popen[bytes]:
        return start_child(self, args)

    def test_ctrl_c_in_an_embedded_script(self) -> None:
        """
        The script's own KeyboardInterrupt is all there is: no traceback of
        the writer process, no StoreError; every event logged is stored.
        """
        db = os.path.abspath(self.mktemp() + ".sqlite3")
        process = self.start([sys.executable, "-c", EMBEDDED, db])
        read_until(process, b"ready", 30)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=30)
        text = err.decode(errors="replace")
        self.assertEqual(process.returncode, 0, text)
        self.assertIn(b"interrupted", out)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("StoreError", text)
        with sqlite3.connect(db) as other:
            steps = [
                row[0]
                for row in other.execute(
                    "SELECT step FROM events WHERE type = 'metric' ORDER BY id"
                )
            ]
        self.assertEqual(steps, list(range(1000)))

    def twistd(self, db: str, ports_file: str) -> tuple[subprocess.Popen[bytes], str]:
        if os.path.exists(ports_file):
            os.unlink(ports_file)
        process = self.start(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "trainstream",
                "--listen",
                LISTEN,
                "--ports-file",
                ports_file,
                "--db",
                db,
            ]
        )
        read_until(process, b"trainstream listening", 30)
        with open(ports_file) as f:
            rest: str = json.load(f)["rest"]
        return process, rest

    def post(self, rest: str, events: list[dict[str, object]]) -> dict[str, Any]:
        request = urllib.request.Request(
            rest + "/events",
            data=json.dumps(events).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            self.assertEqual(answer.status, 200)
            result: dict[str, Any] = json.load(answer)
            return result

    def test_ctrl_c_and_sigterm_stop_twistd_cleanly(self) -> None:
        """
        ``twistd -n trainstream`` in its own group: SIGINT to the group, then
        (started again on the same file) SIGTERM to the group. Each time: no
        traceback, a clean exit (twistd ends by the signal it was stopped
        with, as Twisted does), every acknowledged event in the file, ids
        going on, and the port free for a plain bind.
        """
        db = os.path.abspath(self.mktemp() + ".sqlite3")
        ports_file = os.path.abspath(self.mktemp())
        acked: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            process, rest = self.twistd(db, ports_file)
            port = int(rest.rsplit(":", 1)[1].split("/")[0])
            for batch in range(5):
                answer = self.post(rest, [log(batch * 10 + i) for i in range(10)])
                acked.extend(range(answer["first_id"], answer["last_id"] + 1))
            os.killpg(process.pid, sig)
            out, err = process.communicate(timeout=30)
            text = (out + err).decode(errors="replace")
            self.assertIn(process.returncode, (0, -sig), text)
            self.assertNotIn("Traceback", text)
            self.assertNotIn("StoreError", text)
            self.assertNotIn("writer process", text)  # it never died
            self.assertEqual(stored_ids(db), acked)
            self.assertIsNone(plain_bind(port))
        self.assertEqual(acked, list(range(1, 101)))
