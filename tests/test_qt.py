"""
``trainstream.qt.StreamMonitor`` offscreen (``QT_QPA_PLATFORM=offscreen``):
the widget against a real server on loopback, and ``examples/qt_app.py``.

The server runs in trial's reactor, in this thread; the widget's Qt event
loop is driven in the same thread between reactor turns (``until``), so the
two take turns and every wait has a deadline that fails saying what the
widget saw. While the test's own code runs (publishing, stopping the
server), Qt runs nothing: what the widget gets then is decided by the test,
not by timing.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before any QApplication

from PySide6.QtCore import QCoreApplication
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import ANY_PORTS
from trainstream.qt import MonitorModel, StreamMonitor
from trainstream.server import StreamServer

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("sse", "ws", "rest")
#: A short ``retry:`` so that reconnects come within the test's deadlines.
FAST = {**ANY_PORTS, "retry_ms": 200}


def application() -> QApplication:
    app = QApplication.instance()
    if app is None:
        app = QApplication([])
    assert isinstance(app, QApplication)
    return app


def seen(monitor: StreamMonitor) -> str:
    """What the widget shows, for a failure message."""
    states = {r: (s.state, s.detail) for r in ROLES for s in [monitor.link_status(r)]}
    runs = {name: (info.state, info.last_step) for name, info in monitor.model.runs.items()}
    return f"links {states}; runs {runs}; state log {monitor.state_log[-12:]}"


class MonitorTestCase(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        application()
        self.addCleanup(self.txaio_settled)  # runs last
        self.server = StreamServer(FAST, reactor)
        self.addCleanup(self.server.stop)
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        await self.server.start()

    def txaio_settled(self) -> Deferred[None]:
        """
        Autobahn's timers (txaio's batched calls) cannot be cancelled, only
        emptied: a refused upgrade leaves one up to a few seconds. Wait
        (bounded) until they have run, so the reactor is left clean.
        """

        async def go() -> None:
            deadline = time.monotonic() + 15
            while any("_BatchedTimer" in repr(c) for c in reactor.getDelayedCalls()):
                if time.monotonic() > deadline:
                    self.fail(f"txaio timers still pending: {reactor.getDelayedCalls()}")
                await deferLater(reactor, 0.05, lambda: None)

        return Deferred.fromCoroutine(go())

    def monitor(self, *args: Any, **kwargs: Any) -> StreamMonitor:
        monitor = StreamMonitor(*args, **kwargs)
        monitor.resize(1000, 760)
        monitor.show()
        self.addCleanup(monitor.deleteLater)
        self.addCleanup(monitor.close)
        return monitor

    async def until(
        self, what: str, monitor: StreamMonitor, cond: Callable[[], bool], timeout: float = 15.0
    ) -> None:
        """Run Qt and the reactor in turns until ``cond()``; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            QCoreApplication.processEvents()
            if cond():
                return
            if time.monotonic() > deadline:
                self.fail(f"{what}: not within {timeout} s; {seen(monitor)}")
            await deferLater(reactor, 0.005, lambda: None)

    def all_connected(self, monitor: StreamMonitor) -> Callable[[], bool]:
        return lambda: all(monitor.link_status(r).state == "connected" for r in ROLES)

    async def publish(
        self, run: str, steps: range, finish: bool = False, scale: float = 1.0
    ) -> None:
        handle = self.server.run(run, hparams={"lr": 0.01})
        handle.status("running")
        for step in steps:
            loss, acc = scale / (step + 1), scale * step / 100
            handle.log({"train/loss": loss, "train/acc": acc}, step=step)
        if finish:
            handle.finish()
        await self.server.flush_deferred()


