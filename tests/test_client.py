"""
The remote publisher.

Without sockets or threads (``SynchronousTestCase``): on a ``Clock`` with a
fake transport, every rule of its sending in virtual time: the linger, full
batches, the bounded queue, the backoff while the server is away, flush and
close, refusals (400 naming an event, 413, 401), its own metrics; and the
``ThreadClock`` it runs on by default.

Against a real server on loopback: batches from its own thread, drops while
the server is away then the retry, tokens, refusals, its cost as metrics.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import free_port
from trainstream.api import RunAPI
from trainstream.client import Publisher
from trainstream.client.clock import ThreadClock
from trainstream.events import EventError
from trainstream.server import StreamServer


def one_port(port: int, **extra: Any) -> dict[str, Any]:
    return {"listen": f"tcp:{port}:interface=127.0.0.1", "memory": True, **extra}


class PublisherTests(TestCase):
    timeout = 60

    async def serve(self, config: dict[str, Any]) -> StreamServer:
        server = StreamServer(config, reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server

    def publisher(self, port: int, close_timeout: float = 5, **kw: Any) -> Publisher:
        kw.setdefault("report_every", 0)
        kw.setdefault("flush_at_exit", 0)
        publisher = Publisher(f"http://127.0.0.1:{port}", kw.pop("run", "remote"), **kw)
        self.addCleanup(lambda: deferToThread(publisher.close, close_timeout))
        return publisher

    def test_everything_arrives_in_order(self) -> Deferred[None]:
        port = free_port()

        async def go() -> None:
            server = await self.serve(one_port(port))
            pub = self.publisher(port, hparams={"lr": 0.01}, batch_size=500)
            for step in range(1000):
                pub.log({"train/loss": 1.0 / (step + 1), "train/acc": step / 1000}, step=step)
            pub.log({"odd": float("nan")}, step=1000)
            pub.finish()
            self.assertTrue(await deferToThread(pub.flush, 20))
            events = [r.event for r in server.hub.store.after(0, lambda r: r.run == "remote")]
            kinds = [e["type"] for e in events if e["type"] != "alert"]  # the server's own
            self.assertEqual(kinds[:2], ["status", "hparams"])
            self.assertEqual(kinds[-1], "status")
            metrics = [e for e in events if e["type"] == "metric" and e["name"] != "odd"]
            self.assertEqual([e["step"] for e in metrics], [s for s in range(1000) for _ in (0, 1)])
            self.assertEqual(pub.sent, len(events) - 1)  # the NaN alert is the server's own
            self.assertEqual((pub.dropped, pub.rejected), (0, 0))

        return Deferred.fromCoroutine(go())

    def test_server_away_bounded_queue_then_retry(self) -> Deferred[None]:
        """
        Nobody listens: log() still returns at once; past max_queue the
        oldest are dropped and counted; once a server comes, the rest arrive.
        """
        port = free_port()

        async def go() -> None:
            pub = self.publisher(port, max_queue=20, max_backoff=0.2)
            for step in range(50):
                pub.log({"loss": float(step)}, step=step)
            self.assertLessEqual(pub.queue_depth, 20)
            self.assertGreaterEqual(pub.dropped, 31)  # 'created' + 50 metrics > 20
            self.assertFalse(await deferToThread(pub.flush, 0.3))
            self.assertIn("unreachable", pub.last_error or "")
            server = await self.serve(one_port(port))
            self.assertTrue(await deferToThread(pub.flush, 20))
            steps = [
                r.event["step"] for r in server.hub.store.after(0, lambda r: r.type == "metric")
            ]
            self.assertEqual(steps, list(range(30, 50)))  # the newest were kept
            self.assertEqual(pub.dropped, 31)

        return Deferred.fromCoroutine(go())

    def test_token(self) -> Deferred[None]:
        port = free_port()

        async def go() -> None:
            server = await self.serve(one_port(port, token="sesame"))
            # (refused for good: closing it waits only a moment)
            wrong = self.publisher(port, 0.2, run="wrong", token="nope", max_backoff=0.2)
            right = self.publisher(port, run="right", token="sesame")
            right.log({"x": 1}, step=1)
            self.assertTrue(await deferToThread(right.flush, 20))
            self.assertFalse(await deferToThread(wrong.flush, 0.5))
            self.assertIn("401", wrong.last_error or "")
            self.assertIn("token", wrong.last_error or "")
            runs = {r.run for r in server.hub.store.after(0, lambda r: True)}
            self.assertEqual(runs, {"right"})

        return Deferred.fromCoroutine(go())

    def test_reports_its_own_cost(self) -> Deferred[None]:
        port = free_port()

        async def go() -> None:
            server = await self.serve(one_port(port))
            pub = self.publisher(port, report_every=0.05)
            for step in range(100):
                pub.log({"loss": 0.5}, step=step)

            def reported() -> bool:
                names = {r.name for r in server.hub.store.after(0, lambda r: r.type == "metric")}
                return {
                    "trainstream/log_us",
                    "trainstream/queue_depth",
                    "trainstream/dropped",
                } <= names

            for _ in range(500):  # bounded wait (5 s) for the first report
                if reported():
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.assertTrue(reported())

        return Deferred.fromCoroutine(go())


class PublisherRefusalTests(TestCase):
    """The server takes a batch all or nothing: one bad event must not cost the rest."""

    timeout = 60

    async def serve(self) -> StreamServer:
        server = StreamServer({"listen": "tcp:0:interface=127.0.0.1", "memory": True}, reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server

    def publisher(self, server: StreamServer) -> Publisher:
        publisher = Publisher(server.urls["rest"], "remote", report_every=0, flush_at_exit=0)
        self.addCleanup(lambda: deferToThread(publisher.close, 5))
        return publisher

    def test_a_bad_event_is_reported_and_the_rest_is_sent(self) -> Deferred[None]:
        def metric(step: int, value: object) -> dict[str, object]:
            event = {"type": "metric", "run": "remote", "name": "loss", "step": step}
            return {**event, "value": value, "time": 1.0}

        async def go() -> None:
            server = await self.serve()
            pub = self.publisher(server)
            # What log() would refuse, as if a server with other rules refused it.
            batch = [metric(s, float(s)) for s in range(10)]
            batch[3] = metric(3, 2**70)
            batch[7] = dict(metric(7, 7.0), colour="red")
            with self.assertLogs("trainstream.client", "WARNING") as logged:
                pub._enqueue(batch)
                self.assertTrue(await deferToThread(pub.flush, 20))
            self.assertEqual(len(logged.records), 2)
            self.assertIn('"step":3', logged.output[0])
            steps = [
                r.event["step"] for r in server.hub.store.after(0, lambda r: r.type == "metric")
            ]
            self.assertEqual(steps, [0, 1, 2, 4, 5, 6, 8, 9])
            self.assertEqual(pub.rejected, 2)
            self.assertEqual([e["step"] for e, _ in pub.rejected_events], [3, 7])
            reasons = [reason for _, reason in pub.rejected_events]
            self.assertIn('field "value" must fit in 64 bits', reasons[0])
            self.assertIn('field "colour" is unknown', reasons[1])

        return Deferred.fromCoroutine(go())

    def test_a_batch_too_large_is_sent_in_halves(self) -> Deferred[None]:
        async def go() -> None:
            server = await self.serve()
            pub = self.publisher(server)
            text = "x" * 60_000
            lines = [
                {
                    "type": "log",
                    "run": "remote",
                    "level": "info",
                    "message": f"{i} {text}",
                    "time": 1.0,
                }
                for i in range(200)  # 12 MB: over the 8 MiB a request may carry
            ]
            pub._enqueue(lines)
            self.assertTrue(await deferToThread(pub.flush, 30))
            got = [r.event["message"] for r in server.hub.store.after(0, lambda r: r.type == "log")]
            self.assertEqual([str(m).split()[0] for m in got], [str(i) for i in range(200)])
            self.assertEqual(pub.rejected, 0)

        return Deferred.fromCoroutine(go())


class PublisherInputTests(SynchronousTestCase):
    def test_bad_input_raises_in_the_caller(self) -> None:
        pub = Publisher("http://127.0.0.1:9", "r", report_every=0, flush_at_exit=0)
        self.addCleanup(pub.close, 0.1)
        for metrics, step in (({"loss": 1}, -1), ({"bad name!": 1}, 1), ({"loss": "x"}, 1)):
            with self.assertRaises(EventError):
                pub.log(metrics, step=step)
        with self.assertRaises(EventError):
            pub.status("sleeping")
        with self.assertRaises(EventError):
            Publisher("http://127.0.0.1:9", "bad run!", report_every=0, flush_at_exit=0)
        with self.assertRaises(ValueError):
            Publisher("ftp://127.0.0.1:9", "r", report_every=0, flush_at_exit=0)
        self.assertIsInstance(pub, RunAPI)


# Without sockets: a Clock and a fake transport


class FakeTransport:
    """
    The server, as the Publisher's transport sees it: each POST's events, at
    the clock's time; away (``up = False``: connection refused) or answering
    ``answer(events)`` (default: 200).
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.up = True
        self.answer: Any = lambda events: (200, b'{"accepted": %d}' % len(events))
        #: (time, events) of every POST tried, refused or not
        self.posts: list[tuple[float, list[dict[str, Any]]]] = []
        self.stored: list[dict[str, Any]] = []
        self.closes = 0

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        assert path == "/api/events" and headers["Content-Type"] == "application/json"
        events = json.loads(body)
        self.posts.append((self.clock.seconds(), events))
        if not self.up:
            raise ConnectionRefusedError(111, "Connection refused")
        status, answer = self.answer(events)
        if status == 200:
            self.stored.extend(events)
        return status, answer

    def close(self) -> None:
        self.closes += 1

    def times(self) -> list[float]:
        return [t for t, _ in self.posts]

    def steps(self) -> list[int]:
        return [e["step"] for e in self.stored if e["type"] == "metric"]


