"""
No value kills the store: every entry point (``run.log``'s fast path and
its checking path, REST, WebSocket publish) applies the same rules, so what
``POST /api/events`` refuses, ``run.log`` refuses at once, in the caller's
thread, with the same reason, naming the run, the metric and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from trainstream.events import EventError, validate_event
from trainstream.hub import Hub
from trainstream.run import Inbox, Run
from trainstream.store.memory import MemoryStore

LISTEN = "tcp:0:interface=127.0.0.1"


class HeldReactor:
    """A reactor that never runs what it is handed: proves nothing was queued."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def __call__(self, f: Callable[[], None]) -> None:
        self.calls.append(f)


# (metrics, step, time_s, field at fault): each refused by REST as well.
BAD_CALLS: list[tuple[dict[str, Any], Any, Any, str]] = [
    ({"loss": 2**70}, 1, None, "value"),
    ({"loss": 2**63}, 1, None, "value"),
    ({"loss": -(2**63) - 1}, 1, None, "value"),
    ({"loss": 1.0}, 2**63, None, "step"),
    ({"loss": 1.0}, 2**80, None, "step"),
    ({"loss": 1.0}, -1, None, "step"),
    ({"loss": 1.0}, 1, math.nan, "time"),
    ({"loss": 1.0}, 1, math.inf, "time"),
    ({"loss": 1.0}, 1, -1.0, "time"),
    ({"loss": 1.0}, 1, 2**64, "time"),
    ({"loss": "1.5"}, 1, None, "value"),
    ({"loss": None}, 1, None, "value"),
    ({"loss": True}, 1, None, "value"),
]


def rest_error(metrics: dict[str, Any], step: Any, time_s: Any) -> EventError:
    """What POST /api/events says of the same metric (its validation)."""
    ((name, value),) = metrics.items()
    event = {"type": "metric", "run": "r", "name": name, "step": step, "value": value}
    if time_s is not None:
        event["time"] = time_s
    try:
        validate_event(event)
    except EventError as e:
        return e
    raise AssertionError(f"validate_event took {event!r}")


class RunLogRulesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub = Hub(MemoryStore())
        self.reactor = HeldReactor()
        self.inbox = Inbox(self.reactor, self.hub.accept)
        self.training = Run("r", self.inbox, lambda: succeed(None), lambda: None)
        # Known name, plain numbers: later calls take the fast path.
        self.training.log({"loss": 1.0}, step=0)
        self.reactor.calls.pop()()
        self.assertEqual(self.hub.last_id, 1)

    def test_fast_path_refuses_what_rest_refuses(self) -> None:
        for metrics, step, time_s, field in BAD_CALLS:
            with self.assertRaises(EventError) as cm:
                self.training.log(metrics, step=step, time_s=time_s)
            error = cm.exception
            rest = rest_error(metrics, step, time_s)
            case = (metrics, step, time_s)
            self.assertEqual((error.field, rest.field), (field, field), case)
            self.assertEqual(error.detail, rest.detail, case)
            self.assertTrue(str(error).startswith('run "r", metric'), (case, str(error)))
            self.assertIn('"loss"', str(error), case)
            self.assertIn(f'field "{field}"', str(error), case)
            self.assertEqual((self.reactor.calls, len(self.inbox._queue)), ([], 0), case)
        self.assertEqual(self.hub.last_id, 1)

    def test_the_whole_call_is_refused(self) -> None:
        """One bad value among good ones: nothing of the call is queued."""
        with self.assertRaises(EventError) as cm:
            self.training.log({"loss": 0.5, "acc": 2**64, "lr": 0.1}, step=1)
        self.assertIn('metric "acc"', str(cm.exception))
        self.assertEqual((self.reactor.calls, len(self.inbox._queue)), ([], 0))

    def test_what_is_no_dict_of_numbers_is_said(self) -> None:
        """
        ``log(0.5)``, ``log([("a", 1.0)])`` once raised a bare
        AttributeError; a numpy bool was taken as 1.0 where ``True`` is
        refused; a status with a bad epoch said "event 0", not the run.
        """
        numpy = __import__("numpy")
        for metrics, shown in ((0.5, "0.5"), ([("a", 1.0)], "an array"), (None, "null")):
            with self.assertRaises(EventError) as cm:
                self.training.log(metrics, step=1)  # type: ignore[arg-type]
            self.assertEqual(
                str(cm.exception), f'run "r": log() takes a dict of {{name: number}}, got {shown}'
            )
        with self.assertRaises(EventError) as cm:
            self.training.log({"ok": numpy.bool_(True)}, step=1)
        self.assertIn('metric "ok": field "value" must be a number', str(cm.exception))
        self.assertIn("got a Python numpy.bool", str(cm.exception))
        self.training.log({"ok": numpy.float32(0.5), "n": numpy.int64(3)}, step=1)  # numbers pass
        for call, said in (
            (lambda: self.training.status("running", epoch="x"), 'status event: field "epoch"'),
            (lambda: self.training.text("hi", level="loud"), 'log event: field "level"'),
            (lambda: self.training.hparams([1]), "hparams() takes a dict, got an array"),
        ):
            with self.assertRaises(EventError) as cm:
                call()  # type: ignore[no-untyped-call]
            self.assertTrue(str(cm.exception).startswith('run "r"'), str(cm.exception))
            self.assertIn(said, str(cm.exception))
        self.assertEqual(len(self.reactor.calls), 1)  # only the numpy numbers

    def test_the_edges_of_the_range_are_taken(self) -> None:
        self.training.log({"loss": 2**63 - 1}, step=2**63 - 1, time_s=0.0)
        self.training.log({"loss": -(2**63)}, step=1, time_s=5)  # an int time: a float event time
        self.reactor.calls.pop()()
        events = [r.event for r in self.hub.store.after(1, lambda r: r.type == "metric")]
        self.assertEqual(
            [(e["value"], e["step"], e["time"]) for e in events],
            [(2**63 - 1, 2**63 - 1, 0.0), (-(2**63), 1, 5.0)],
        )
        self.assertIs(type(events[1]["time"]), float)

    def test_memory_store_streams_no_out_of_range_value(self) -> None:
        """time_s=NaN used to stream "time":"NaN"; 2**70 an out-of-range value."""
        for metrics, time_s in (({"loss": 1.0}, math.nan), ({"loss": 2**70}, None)):
            with self.assertRaises(EventError):
                self.training.log(metrics, step=1, time_s=time_s)
        self.assertEqual(self.hub.last_id, 1)

    @settings(max_examples=300, deadline=None)
    @given(
        value=st.one_of(
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from(["NaN", "Infinity", "-Infinity", "1", "", "nan"]),
            st.booleans(),
            st.none(),
        ),
        step=st.one_of(st.integers(min_value=-5, max_value=2**70), st.floats(), st.booleans()),
        time_s=st.one_of(
            st.none(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(min_value=-5, max_value=2**70),
        ),
        known=st.booleans(),
    )
    def test_run_log_and_rest_agree(self, value: Any, step: Any, time_s: Any, known: bool) -> None:
        """
        Whatever the value, step and time, by the fast path (a known name)
        or not: both refuse (alike), or both take the same.
        """
        self.inbox._queue.clear()
        self.reactor.calls.clear()
        if not known:
            self.training._checked_names.discard("loss")
        try:
            expected = validate_event(
                {"type": "metric", "run": "r", "name": "loss", "step": step, "value": value}
                | ({} if time_s is None else {"time": time_s})
            )
        except EventError as e:
            with self.assertRaises(EventError) as cm:
                self.training.log({"loss": value}, step=step, time_s=time_s)
            self.assertEqual((cm.exception.field, cm.exception.detail), (e.field, e.detail))
            self.assertEqual(len(self.inbox._queue), 0)
            return
        self.training.log({"loss": value}, step=step, time_s=time_s)
        self.assertEqual(len(self.inbox._queue), 1)
        got = self.drain_one()
        for key in ("type", "run", "name", "step", "value"):
            self.assertEqual(json.dumps(got[key]), json.dumps(expected[key]), key)
        if time_s is not None:
            self.assertEqual(got["time"], expected["time"])

    def drain_one(self) -> dict[str, object]:
        events: list[dict[str, object]] = []
        inbox = Inbox(lambda f: None, events.extend)
        inbox._queue.extend(self.inbox._queue)
        inbox.drain()
        self.assertEqual(len(events), 1)
        return events[0]


class PublisherLogRulesTests(SynchronousTestCase):
    """The remote Publisher's shortcut queues what metric_events makes, or refuses alike."""

    @settings(max_examples=300, deadline=None)
    @given(
        value=st.one_of(
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from(["NaN", "1", ""]),
            st.booleans(),
            st.none(),
        ),
        step=st.one_of(st.integers(min_value=-5, max_value=2**70), st.floats(), st.booleans()),
        time_s=st.one_of(
            st.none(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(min_value=-5, max_value=2**70),
        ),
        known=st.booleans(),
    )
    def test_publisher_log_is_metric_events(
        self, value: Any, step: Any, time_s: Any, known: bool
    ) -> None:
        from twisted.internet.task import Clock

        from trainstream.client.publisher import Publisher
        from trainstream.events import metric_events

        publisher = Publisher(
            "http://127.0.0.1:9", "r", clock=Clock(), transport=None, report_every=0,
            flush_at_exit=0,
        )  # fmt: skip
        publisher._pending.clear()  # its "created" status
        if known:
            publisher._checked_names.add("loss")
        t = 1.5 if time_s is None else time_s
        try:
            expected = metric_events("r", {"loss": value}, step, t, set(publisher._checked_names))
        except EventError as e:
            with self.assertRaises(EventError) as cm:
                publisher.log({"loss": value}, step=step, time_s=t)
            self.assertEqual((cm.exception.field, cm.exception.detail), (e.field, e.detail))
            self.assertEqual(publisher.queue_depth, 0)
            return
        publisher.log({"loss": value}, step=step, time_s=t)
        self.assertEqual(publisher.queue_depth, len(expected))  # takes log()'s lock-free inlet
        self.assertEqual(json.dumps(list(publisher._pending)), json.dumps(expected))
        self.assertEqual(
            [type(v) for e in publisher._pending for v in e.values()],
            [type(v) for e in expected for v in e.values()],
        )


class EmbeddedSQLiteTests(TestCase):
    """The issue's own call, on a real server with a SQLite history."""

    timeout = 60

    def test_large_int_and_step_refused_and_the_store_lives(self) -> Deferred[None]:
        from trainstream.server import StreamServer

        path = self.mktemp() + ".sqlite3"
        server = StreamServer({"db": path, "listen": LISTEN}, reactor)

        async def go() -> None:
            await server.start()
            self.addCleanup(server.close)
            self.addCleanup(server.stop)
            run = server.run("first-hour")
            run.log({"loss": 2.0}, step=0)
            with self.assertRaises(EventError) as cm:
                run.log({"loss": 2**70}, step=1)
            self.assertIn('run "first-hour", metric "loss": field "value"', str(cm.exception))
            with self.assertRaises(EventError):
                run.log({"loss": 1.0}, step=2**63)
            run.log({"loss": 1.0}, step=2)
            await run.flush_deferred()
            self.assertEqual(server.store.health().problems, ())
            steps = [r.event["step"] for r in server.store.after(0, lambda r: r.type == "metric")]
            self.assertEqual(steps, [0, 2])

        return Deferred.fromCoroutine(go())

    def test_release_and_get_again_after_the_writer_died(self) -> Deferred[None]:
        """
        The issue's aftermath: once the writer had died, every flush and the
        release failed, and the next get refused the file as "in use by" this
        very process. Now a dead writer is replaced; release and get work.
        """
        import os
        import signal

        from trainstream.embedded import StreamServerManager
        from trainstream.store.sqlite import SQLiteStore

        path = self.mktemp() + ".sqlite3"
        config = {"db": path, "listen": LISTEN}
        manager = StreamServerManager(reactor)

        async def go() -> None:
            server = await manager.acquire(config)
            run = server.run("first-hour")
            run.log({"loss": 2.0}, step=0)
            with self.assertRaises(EventError):
                run.log({"loss": 2**70}, step=1)
            await run.flush_deferred()
            store = server.store
            assert isinstance(store, SQLiteStore) and store._child is not None
            os.kill(store._child.pid, signal.SIGKILL)  # "for any reason"
            store._child.wait(10)
            run.log({"loss": 1.0}, step=1)
            await run.flush_deferred()
            await manager.release()
            again = await manager.acquire(config)
            self.addCleanup(manager.release)
            steps = [r.event["step"] for r in again.store.after(0, lambda r: r.type == "metric")]
            self.assertEqual(steps, [0, 1])
            self.assertEqual(again.store.health().problems, ())

        return Deferred.fromCoroutine(go())
