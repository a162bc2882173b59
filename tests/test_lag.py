"""
Event-loop monitoring (``trainstream.lag``): on a Clock, a tick made late
on purpose shows in the histogram, the recent maximum, ``/metrics`` and
``/api/health`` (degraded past ``--lag-warn``), with one warning line per
crossing, not one per tick.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_server import Reactor
from trainstream.lag import LagMonitor
from trainstream.server import StreamServer

ONE = {"listen": "tcp:8890:interface=127.0.0.1", "memory": True}


def warnings_during(test: SynchronousTestCase) -> list[str]:
    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if "lag" in str(event.get("log_format", "")) and event.get("log_level") is not None:
            seen.append(event["log_level"].name)

    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return seen


class LagMonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lag = LagMonitor(self.clock, warn=0.5, interval=0.25, window=10.0)
        self.lag.startService()
        self.addCleanup(self.lag.stopService)

    def test_on_time(self) -> None:
        """Ticks that run when planned measure no lag and no problem."""
        for _ in range(8):
            self.clock.advance(0.25)
        status = self.lag.status()
        self.assertEqual(status.count, 8)
        self.assertEqual(status.max_s, 0.0)
        self.assertIsNone(status.problem)
        self.assertEqual(status.buckets[0], (0.001, 8))

    def test_late_tick(self) -> None:
        """A tick that runs 1.25 s late is measured, counted in its bucket, and kept as the max."""
        log = warnings_during(self)
        self.clock.advance(0.25)
        self.clock.advance(1.5)  # the call planned 0.25 s later runs 1.25 s late
        status = self.lag.status()
        self.assertAlmostEqual(status.last_s, 1.25)
        self.assertAlmostEqual(status.max_s, 1.25)
        self.assertAlmostEqual(status.sum_s, 1.25)
        by_bound = dict(status.buckets)
        self.assertEqual(by_bound[1.0], 1)  # only the on-time tick is <= 1 s
        self.assertEqual(by_bound[2.5], 2)
        assert status.problem is not None
        self.assertIn("1250 ms", status.problem)
        self.assertIn("--lag-warn 0.5", status.problem)
        # Later on-time ticks keep it in the window's max: still degraded, no new warning.
        for _ in range(20):
            self.clock.advance(0.25)
        self.assertIsNotNone(self.lag.problem())
        self.assertEqual(log.count("warn"), 1)
        # Past the window it is over, said once.
        for _ in range(40):
            self.clock.advance(0.25)
        self.assertIsNone(self.lag.problem())
        self.assertEqual(self.lag.status().max_s, 0.0)
        self.assertEqual(log, ["warn", "info"])

    def test_under_threshold(self) -> None:
        """A lag under --lag-warn is measured but is no problem."""
        self.clock.advance(0.25)
        self.clock.advance(0.65)  # 0.4 s late
        self.assertAlmostEqual(self.lag.status().max_s, 0.4)
        self.assertIsNone(self.lag.problem())

    def test_on_change(self) -> None:
        """The fault monitor is told when the lag crosses the threshold, each way."""
        told: list[str | None] = []
        self.lag.on_change = told.append
        self.clock.advance(0.25)
        self.clock.advance(2.0)
        self.assertEqual(len(told), 1)
        for _ in range(50):
            self.clock.advance(0.25)
        self.assertEqual(len(told), 2)
        self.assertIsNotNone(told[0])
        self.assertIsNone(told[1])


class ServerLagTests(SynchronousTestCase):
    """The lag as ``/metrics`` and ``/api/health`` show it, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = Reactor()
        self.server = StreamServer({**ONE, "lag_warn": 0.5}, self.reactor)
        # Off on a virtual clock unless asked for: its jumps are no lag.
        self.assertFalse(self.server.monitoring.lag.enabled)
        self.server.monitoring.lag.enabled = True
        self.successResultOf(self.server.start())
        self.addCleanup(lambda: self.successResultOf(self.server.stop()))
        self.stub = StubTreq(self.server.site.resource)

    def get(self, path: str) -> tuple[int, bytes]:
        response = self.successResultOf(self.stub.get("http://127.0.0.1:8890" + path))
        return response.code, self.successResultOf(response.content())

    def test_health_and_metrics(self) -> None:
        self.reactor.advance(0.25)
        code, body = self.get("/api/health")
        self.assertEqual(code, 200)
        health = json.loads(body)
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["reactor_lag_ms"], 0)
        self.assertEqual(health["reactor_lag_warn_ms"], 500)
        self.reactor.advance(1.0)  # the tick planned 0.25 s on runs 0.75 s late
        code, body = self.get("/api/health")
        health = json.loads(body)
        self.assertEqual(code, 503)
        self.assertEqual(health["status"], "degraded")
        self.assertEqual(health["reactor_lag_ms"], 750)
        self.assertTrue(any("reactor lag" in r for r in health["reasons"]), health["reasons"])
        code, body = self.get("/metrics")
        self.assertEqual(code, 200)
        text = body.decode()
        self.assertIn('trainstream_reactor_lag_seconds_bucket{le="0.5"} 1.0', text)
        self.assertIn('trainstream_reactor_lag_seconds_bucket{le="1.0"} 2.0', text)
        self.assertIn("trainstream_reactor_lag_seconds_count 2.0", text)
        self.assertIn("trainstream_reactor_lag_seconds_sum 0.75", text)
        self.assertIn("trainstream_reactor_lag_max_seconds 0.75", text)
        self.assertIn("trainstream_degraded 1.0", text)

    def test_lag_alert(self) -> None:
        """Past the threshold, the fault is an alert on the server's run."""
        self.reactor.advance(0.25)
        self.reactor.advance(3.0)
        self.successResultOf(self.server.hub.sync())
        code, body = self.get("/api/events?after=0&run=trainstream/server")
        self.assertEqual(code, 200)
        events = json.loads(body)["events"]
        alerts = [e for e in events if e["type"] == "alert"]
        self.assertEqual([a["kind"] for a in alerts], ["reactor_lag"])
        self.assertIn("2750 ms", alerts[0]["message"])