class StreamMonitorTests(MonitorTestCase):
    def test_run_published_after_open_appears_with_points(self) -> Deferred[None]:
        """
        A run that exists before the widget opens is loaded from REST; one
        published after it opened comes over the stream with every point,
        into the model and into its chart's curve; the status panel shows
        all three transports connected, with their client counts.
        """

        async def go() -> None:
            await self.publish("early", range(5), scale=0.5)
            monitor = self.monitor(self.server)
            await self.until("all connected", monitor, self.all_connected(monitor))
            await self.publish("late", range(40), finish=True)
            model = monitor.model

            def late_whole() -> bool:
                info = model.runs.get("late")
                return (
                    info is not None
                    and info.state == "finished"
                    and len(model.points("late", "train/loss")[0]) == 40
                )

            await self.until("the late run, whole", monitor, late_whole)
            await self.until(
                "the early run's points",
                monitor,
                lambda: len(model.points("early", "train/acc")[0]) == 5,
            )
            monitor.refresh(new_charts=10)
            steps, values = model.points("late", "train/loss")
            self.assertEqual(steps, list(range(40)))
            self.assertEqual(values, [1.0 / (s + 1) for s in range(40)])
            xs, ys = monitor.curve_data("late", "train/loss")
            self.assertEqual(xs, [float(s) for s in range(40)])
            self.assertEqual(ys, values)
            self.assertEqual(
                monitor.curve_data("early", "train/acc"),
                ([0.0, 1.0, 2.0, 3.0, 4.0], [0.5 * s / 100 for s in range(5)]),
            )
            self.assertEqual(sorted(model.runs), ["early", "late"])
            self.assertEqual(model.runs["early"].state, "running")
            self.assertEqual(model.duplicates, 0)
            # Health counts the monitor's own stream and socket.
            await self.until(
                "client counts",
                monitor,
                lambda: (
                    (monitor.link_status("sse").clients or 0) >= 1
                    and (monitor.link_status("ws").clients or 0) >= 1
                ),
            )
            for role in ROLES:
                self.assertIsNotNone(monitor.link_status(role).last_at, role)
            self.assertEqual(monitor.link_status("sse").url, self.server.urls["sse"])
            self.assertEqual(monitor.link_status("ws").url, self.server.urls["ws"])

            await deferLater(reactor, 0.3, lambda: None)
            QCoreApplication.processEvents()
            monitor.refresh(new_charts=10)
            path = os.path.abspath(os.path.join(self.mktemp() + ".png"))
            image = monitor.grab().toImage()
            self.assertTrue(image.save(path), path)
            print(f"\nscreenshot: {path}", file=sys.stderr)
            self.assertGreater(QImage(path).width(), 500)
            # Drawn, not blank: the chart area holds the curves' colours.
            colours = {
                image.pixel(x, y)
                for x in range(0, image.width(), 7)
                for y in range(0, image.height(), 7)
            }
            self.assertGreater(len(colours), 8)

        return Deferred.fromCoroutine(go())

    def test_status_follows_stop_and_start_resuming_by_id(self) -> Deferred[None]:
        """
        The server stops: every transport goes down; it starts again (on new
        ports, tcp:0): each goes reconnecting then connected. Events stored
        before the widget reconnects come by resuming after the last id it
        had: every step once, none twice, the same history (no reload).
        """

        async def go() -> None:
            monitor = self.monitor(self.server)
            await self.until("all connected", monitor, self.all_connected(monitor))
            await self.publish("r", range(10))
            model = monitor.model
            await self.until(
                "10 points", monitor, lambda: len(model.points("r", "train/loss")[0]) == 10
            )
            last_id = model.last_id
            ports = dict(self.server.urls)

            await self.server.stop()
            mark = len(monitor.state_log)
            await self.until(
                "all down",
                monitor,
                lambda: all(monitor.link_status(r).state == "down" for r in ROLES),
            )
            await self.server.start()
            self.assertNotEqual(dict(self.server.urls), ports)  # tcp:0: other ports
            # Published before Qt runs again: only a resume by id brings them.
            await self.publish("r", range(10, 20))
            await self.until("all connected again", monitor, self.all_connected(monitor))
            await self.until(
                "20 points", monitor, lambda: len(model.points("r", "train/loss")[0]) == 20
            )

            for role in ROLES:
                states = [s for r, s in monitor.state_log[mark:] if r == role]
                self.assertEqual(states[0], "down", (role, states))
                self.assertIn("reconnecting", states, role)
                self.assertEqual(states[-1], "connected", (role, states))
                self.assertLess(states.index("reconnecting"), len(states) - 1, (role, states))
            self.assertEqual(model.points("r", "train/loss")[0], list(range(20)))
            self.assertEqual(model.duplicates, 0)
            self.assertGreater(model.last_id or 0, last_id or 0)
            self.assertEqual(model.notice, "")  # the same history: nothing reloaded
            self.assertEqual(monitor.link_status("sse").connections, 2)
            self.assertEqual(monitor.link_status("sse").url, self.server.urls["sse"])

        return Deferred.fromCoroutine(go())

    def test_reset_when_the_history_was_trimmed(self) -> Deferred[None]:
        """
        While the widget is away, the server's history (30 events) moves
        past its id: on resuming it gets the contract's ``reset``, says so,
        and takes what the server still holds, once each.
        """

        async def go() -> None:
            await self.server.stop()
            self.server = StreamServer({**FAST, "max_history": 30}, reactor)
            self.addCleanup(self.server.stop)
            await self.server.start()
            monitor = self.monitor(self.server)
            await self.until("all connected", monitor, self.all_connected(monitor))
            await self.publish("r", range(5))
            model = monitor.model
            await self.until(
                "5 points", monitor, lambda: len(model.points("r", "train/loss")[0]) == 5
            )
            await self.server.stop()
            await self.until("down", monitor, lambda: monitor.link_status("sse").state == "down")
            await self.server.start()
            await self.publish("r", range(5, 100))
            await self.until("the reset", monitor, lambda: "no longer holds" in model.notice)
            await self.until(
                "connected", monitor, lambda: monitor.link_status("sse").state == "connected"
            )
            await self.until(
                "step 99", monitor, lambda: model.points("r", "train/loss")[0][-1:] == [99]
            )
            self.assertEqual(model.last_id, self.server.hub.last_id)
            held = [
                r.event["step"]
                for r in self.server.hub.store.after(0, lambda r: r.name == "train/loss")
                if r.type == "metric"
            ]
            self.assertLess(len(held), 30)
            self.assertGreater(held[0], 5)  # steps 5.. up to some were trimmed
            # The first five from before, then exactly what the history held.
            self.assertEqual(model.points("r", "train/loss")[0], list(range(5)) + held)
            self.assertEqual(model.duplicates, 0)

        return Deferred.fromCoroutine(go())

    def test_url_and_token(self) -> Deferred[None]:
        """
        Given the server, the widget uses its token by itself; given a URL
        and no token, the stream is refused and the panel says so (401).
        """

        async def go() -> None:
            await self.server.stop()
            self.server = StreamServer({**FAST, "token": "s3cret"}, reactor)
            self.addCleanup(self.server.stop)
            await self.server.start()
            await self.publish("t", range(3))
            monitor = self.monitor(self.server)
            await self.until("all connected", monitor, self.all_connected(monitor))
            await self.until(
                "3 points", monitor, lambda: len(monitor.model.points("t", "train/acc")[0]) == 3
            )

            base = self.server.urls["rest"].removesuffix("/api")
            refused = self.monitor(base, runs=["t"])
            await self.until(
                "refused",
                refused,
                lambda: (
                    "401" in refused.link_status("sse").detail
                    and refused.link_status("ws").state == "down"
                ),
            )
            self.assertEqual(refused.link_status("sse").state, "down")
            self.assertEqual(refused.model.runs, {})
            self.assertEqual(refused.link_status("sse").url, base + "/events?run=t")

            allowed = self.monitor(url=base, token="s3cret")
            await self.until("token given", allowed, self.all_connected(allowed))
            await self.until(
                "3 points", allowed, lambda: len(allowed.model.points("t", "train/acc")[0]) == 3
            )

        return Deferred.fromCoroutine(go())


