"""
The terminal clients (``trainstream.cli``): ``python -m trainstream tail``
and ``watch`` run as real subprocesses against a real server on loopback;
the watch feeder against a real server; the watch model and its rendering on
synthetic events. (The SSE client and parser: ``tests.test_subscriber``.)
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import config_on, free_port
from tests.test_streaming import ServerTestCase, d, metric
from trainstream.__main__ import build_parser
from trainstream.cli.model import (
    RunView,
    Series,
    Snapshot,
    WatchModel,
    choose_columns,
    format_value,
)
from trainstream.cli.render import render, sparkline
from trainstream.cli.watch import Feeder
from trainstream.client.http import parse_endpoint
from trainstream.client.sse import ConnState, Event, Reset
from trainstream.server import StreamServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Helpers


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition with a bounded poll."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.02, lambda: None)


async def within(d: Deferred[Any], seconds: float, stop: Callable[[], object]) -> Any:
    """
    ``await d``, calling ``stop()`` if it has not fired after ``seconds``:
    ``stop`` ends what ``d`` waits for (a client's iteration, a process),
    so a broken resume fails the test's assertions instead of hanging it.
    """
    timer = reactor.callLater(seconds, stop)
    try:
        return await d
    finally:
        if timer.active():
            timer.cancel()


class CLI(ProcessProtocol):
    """``python -m trainstream ...`` in a subprocess: its output and exit code."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()
        self.exit_code: int | None = None
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        self.running = False
        self.exit_code = reason.value.exitCode
        self.ended.callback(self.exit_code)

    def finished(self, seconds: float = 10.0) -> Deferred[int | None]:
        """The exit code; the process is killed if it runs for ``seconds`` more."""

        def kill() -> None:
            if self.running:
                self.transport.signalProcess("KILL")

        return Deferred.fromCoroutine(within(self.ended, seconds, kill))

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.decode().splitlines() if line]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for e in self.lines if "id" in e]


def spawn(test: TestCase, *args: str, **env: str) -> CLI:
    cli = CLI()
    environ = {k: v for k, v in os.environ.items() if k != "TRAINSTREAM_TOKEN"}
    environ.update(
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="160", **env
    )
    reactor.spawnProcess(
        cli, sys.executable, [sys.executable, "-m", "trainstream", *args], env=environ
    )

    async def kill() -> None:
        if cli.running:
            cli.transport.signalProcess("KILL")
            await cli.ended

    test.addCleanup(lambda: d(kill()))
    return cli


def base_url(server: StreamServer) -> str:
    return server.urls["rest"].rsplit("/api", 1)[0]


# The CLI against a real server


class TailTests(ServerTestCase):
    timeout = 60

    def test_history_then_limit(self) -> Deferred[None]:
        """--after 0 --limit N: exactly the first N stored events, one JSON line each."""

        async def go() -> None:
            self.server.hub.accept(
                [metric("r/1", s, s / 4) for s in range(4)]
                + [metric("r/1", 4, "NaN"), metric("r/1", 5, "-Infinity")]
            )
            cli = spawn(self, "tail", base_url(self.server), "--after", "0", "--limit", "6")
            self.assertEqual(await cli.finished(), 0)
            events = cli.lines
            self.assertEqual([e["id"] for e in events], [1, 2, 3, 4, 5, 6])
            self.assertEqual([e["value"] for e in events][4:], ["NaN", "-Infinity"])
            self.assertEqual(events[0]["run"], "r/1")
            for line in cli.out.decode().splitlines():
                self.assertNotIn(": ", line)  # compact

        return d(go())

    def test_resume_after(self) -> Deferred[None]:
        """--after K prints exactly the events after K, also with filters and the SSE URL."""

        async def go() -> None:
            self.server.hub.accept(
                [metric("keep", s) for s in range(5)] + [metric("drop", s) for s in range(3)]
            )
            cli = spawn(
                self,
                "tail",
                self.server.urls["sse"] + "?run=keep",
                "--after",
                "2",
                "--type",
                "metric",
                "--limit",
                "3",
            )
            self.assertEqual(await cli.finished(), 0)
            self.assertEqual([e["id"] for e in cli.lines], [3, 4, 5])
            self.assertEqual({e["run"] for e in cli.lines}, {"keep"})

        return d(go())

    def test_live_events_and_sigint(self) -> Deferred[None]:
        """Without --after only live events; SIGINT ends it with status 0."""

        async def go() -> None:
            self.server.hub.accept([metric("old", 1)])
            cli = spawn(self, "tail", base_url(self.server))
            await until(lambda: self.server.clients.counts()["sse"] == 1)
            self.server.hub.accept(
                [metric("new", 2), {"type": "log", "run": "new", "level": "info", "message": "hi"}]
            )
            await until(lambda: len(cli.lines) == 2)
            cli.transport.signalProcess("INT")
            self.assertEqual(await cli.finished(), 0)
            self.assertEqual([(e["id"], e["type"]) for e in cli.lines], [(2, "metric"), (3, "log")])
            self.assertNotIn(b"Traceback", cli.err)

        return d(go())

    def test_once(self) -> Deferred[None]:
        async def go() -> None:
            self.server.hub.accept([metric("a", s) for s in range(5)])
            cli = spawn(self, "tail", base_url(self.server), "--once", "--after", "1")
            self.assertEqual(await cli.finished(), 0)
            self.assertEqual([e["id"] for e in cli.lines], [2, 3, 4, 5])

        return d(go())

    def test_broken_pipe_is_quiet(self) -> Deferred[None]:
        """The reader goes away (| head -1): exit 0, no traceback."""

        async def go() -> None:
            cli = spawn(self, "tail", base_url(self.server), "--after", "0")
            self.server.hub.accept([metric("a", 0)])
            await until(lambda: len(cli.lines) == 1)
            cli.transport.closeChildFD(1)
            for s in range(1, 50):
                if not cli.running:
                    break
                self.server.hub.accept([metric("a", s)])
                await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(await cli.finished(), 0)
            self.assertNotIn(b"Traceback", cli.err)
            self.assertNotIn(b"BrokenPipe", cli.err)

        return d(go())


