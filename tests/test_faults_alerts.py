"""
Automatic fault detection (``trainstream.faults``): the server's own faults
become ``alert`` events on the run ``trainstream/server``, once when they
start, and a ``log`` line when they end; health is ``degraded`` meanwhile.

The monitor's rules on a Clock with made-up sources; then for real, on
loopback with an embedded server: the history's writer process killed,
the disk full (SQLite's page cap, as ``test_full_disk`` does: the alert
comes once there is room again), a listener that stops accepting.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from trainstream.faults import SERVER_RUN, FaultMonitor
from trainstream.server import StreamServer
from trainstream.store import writer


class MonitorRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.published: list[dict[str, object]] = []
        self.now = [1000.0]
        self.faults: dict[str, str] = {}
        self.monitor = FaultMonitor(
            lambda events: self.published.extend(events),
            self.clock,
            [lambda: dict(self.faults)],
            interval=1.0,
            now=lambda: self.now[0],
        )
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def step(self) -> None:
        self.now[0] += 1
        self.clock.advance(1)

    def test_alert_once_then_resolved(self) -> None:
        self.faults["listener:rest"] = "listener rest does not accept connections"
        for _ in range(3):
            self.step()
        types = [(e["type"], e.get("kind")) for e in self.published]
        # The run's first word puts it in a state no stall check watches.
        self.assertEqual(types, [("status", None), ("alert", "listener")])
        self.assertEqual(self.published[0]["state"], "paused")
        alert = self.published[1]
        self.assertEqual(alert["run"], SERVER_RUN)
        self.assertEqual(alert["name"], "rest")
        self.assertEqual(alert["message"], "listener rest does not accept connections")
        del self.faults["listener:rest"]
        self.step()
        self.step()
        self.assertEqual(len(self.published), 3)
        resolved = self.published[2]
        self.assertEqual((resolved["type"], resolved["level"]), ("log", "info"))
        self.assertIn("resolved (listener:rest)", str(resolved["message"]))
        # Again later: a new alert, no second status.
        self.faults["reactor_lag"] = "reactor lag: 900 ms"
        self.step()
        self.assertEqual([e["type"] for e in self.published[3:]], ["alert"])
        self.assertNotIn("name", self.published[3])

    def test_disk_full_alerted_once_there_is_room(self) -> None:
        """Published while the disk is full, the alert would be refused and shown to nobody."""
        self.faults["disk_full"] = (
            "history file h.sqlite3: the disk is full (database or disk is full)"
        )
        for _ in range(5):
            self.step()
        self.assertEqual(self.published, [])
        del self.faults["disk_full"]
        self.step()
        kinds = [(e["type"], e.get("kind")) for e in self.published]
        self.assertEqual(kinds, [("status", None), ("alert", "disk_full"), ("log", None)])
        self.assertIn("the disk was full for 5 s", str(self.published[1]["message"]))
        self.assertIn("h.sqlite3", str(self.published[1]["message"]))

    def test_other_faults_wait_for_room_too(self) -> None:
        """A fault that starts while the disk is full is alerted once there is room, in order."""
        self.faults["disk_full"] = "the disk is full"
        self.step()
        self.faults["reactor_lag"] = "reactor lag: 2000 ms"
        self.step()
        self.assertEqual(self.published, [])
        del self.faults["disk_full"]
        self.step()
        kinds = [(e["type"], e.get("kind")) for e in self.published]
        self.assertEqual(
            kinds,
            [("status", None), ("alert", "reactor_lag"), ("alert", "disk_full"), ("log", None)],
        )

    def test_a_failing_source_does_not_stop_the_others(self) -> None:
        def broken() -> dict[str, str]:
            raise RuntimeError("boom")

        self.monitor.sources.insert(0, broken)
        self.faults["store"] = "history file: write failed"
        self.step()
        self.assertEqual([e.get("kind") for e in self.published], [None, "store"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


async def until(what: str, done: Callable[[], Any], within: float = 15.0) -> Any:
    """Poll ``done`` on the reactor until it is true, failing after ``within`` seconds."""
    deadline = reactor.seconds() + within
    while True:
        result = done()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await deferLater(reactor, 0.05, lambda: None)


class RealFaultTests(TestCase):
    timeout = 60

    def server(self, **config: Any) -> StreamServer:
        server = StreamServer({"listen": "tcp:0:interface=127.0.0.1", **config}, reactor)
        self.addCleanup(lambda: server.stop() if server.running else None)
        return server

    def server_events(self, server: StreamServer) -> list[dict[str, object]]:
        return [
            r.event
            for r in server.store.after(0, lambda r: r.run == SERVER_RUN)  # type: ignore[arg-type]
        ]

    def health(self, server: StreamServer) -> tuple[str, list[str]]:
        status = server.status()
        problems = [*server.store.health().problems, *status.problems]
        return ("degraded" if problems else "ok"), problems

    async def test_writer_process_killed(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        server = self.server(db=db)
        await server.start()
        server.hub.accept([{"type": "log", "run": "r", "level": "info", "message": "one"}])
        await server.hub.sync()
        child = server.store._child  # type: ignore[attr-defined]
        assert child is not None
        child.kill()
        child.wait()
        # The next batch finds it dead; the writer thread restarts it.
        server.hub.accept([{"type": "log", "run": "r", "level": "info", "message": "two"}])
        await server.hub.sync()

        def alerted() -> list[dict[str, object]]:
            return [e for e in self.server_events(server) if e["type"] == "alert"]

        alerts = await until("a store_writer alert", alerted)
        self.assertEqual(alerts[0]["kind"], "store_writer")
        self.assertIn("writer process", str(alerts[0]["message"]))
        resolved = await until(
            "the resolved line",
            lambda: [e for e in self.server_events(server) if e["type"] == "log"],
        )
        self.assertIn("resolved (store_writer)", str(resolved[0]["message"]))
        self.assertEqual(self.health(server)[0], "ok")

    async def test_disk_full(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        first = self.server(db=db)
        await first.start()
        first.hub.accept([{"type": "log", "run": "seed", "level": "info", "message": "x"}])
        await first.hub.sync()
        await first.stop()
        with sqlite3.connect(db) as file:
            pages = file.execute("PRAGMA page_count").fetchone()[0]
        self.patch(os, "environ", {**os.environ, writer.MAX_PAGES_ENV: str(pages + 60)})
        server = self.server(db=db)
        await server.start()
        old = [
            {"type": "log", "run": "old", "level": "info", "message": "o" * 2000} for _ in range(40)
        ]
        server.hub.accept(old)
        await server.hub.sync()
        big = [
            {"type": "log", "run": "big", "level": "info", "message": "b" * 4000}
            for _ in range(200)
        ]
        server.hub.accept(big)
        failed: list[object] = []
        await server.hub.sync().addErrback(failed.append)
        self.assertTrue(failed, "the big batch was stored: no full disk to test")
        state, reasons = self.health(server)
        self.assertEqual(state, "degraded")
        self.assertTrue(any("the disk is full" in r for r in reasons), reasons)
        await until("the monitor saw it", lambda: "disk_full" in server.monitoring.faults.active)
        self.assertEqual([e for e in self.server_events(server) if e["type"] == "alert"], [])
        # Room again: the old run deleted.
        await server.runs.delete("old")
        await until("health ok again", lambda: self.health(server)[0] == "ok", 20)
        alerts = await until(
            "the disk_full alert",
            lambda: [e for e in self.server_events(server) if e.get("kind") == "disk_full"],
        )
        self.assertIn("the disk was full for", str(alerts[0]["message"]))
        self.assertIn(db, str(alerts[0]["message"]))
        self.flushLoggedErrors()

    async def test_listener_stops_accepting(self) -> None:
        server = self.server(memory=True)
        checks = server.monitoring.accept_checks
        checks.interval, checks.timeout = 0.2, 0.5
        await server.start()
        await until("a probe or two", lambda: checks.probes >= 2)
        self.assertEqual(self.health(server)[0], "ok")
        port = server.listeners[0].port
        port.stopReading()  # type: ignore[attr-defined]
        _, reasons = await until(
            "degraded", lambda: self.health(server)[0] == "degraded" and self.health(server)
        )
        self.assertIn("listener listen", reasons[0])
        self.assertIn("does not accept connections", reasons[0])
        self.assertIn(str(server.listeners[0].port_number), reasons[0])
        alerts = await until(
            "a listener alert",
            lambda: [e for e in self.server_events(server) if e.get("kind") == "listener"],
        )
        self.assertEqual(alerts[0]["name"], "listen")
        port.startReading()  # type: ignore[attr-defined]
        await until("ok again", lambda: self.health(server)[0] == "ok")
        await until(
            "resolved",
            lambda: [e for e in self.server_events(server) if e["type"] == "log"],
        )
        self.flushLoggedErrors()