class ExampleTests(TestCase):
    timeout = 180

    def test_three_runs_in_a_row(self) -> Deferred[None]:
        """
        ``examples/qt_app.py``: its QThread trains three runs, getting and
        releasing the embedded server each time on the same ports; the
        monitor beside it shows each run whole; each port binds without
        SO_REUSEADDR after each release; it exits 0 by itself offscreen.
        """
        data = os.path.abspath(self.mktemp())  # the test's temp dir: history, screenshot
        os.makedirs(data)
        shot = os.path.join(data, "qt_app.png")
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "XDG_DATA_HOME": data,
            "HOME": data,
            "QT_QPA_PLATFORM": "offscreen",
        }
        any_port = "tcp:0:interface=127.0.0.1"
        args = [str(ROOT / "examples" / "qt_app.py"), "--runs", "3", "--steps", "200"]
        args += ["--sse", any_port, "--ws", any_port, "--rest", any_port, "--memory"]
        args += ["--delay", "0.002", "--monitor-wait", "30", "--screenshot", shot]

        async def go() -> None:
            out, err, code = await getProcessOutputAndValue(
                sys.executable, args, env=env, path=str(ROOT)
            )
            text = out.decode()
            self.assertEqual(code, 0, f"exited {code}:\n{text}\n{err.decode()[-3000:]}")
            lines = text.splitlines()
            serving = [line.split("ports ")[1] for line in lines if "serving on ports" in line]
            self.assertEqual(len(serving), 3, text)
            self.assertEqual(len(set(serving)), 1, f"not the same ports each run: {serving}")
            for i in (1, 2, 3):
                self.assertIn(
                    f"factory-{i}: finished, 200 steps, shown whole by the monitor, "
                    "ports free after release",
                    lines,
                )
            self.assertEqual(lines[-1], "all runs done: every check passed")
            self.assertGreater(QImage(shot).width(), 800, shot)
            print(f"\nexample screenshot: {shot}", file=sys.stderr)

        return Deferred.fromCoroutine(go())