class TokenTests(ServerTestCase):
    config = {"listen": "tcp:0:interface=127.0.0.1", "memory": True, "token": "s3cret"}
    timeout = 60

    def test_token(self) -> Deferred[None]:
        async def go() -> None:
            self.server.hub.accept([metric("t", 1)])
            refused = spawn(self, "tail", base_url(self.server), "--after", "0", "--limit", "1")
            self.assertEqual(await refused.finished(), 1)
            self.assertIn(b"401", refused.err)
            self.assertIn(b"token", refused.err)
            ok = spawn(
                self,
                "tail",
                base_url(self.server),
                "--after",
                "0",
                "--limit",
                "1",
                TRAINSTREAM_TOKEN="s3cret",
            )
            self.assertEqual(await ok.finished(), 0)
            self.assertEqual([e["run"] for e in ok.lines], ["t"])
            watch = spawn(
                self, "watch", base_url(self.server), "--token", "s3cret", "--frames", "1"
            )
            self.assertEqual(await watch.finished(), 0)
            self.assertIn(b"t ", watch.out)

        return d(go())


class RestartTests(TestCase):
    """The server goes away and comes back on the same ports."""

    timeout = 60

    def setUp(self) -> Deferred[Any]:
        self.ports = (free_port(), free_port(), free_port())
        self.server = StreamServer(config_on(self.ports, retry_ms=100), reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    def test_resume_across_restart(self) -> Deferred[None]:
        """Stop, publish while down, start: every event once, in order, no gap."""

        async def go() -> None:
            self.server.hub.accept([metric("a", s) for s in range(5)])
            cli = spawn(self, "tail", self.server.urls["sse"], "--after", "0", "--limit", "12")
            await until(lambda: len(cli.lines) == 5)
            await self.server.stop()
            self.server.hub.accept([metric("a", s) for s in range(5, 9)])
            await until(lambda: b"reconnecting" in cli.err)
            await self.server.start()
            await until(lambda: len(cli.lines) == 9)
            self.server.hub.accept([metric("a", s) for s in range(9, 12)])
            self.assertEqual(await cli.finished(), 0)
            self.assertEqual([e["id"] for e in cli.lines], list(range(1, 13)))
            self.assertEqual([e["step"] for e in cli.lines], list(range(12)))

        return d(go())

    def test_new_history_is_a_reset(self) -> Deferred[None]:
        """
        A new server on the same ports (a new memory history: new epoch): a
        reset line, then all of its events.
        """

        async def go() -> None:
            self.server.hub.accept([metric("a", s) for s in range(6)])
            cli = spawn(self, "tail", self.server.urls["rest"], "--after", "0", "--limit", "8")
            await until(lambda: len(cli.lines) == 6)
            await self.server.stop()
            other = StreamServer(config_on(self.ports, retry_ms=100), reactor)
            other.hub.accept([metric("b", s) for s in range(2)])
            self.addCleanup(other.stop)
            await other.start()
            self.assertEqual(await cli.finished(), 0)
            lines = cli.lines
            self.assertEqual(len(lines), 9)
            self.assertEqual(lines[6]["type"], "reset")
            self.assertIn("epoch", lines[6]["reason"])
            self.assertEqual([(e["run"], e["id"]) for e in lines[7:]], [("b", 1), ("b", 2)])

        return d(go())


class WatchProcessTests(ServerTestCase):
    timeout = 60

    def test_watch_frames(self) -> Deferred[None]:
        async def go() -> None:
            self.server.hub.accept(
                [metric("team/exp-1", s, 1.0 / (s + 1)) for s in range(40)]
                + [metric("team/exp-1", s, s / 10, name="train/acc") for s in range(40)]
                + [metric("exp-2", 1, "NaN")]
            )
            cli = spawn(self, "watch", base_url(self.server), "--frames", "2")
            self.assertEqual(await cli.finished(), 0)
            out = cli.out.decode()
            self.assertIn("team/exp-1", out)
            self.assertIn("exp-2", out)
            self.assertIn("train/loss", out)
            self.assertIn("0.025", out)  # 1/40
            self.assertIn("NaN", out)
            self.assertIn("█", out)
            # The frame printed at exit may be drawn after the stream closed.
            self.assertRegex(out, "connected|stopped")
            self.assertIn("last id 82", out)

        return d(go())


class FeederTests(ServerTestCase):
    """The watch feeder: REST snapshot, then SSE from the id before it."""

    timeout = 60

    def test_snapshot_then_live_without_doubles(self) -> Deferred[None]:
        async def go() -> None:
            hub = self.server.hub
            hub.accept([metric("a/b", s, float(s)) for s in range(5)])
            items: list[Any] = []
            feeder = Feeder(
                parse_endpoint(base_url(self.server)), None, (), (), 4, items.append, 0.05
            )
            real_get = feeder.http.get_json
            published: list[int] = []

            def get_json(path: str, query: Any = None) -> tuple[int, Any]:
                answer = real_get(path, query)
                if path == "/api/runs" and not published:
                    # Between health and the run reads: in the snapshot *and* replayed.
                    published.append(
                        blockingCallFromThread(reactor, hub.accept, [metric("a/b", 5, 5.0)])[2]
                    )
                return answer

            feeder.http.get_json = get_json  # type: ignore[method-assign]
            running = deferToThread(feeder.run)
            self.addCleanup(feeder.close)
            await until(lambda: any(isinstance(i, Snapshot) for i in items))
            await until(lambda: self.server.clients.counts()["sse"] == 1)
            hub.accept([metric("a/b", 6, 6.0)])
            await until(lambda: any(isinstance(i, Event) and i.id == 7 for i in items))
            feeder.close()
            await running.addTimeout(10, reactor)  # a feeder that does not stop fails here
            self.assertIsNone(feeder.error)
            snapshot = next(i for i in items if isinstance(i, Snapshot))
            self.assertEqual((snapshot.last_id, snapshot.boundary), (5, 6))
            replayed = [i.id for i in items if isinstance(i, Event)]
            self.assertEqual(replayed, [6, 7])
            model = WatchModel()
            for item in items:
                if isinstance(item, Snapshot):
                    model.load(item)
                elif isinstance(item, Event):
                    model.apply(item.data)
            series = model.runs["a/b"].metrics["train/loss"]
            self.assertEqual([s for s, _ in series.points], [0, 1, 2, 3, 4, 5, 6])
            self.assertEqual(model.last_id, 7)

        return d(go())


# Pure parts


class OptionTests(SynchronousTestCase):
    def test_cli_options(self) -> None:
        args = build_parser().parse_args(
            ["tail", "h:1", "--type", "metric,status", "--type", "log", "--run", "a*"]
        )
        from trainstream.__main__ import _split

        self.assertEqual(_split(args.type), ["metric", "status", "log"])
        self.assertEqual(args.run, ["a*"])
        self.assertEqual(build_parser().parse_args(["watch", "h:1", "--frames", "1"]).frames, 1)


class ModelTests(SynchronousTestCase):
    def event(self, i: int, **fields: Any) -> dict[str, Any]:
        return {"id": i, "time": 1000.0 + i, **fields}

    def test_values_states_and_ids(self) -> None:
        model = WatchModel()
        model.load(Snapshot(0, 0, "e", []))
        self.assertTrue(model.apply(self.event(1, type="status", run="r", state="created")))
        self.assertTrue(model.apply(self.event(2, **metric("r", 0, 1.0))))
        self.assertEqual(model.runs["r"].state, "running")  # derived, like the server
        self.assertFalse(model.apply(self.event(2, **metric("r", 0, 1.0))))  # same id
        model.apply(self.event(3, **metric("r", 1, "NaN")))
        model.apply(self.event(4, **metric("r", 2, "Infinity")))
        series = model.runs["r"].metrics["train/loss"]
        self.assertEqual(format_value(series.last_value), "Infinity")
        self.assertEqual(len(series.points), 3)
        model.apply(self.event(5, type="status", run="r", state="stalled"))
        model.apply(self.event(6, type="log", run="r", level="error", message="boom"))
        self.assertEqual(model.runs["r"].state, "running")
        self.assertIn("r: error: boom", model.messages)
        model.apply(self.event(7, type="alert", run="r", kind="nan", message="NaN in loss"))
        self.assertEqual(model.runs["r"].alerts, 1)
        self.assertEqual(model.runs["r"].updated, 1007.0)

    def test_rewind(self) -> None:
        model = WatchModel()
        for i, step in enumerate(range(10), 1):
            model.apply(self.event(i, **metric("r", step, float(step))))
        model.apply(self.event(11, **metric("r", 4, 40.0)))
        model.apply(self.event(12, type="status", run="r", state="running", rewind_to=4))
        series = model.runs["r"].metrics["train/loss"]
        self.assertEqual(list(series.points), [(4, 40.0)])
        self.assertEqual(model.runs["r"].rewind_to, 4)
        self.assertTrue(any("step 4" in m for m in model.messages))

    def test_snapshot_boundary(self) -> None:
        """Events up to the boundary that the snapshot already holds are not added twice."""
        series = Series()
        for s in range(3):
            series.add(s, float(s))
        model = WatchModel()
        model.load(Snapshot(10, 12, "e", [RunView("r", "running", metrics={"train/loss": series})]))
        self.assertFalse(model.apply(self.event(9, **metric("r", 3, 3.0))))  # before last_id
        self.assertFalse(model.apply(self.event(11, **metric("r", 2, 2.0))))  # in snapshot
        self.assertTrue(model.apply(self.event(12, **metric("r", 3, 3.0))))
        self.assertTrue(model.apply(self.event(13, **metric("r", 3, 3.0))))  # after: kept
        self.assertEqual([s for s, _ in series.points], [0, 1, 2, 3, 3])

    def test_reset_and_columns(self) -> None:
        model = WatchModel()
        model.reset(Reset("gone", 5))
        self.assertIn("reset: gone", model.messages)
        per_run = [["loss", "acc", "lr"], ["loss", "acc"], ["loss", "val/x"]]
        self.assertEqual(choose_columns(per_run, 2), ["loss", "acc"])
        self.assertEqual(choose_columns(per_run, 5, ["val/*", "lr"]), ["lr", "val/x"])

    def test_sparkline(self) -> None:
        self.assertEqual(sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]), "▁▂▃▄▅▆▇█")
        self.assertEqual(sparkline([1.0, 1.0]), "▄▄")
        self.assertEqual(sparkline([0.0, float("nan"), 1.0]), "▁!█")
        self.assertEqual(sparkline([float("inf")]), "!")
        self.assertEqual(format_value(3.0), "3")
        self.assertEqual(format_value(float("-inf")), "-Infinity")

    def test_render(self) -> None:
        model = WatchModel()
        model.load(Snapshot(0, 0, "e", []))
        model.apply(
            self.event(1, type="status", run="team/exp-1", state="failed", message="CUDA OOM")
        )
        for i in range(2, 12):
            model.apply(self.event(i, **metric("team/exp-1", i, 1.0 / i)))
        model.apply(self.event(12, **metric("other", 1, "NaN")))
        model.apply(self.event(13, **metric("other", 1, 0.75, name="train/acc")))
        console = Console(record=True, width=160, color_system=None, file=io.StringIO())
        now = 1013.0
        console.print(
            render(
                model, ConnState("connected"), "http://h:1", model.columns(4), now=now, width=160
            )
        )
        text = console.export_text()
        for word in (
            "team/exp-1",
            "other",
            "failed",
            "train/loss",
            "train/acc",
            "NaN",
            "0.75",
            "0.090909",
            "connected",
            "last id 13",
            "CUDA OOM",
            "2 runs",
        ):
            self.assertIn(word, text)
        self.assertIn("█", text)
        self.assertIn("▁", text)
        console = Console(record=True, width=160, color_system=None, file=io.StringIO())
        console.print(
            render(
                model,
                ConnState("reconnecting", "connection refused", retry_at=5.0),
                "u",
                [],
                now_monotonic=3.0,
            )
        )
        self.assertIn("reconnecting in 2.0s (connection refused)", console.export_text())

    def test_render_narrow(self) -> None:
        model = WatchModel()
        model.load(Snapshot(0, 0, "e", []))
        for i, name in enumerate(("a/long/metric/name", "b", "c", "d"), 1):
            model.apply(self.event(i, **metric("r", 1, 1.0, name=name)))
        console = Console(record=True, width=60, color_system=None, file=io.StringIO())
        console.print(render(model, ConnState("connecting"), "u", model.columns(4), width=60))
        text = console.export_text()
        self.assertIn("not shown (too narrow)", text)
        self.assertTrue(all(len(line) <= 60 for line in text.splitlines()))