class PublisherTestCase(SynchronousTestCase):
    """A Publisher on a ``FakeTransport`` in virtual time; ``defaults`` per test class."""

    defaults: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = FakeTransport(self.clock)

    def publisher(self, **kw: Any) -> Publisher:
        kw = {"report_every": 0, "flush_at_exit": 0, **self.defaults, **kw}
        return Publisher("http://h:1", "r", clock=self.clock, transport=self.server, **kw)


class PublisherRulesTests(PublisherTestCase):
    """How the Publisher sends, in virtual time: no thread, no socket."""

    defaults = {"max_backoff": 2.0}

    def test_idle_at_once_busy_gathers_for_the_linger(self) -> None:
        """
        Nagle-style: an idle publisher sends at once; less than ``linger``
        after a POST began, events gather and go together ``linger`` after
        it. (Before adaptive batching, every batch waited the linger.)
        """
        pub = self.publisher(linger=0.25)
        for step in range(3):
            pub.log({"loss": 1.0}, step=step)
        self.clock.advance(0)
        ((when, events),) = self.server.posts
        self.assertEqual(when, 0.0)
        self.assertEqual([e["type"] for e in events], ["status", "metric", "metric", "metric"])
        self.assertEqual((pub.sent, pub.queue_depth), (4, 0))
        self.clock.advance(0.1)
        for step in range(3, 6):
            pub.log({"loss": 1.0}, step=step)  # busy: they gather
        self.clock.advance(0.1)
        self.assertEqual(len(self.server.posts), 1)
        self.clock.advance(0.05)
        self.assertEqual(self.server.times(), [0.0, 0.25])
        self.assertEqual(len(self.server.posts[1][1]), 3)
        self.clock.advance(1.0)  # idle again: the next goes at once
        pub.log({"loss": 1.0}, step=6)
        self.clock.advance(0)
        self.assertEqual(self.server.times(), [0.0, 0.25, 1.25])
        self.assertEqual(self.server.steps(), list(range(7)))

    def test_a_full_batch_goes_at_once(self) -> None:
        pub = self.publisher(batch_size=4, linger=10)
        pub.log({"a": 1, "b": 2, "c": 3}, step=0)  # with "created": 4
        pub.log({"a": 1}, step=1)
        self.clock.advance(0)
        self.assertEqual([len(events) for _, events in self.server.posts], [4])
        self.clock.advance(10)  # the rest waits its linger
        self.assertEqual([len(events) for _, events in self.server.posts], [4, 1])
        self.assertEqual(self.server.times(), [0.0, 10.0])

    def test_server_away_backoff_then_everything_in_order(self) -> None:
        self.server.up = False
        pub = self.publisher(linger=0.25)
        pub.log({"loss": 0.5}, step=0)
        for _ in range(16):
            self.clock.advance(0.25)
        # the linger, then 0.25, 0.5, 1, 2, 2 (the ceiling) apart
        self.assertEqual(self.server.times(), [0.25, 0.5, 1.0, 2.0, 4.0])
        self.assertIn("h:1 unreachable", pub.last_error or "")
        self.assertEqual(pub.queue_depth, 2)  # kept
        self.server.up = True
        pub.log({"loss": 0.25}, step=1)
        self.clock.advance(1.75)
        self.assertEqual(len(self.server.posts), 5)  # still waiting its turn
        self.clock.advance(0.25)
        self.assertEqual(self.server.steps(), [0, 1])
        self.assertIsNone(pub.last_error)
        self.server.up = False  # after a success the backoff starts again
        pub.log({"loss": 0.0}, step=2)
        self.clock.advance(0.25)
        self.clock.advance(0.25)
        self.assertEqual(self.server.times()[-2:], [6.25, 6.5])

    def test_the_queue_keeps_the_newest(self) -> None:
        self.server.up = False
        pub = self.publisher(max_queue=5)
        for step in range(10):
            pub.log({"loss": float(step)}, step=step)
        self.assertEqual((pub.queue_depth, pub.dropped), (5, 6))  # "created" and 5 metrics
        self.clock.advance(0.25)  # refused: the batch goes back, still bounded
        pub.log({"loss": 10.0}, step=10)
        self.assertEqual((pub.queue_depth, pub.dropped), (5, 7))
        self.server.up = True
        self.clock.advance(0.25)
        self.assertEqual(self.server.steps(), [6, 7, 8, 9, 10])
        self.server.up = False
        pub.log({f"m{i}": i for i in range(8)}, step=11)  # more than max_queue in one call
        self.assertEqual((pub.queue_depth, pub.dropped), (5, 10))

    def test_calls_keep_their_order_whichever_path_they_take(self) -> None:
        """
        log()'s common call goes into the lock-free inlet, every other event
        into the queue: the events are sent in the order of the calls.
        """
        pub = self.publisher(linger=10)
        pub.log({"loss": 1.0}, step=0)  # checked in full: "loss" is known after it
        pub.log({"loss": 2.0}, step=1)  # the common call
        pub.status("running")
        pub.log({"loss": 3.0}, step=2)
        pub.log({"loss": 4.0, "new": 1}, step=3)  # a new name: checked in full
        pub.log({"loss": 5.0}, step=4)
        self.clock.advance(10)
        self.assertEqual(
            [(e["type"], e.get("step"), e.get("value")) for e in self.server.stored],
            [
                ("status", None, None),
                ("metric", 0, 1.0),
                ("metric", 1, 2.0),
                ("status", None, None),
                ("metric", 2, 3.0),
                ("metric", 3, 4.0),
                ("metric", 3, 1),
                ("metric", 4, 5.0),
            ],
        )
        self.assertEqual(
            {e["name"] for e in self.server.stored if e["type"] == "metric"}, {"loss", "new"}
        )

    def test_the_queue_stays_bounded_however_many_calls_wait(self) -> None:
        self.server.up = False
        pub = self.publisher(max_queue=50, batch_size=10, linger=1000)
        longest = 0
        for step in range(1000):
            pub.log({"loss": float(step)}, step=step)
            longest = max(longest, len(pub._inlet))
        self.assertLessEqual(longest, 10)  # batch_size calls at most wait untaken
        self.assertEqual((pub.queue_depth, pub.dropped), (50, 1001 - 50))
        self.server.up = True
        self.clock.advance(1000)  # the next retry sends the newest 50
        self.assertEqual(self.server.steps(), list(range(950, 1000)))

    def test_calls_taken_from_the_inlet_are_kept_if_ctrl_c_lands_meanwhile(self) -> None:
        pub = self.publisher(linger=1000)
        pub.log({"loss": 0.0}, step=0)  # checked: "loss" takes the inlet from now on
        for step in (1, 2):
            pub.log({"loss": float(step)}, step=step)

        class Interrupted(deque):  # type: ignore[type-arg]
            def popleft(self) -> Any:
                item = super().popleft()
                if self:
                    return item
                raise KeyboardInterrupt  # after the first of the two was taken

        pub._inlet = Interrupted(pub._inlet)
        self.assertRaises(KeyboardInterrupt, pub._enqueue, [])
        self.assertEqual([e.get("step") for e in pub._pending], [None, 0, 1])

    def test_flush_sends_at_once(self) -> None:
        pub = self.publisher(linger=10)
        pub.log({"loss": 0.5}, step=0)
        self.assertFalse(pub.flush(timeout=0))  # nothing sent yet: not flushed
        self.clock.advance(0)  # but it goes now, not after the linger
        self.assertEqual(self.server.times(), [0.0])
        self.assertTrue(pub.flush(timeout=0))
        self.server.up = False
        pub.log({"loss": 0.5}, step=1)
        pub.flush(timeout=0)
        self.clock.advance(0)
        self.clock.advance(0.1)  # in the backoff (0.25), a flush tries at once again
        pub.flush(timeout=0)
        self.clock.advance(0)
        self.assertEqual(self.server.times(), [0.0, 0.0, 0.1])

    def test_close_makes_a_last_attempt_then_sends_nothing(self) -> None:
        pub = self.publisher(linger=10)
        pub.log({"loss": 0.5}, step=0)
        self.assertFalse(pub.close(timeout=0))
        self.clock.advance(0)
        self.assertEqual(self.server.steps(), [0])
        self.assertGreaterEqual(self.server.closes, 1)
        pub.log({"loss": 0.5}, step=1)
        self.clock.advance(100)
        self.assertEqual(self.server.steps(), [0])

    def test_one_refused_event_costs_only_itself(self) -> None:
        def answer(events: list[dict[str, Any]]) -> tuple[int, bytes]:
            for index, event in enumerate(events):
                if event.get("step") == 3:
                    return 400, json.dumps({"error": "step 3 is bad", "index": index}).encode()
            return 200, b"{}"

        self.server.answer = answer
        pub = self.publisher()
        for step in range(5):
            pub.log({"loss": 0.5}, step=step)
        with self.assertLogs("trainstream.client", "WARNING"):
            self.clock.advance(0.25)
        self.assertEqual(self.server.steps(), [0, 1, 2, 4])
        self.assertEqual((pub.rejected, pub.sent), (1, 5))
        self.assertEqual(pub.rejected_events[0][1], "step 3 is bad")

    def test_too_large_goes_in_halves(self) -> None:
        def answer(events: list[dict[str, Any]]) -> tuple[int, bytes]:
            return (413, b'{"error": "too large"}') if len(events) > 2 else (200, b"{}")

        self.server.answer = answer
        pub = self.publisher()
        for step in range(7):
            pub.log({"loss": 0.5}, step=step)
        self.clock.advance(0.25)
        self.assertEqual(self.server.steps(), list(range(7)))
        self.assertEqual(pub.rejected, 0)

    def test_a_wrong_token_is_retried_on_a_new_connection(self) -> None:
        self.server.answer = lambda events: (401, b'{"error": "a token is needed"}')
        pub = self.publisher(token="nope")
        self.clock.advance(0.25)
        self.clock.advance(0.25)
        self.assertEqual(self.server.times(), [0.25, 0.5])
        self.assertEqual(self.server.closes, 2)
        self.assertEqual(pub.last_error, "server answered 401: a token is needed")
        self.assertEqual(pub.queue_depth, 1)  # kept for when the token is right

    def test_a_refused_token_is_said_once_and_no_flush_waits_for_it(self) -> None:
        """
        A 401 will not pass by waiting: one warning says so (not one per
        retry), ``flush`` returns ``False`` at once instead of at its
        timeout, and ``close`` says how many events were not delivered.
        Once the server takes the token, a warning says that too.
        """
        self.server.answer = lambda events: (401, b'{"error": "missing or wrong token"}')
        pub = self.publisher(token="nope")
        pub.log({"loss": 0.5}, step=0)
        with self.assertLogs("trainstream.client", "WARNING") as said:
            for _ in range(8):
                self.clock.advance(0.25)
        self.assertGreater(len(self.server.posts), 3)
        (line,) = said.output
        self.assertIn("h:1 refused the token (server answered 401: missing or wrong token)", line)
        self.assertIn("set $TRAINSTREAM_TOKEN", line)
        started = time.monotonic()
        self.assertFalse(pub.flush(timeout=30))
        self.assertLess(time.monotonic() - started, 5)
        self.server.answer = lambda events: (200, b"{}")
        with self.assertLogs("trainstream.client", "WARNING") as said:
            self.clock.advance(2.0)
        self.assertIn("h:1 takes events again", said.output[0])
        self.assertIsNone(pub.refused)
        self.assertEqual(self.server.steps(), [0])

    def test_close_says_what_was_not_delivered(self) -> None:
        self.server.up = False
        pub = self.publisher(max_queue=3)
        for step in range(4):
            pub.log({"loss": 0.5}, step=step)
        with self.assertLogs("trainstream.client", "WARNING") as said:
            for _ in range(8):
                self.clock.advance(0.25)
            self.assertFalse(pub.close(timeout=0))
            self.clock.advance(0)
        self.assertEqual(len(said.output), 2, said.output)
        self.assertIn("h:1 unreachable", said.output[0])
        self.assertIn(
            "5 events not delivered to h:1, 2 dropped from the full queue before", said.output[1]
        )
        self.assertEqual(pub.undelivered, 3)

    def test_its_own_metrics(self) -> None:
        """Reported at the run's latest step: the axis of its metrics, not the clock."""
        pub = self.publisher(report_every=10)
        pub.log({"loss": 0.5}, step=0)
        self.clock.advance(0.25)
        self.clock.advance(9.75)
        self.clock.advance(0.25)
        names = [e["name"] for e in self.server.stored if e["type"] == "metric"]
        self.assertEqual(
            names,
            ["loss", "trainstream/log_us", "trainstream/queue_depth", "trainstream/dropped"],
        )
        log_us = next(
            e["value"] for e in self.server.stored if e.get("name") == "trainstream/log_us"
        )
        self.assertGreater(log_us, 0)
        pub.log({"loss": 0.5}, step=41)
        self.clock.advance(10)
        self.clock.advance(0.25)
        self.assertEqual(len(self.server.stored), 2 + 3 + 1 + 3)  # every report_every
        steps = [
            e["step"] for e in self.server.stored if e.get("name", "").startswith("trainstream/")
        ]
        self.assertEqual(steps, [0, 0, 0, 41, 41, 41])