class ModelTests(SynchronousTestCase):
    """The model alone: what a resumed or reset stream does to it."""

    def test_duplicates_rewind_and_special_values(self) -> None:
        model = MonitorModel(["a*"])
        events = [
            {"id": 1, "type": "metric", "run": "a1", "name": "x", "step": 0, "value": 1.0},
            {"id": 2, "type": "metric", "run": "a1", "name": "x", "step": 1, "value": "NaN"},
            {"id": 3, "type": "metric", "run": "b", "name": "x", "step": 0, "value": 5},
            {"id": 4, "type": "metric", "run": "a1", "name": "x", "step": 2, "value": "-Infinity"},
        ]
        for event in events:
            self.assertTrue(model.apply(event))
        self.assertFalse(model.apply(events[1]))  # again: dropped, counted
        self.assertEqual(model.duplicates, 1)
        self.assertEqual(sorted(model.runs), ["a1"])  # b is not watched
        steps, values = model.points("a1", "x")
        self.assertEqual(steps, [0, 1, 2])
        self.assertEqual(values[0], 1.0)
        self.assertTrue(math.isnan(values[1]))
        self.assertEqual(values[2], -math.inf)
        model.apply({"id": 5, "type": "status", "run": "a1", "state": "running", "rewind_to": 1})
        self.assertEqual(model.points("a1", "x")[0], [0])
        self.assertEqual(model.runs["a1"].last_step, 1)
        model.reset("trimmed", 3)
        self.assertEqual(model.last_id, 2)
        self.assertTrue(model.apply(events[2] | {"id": 3}))
        self.assertIn("trimmed", model.notice)

    def test_backfill_and_live_points_merge(self) -> None:
        model = MonitorModel()
        # The stream may bring a series' newest points before REST answers
        # the list of runs: its older points are still to load.
        model.apply({"id": 8, "type": "metric", "run": "r", "name": "x", "step": 1, "value": 2.0})
        missing = model.load_runs(
            [{"run": "r", "state": "running", "last_step": 2, "metrics": ["x", "y"]}]
        )
        self.assertEqual(missing, [("r", "x"), ("r", "y")])
        model.load_points("r", "x", [[0, 1.0, 0.0], [1, 2.0, 0.0], [2, 3.0, 0.0]])
        # The stream may carry a point the REST answer had too: one point a step.
        model.apply({"id": 9, "type": "metric", "run": "r", "name": "x", "step": 2, "value": 3.0})
        model.apply({"id": 10, "type": "metric", "run": "r", "name": "x", "step": 3, "value": 4.0})
        self.assertEqual(model.points("r", "x"), ([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0]))
        self.assertEqual(model.load_runs([{"run": "r", "metrics": ["x", "y", "z"]}]), [("r", "z")])
        model.clear()  # another history: everything is to load again
        self.assertEqual(model.load_runs([{"run": "r", "metrics": ["x"]}]), [("r", "x")])


class ImportTests(SynchronousTestCase):
    def run_python(self, code: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )

    def test_trainstream_never_imports_qt(self) -> None:
        done = self.run_python(
            "import sys, trainstream, trainstream.client, trainstream.embedded\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph')))"
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "[]")

    def test_essentials_alone_say_websocket_not_checked(self) -> None:
        """PySide6-Essentials without Addons: the widget works, its WebSocket row says why not."""
        done = self.run_python(
            "import os, sys; os.environ['QT_QPA_PLATFORM'] = 'offscreen'\n"
            "sys.modules['PySide6.QtWebSockets'] = None\n"
            "from PySide6.QtWidgets import QApplication\n"
            "from trainstream.qt import StreamMonitor\n"
            "app = QApplication([])\n"
            "m = StreamMonitor('http://127.0.0.1:9'); m.start()\n"
            "s = m.link_status('ws'); print(s.state, '|', s.detail); m.stop()\n"
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(
            done.stdout.strip(), "down | not checked: no QtWebSockets (pip install PySide6-Addons)"
        )

    def test_without_the_extra_one_clear_line(self) -> None:
        for blocked in ("PySide6", "pyqtgraph"):
            done = self.run_python(
                f"import sys; sys.modules[{blocked!r}] = None; import trainstream.qt"
            )
            self.assertNotEqual(done.returncode, 0)
            last = done.stderr.strip().splitlines()[-1]
            self.assertEqual(
                last,
                f"ImportError: trainstream.qt needs {blocked}: pip install 'trainstream[qt]'",
            )