class PublisherThreadTests(SynchronousTestCase):
    """The lock-free inlet with real threads: nothing stranded, lost or doubled."""

    def test_threads_logging_at_once_lose_nothing_and_wait_for_no_flush(self) -> None:
        server = FakeTransport(Clock())
        pub = Publisher(
            "http://h:1",
            "r",
            report_every=0,
            flush_at_exit=0,
            transport=server,
            linger=0.001,
            max_linger=0.001,
        )
        self.addCleanup(pub.close, 5)
        pub.log({"warm": 0.0}, step=0)  # "warm" known: the calls below take the inlet

        def log(name: str) -> None:
            for step in range(3000):
                pub.log({name: float(step)}, step=step)
                if step % 300 == 299:
                    time.sleep(0.02)  # a pause: the sender goes idle, the next call wakes it

        pub.log({f"t{i}": 0.0 for i in range(4)}, step=0)
        threads = [threading.Thread(target=log, args=(f"t{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        expected = 1 + 1 + 4 + 4 * 3000  # "created", warm, the names' first call, the rest
        deadline = time.monotonic() + 10
        while pub.sent < expected and time.monotonic() < deadline:
            time.sleep(0.01)  # no flush: the sending thread must have been woken
        self.assertEqual(pub.sent, expected)
        for i in range(4):
            steps = [e["step"] for e in server.stored if e.get("name") == f"t{i}"]
            self.assertEqual(steps, [0, *range(3000)])


class ThreadClockTests(SynchronousTestCase):
    """The Publisher's own thread: ``callLater`` without a reactor (bounded waits)."""

    def test_calls_in_time_order_cancel_and_stop(self) -> None:
        clock = ThreadClock("test-clock")
        self.addCleanup(clock.stop, 5)
        ran: list[str] = []
        done = threading.Event()
        clock.callLater(0.02, lambda: ran.append("b"))
        clock.callLater(0, lambda: ran.append("a"))
        with self.assertLogs("trainstream.client", "ERROR"):
            clock.callLater(0.01, lambda: 1 / 0)  # logged; the next calls run all the same
            dropped = clock.callLater(0.01, lambda: ran.append("cancelled"))
            dropped.cancel()
            clock.callLater(0.03, done.set)
            self.assertTrue(done.wait(5))
        self.assertEqual(ran, ["a", "b"])
        self.assertFalse(dropped.active())
        late = clock.callLater(60, lambda: ran.append("late"))
        clock.callLater(0, lambda: ran.append("due"))
        self.assertTrue(clock.stop(5))  # runs what is due, drops the rest
        self.assertEqual(ran, ["a", "b", "due"])
        self.assertTrue(late.active())  # never run: the thread is gone
        self.assertFalse(clock.callLater(0, lambda: None).active())  # stopped for good
