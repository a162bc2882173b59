"""
``trainstream.client.Subscriber`` (blocking iterator, read here in a thread)
and ``subscribe_deferred`` against a real server on loopback: history then
live, resume with ``after``, filters, tokens, and a server stopped and
started again on the same ports without gaps or doubles.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.clients import config_on, free_port
from tests.test_streaming import ServerTestCase, d, metric
from tests.test_watch import base_url, until
from trainstream.client import Subscriber, SubscriberError, subscribe_deferred
from trainstream.service import StreamServer


def collect(subscriber: Subscriber, into: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """In a thread: the subscriber's next ``count`` events, then close it."""
    with subscriber:
        for event in subscriber:
            into.append(event)
            if len(into) >= count:
                break
    return into


class SubscriberTests(ServerTestCase):
    timeout = 60

    def test_history_then_live(self) -> Deferred[None]:
        async def go() -> None:
            hub = self.server.hub
            hub.accept([metric("a", s) for s in range(5)])
            got: list[dict[str, Any]] = []
            sub = Subscriber(base_url(self.server), after=0)
            reading = deferToThread(collect, sub, got, 8)
            await until(lambda: len(got) == 5)
            hub.accept([metric("a", s) for s in range(5, 8)])
            await reading
            self.assertEqual([e["id"] for e in got], list(range(1, 9)))
            self.assertEqual([e["step"] for e in got], list(range(8)))
            self.assertEqual(sub.last_id, 8)
            self.assertTrue(sub.closed)
            self.assertEqual(list(sub), [])  # closed: the iteration is over

        return d(go())

    def test_resume_after_and_filters(self) -> Deferred[None]:
        async def go() -> None:
            hub = self.server.hub
            hub.accept([metric("a", s) if s % 2 else metric("b", s) for s in range(10)])
            hub.accept([{"type": "log", "run": "a", "level": "info", "message": "x"}])
            got: list[dict[str, Any]] = []
            sub = Subscriber(self.server.urls["sse"], runs=["a"], types=["metric"], after=4)
            await deferToThread(collect, sub, got, 3)
            self.assertEqual([(e["run"], e["id"]) for e in got], [("a", 6), ("a", 8), ("a", 10)])
            # Go on from where it stopped: nothing twice.
            more: list[dict[str, Any]] = []
            again = Subscriber(self.server.urls["rest"], runs=["*"], after=sub.last_id)
            await deferToThread(collect, again, more, 1)
            self.assertEqual([(e["type"], e["id"]) for e in more], [("log", 11)])

        return d(go())

    def test_live_only_and_close_from_another_thread(self) -> Deferred[None]:
        """``after=None``: no history; ``close()`` ends a ``next()`` that waits."""

        async def go() -> None:
            hub = self.server.hub
            hub.accept([metric("old", s) for s in range(3)])
            got: list[dict[str, Any]] = []
            sub = Subscriber(base_url(self.server))
            reading = deferToThread(collect, sub, got, 100)
            await until(lambda: self.server.clients.counts()["sse"] == 1)
            hub.accept([metric("new", 1)])
            await until(lambda: len(got) == 1)
            sub.close()  # the reader waits in next(): it ends
            await reading
            self.assertEqual([(e["run"], e["id"]) for e in got], [("new", 4)])
            await until(lambda: self.server.clients.counts()["sse"] == 0)

        return d(go())

    def test_deferred_form(self) -> Deferred[None]:
        async def go() -> None:
            hub = self.server.hub
            hub.accept([metric("a", s) for s in range(6)])
            seen: list[int] = []
            in_reactor: list[bool] = []

            def slow(event: dict[str, Any]) -> Deferred[bool]:
                in_reactor.append(threading.current_thread() is threading.main_thread())
                seen.append(event["id"])
                # A Deferred holds the next event back until it fires.
                return deferLater(reactor, 0.01, lambda: len(seen) < 4)

            last = await subscribe_deferred(base_url(self.server), slow, after=0)
            self.assertEqual((last, seen), (4, [1, 2, 3, 4]))
            self.assertTrue(all(in_reactor))

            # Cancelled: CancelledError, and the stream is closed.
            live: list[object] = []
            running = subscribe_deferred(base_url(self.server), lambda e: live.append(e["id"]))
            await until(lambda: self.server.clients.counts()["sse"] == 1)
            hub.accept([metric("a", 6)])
            await until(lambda: live == [7])
            running.cancel()
            with self.assertRaises(CancelledError):
                await running
            await until(lambda: self.server.clients.counts()["sse"] == 0)

            # The callback raises: the Deferred fails with it.
            def boom(event: dict[str, Any]) -> None:
                raise ZeroDivisionError(event["id"])

            with self.assertRaises(ZeroDivisionError):
                await subscribe_deferred(base_url(self.server), boom, after=2)

        return d(go())


class SubscriberTokenTests(ServerTestCase):
    config = {"listen": "tcp:0:interface=127.0.0.1", "memory": True, "token": "s3cret"}
    timeout = 60

    def test_token(self) -> Deferred[None]:
        async def go() -> None:
            self.server.hub.accept([metric("t", 1)])
            url = base_url(self.server)
            with self.assertRaises(SubscriberError) as caught:
                await deferToThread(collect, Subscriber(url, after=0), [], 1)
            self.assertIn("401", str(caught.exception))
            got = await deferToThread(collect, Subscriber(url, after=0, token="s3cret"), [], 1)
            self.assertEqual([e["run"] for e in got], ["t"])
            with self.assertRaises(SubscriberError):
                await subscribe_deferred(url, lambda e: None, after=0)

        return d(go())


class SubscriberRestartTests(TestCase):
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
            hub = self.server.hub
            hub.accept([metric("a", s) for s in range(5)])
            got: list[dict[str, Any]] = []
            sub = Subscriber(self.server.urls["sse"], after=0, backoff_max=0.5)
            reading = deferToThread(collect, sub, got, 12)
            await until(lambda: len(got) == 5)
            await self.server.stop()
            hub.accept([metric("a", s) for s in range(5, 9)])
            await deferLater(reactor, 0.3, lambda: None)  # it tries, and fails, to reconnect
            await self.server.start()
            await until(lambda: len(got) == 9)
            hub.accept([metric("a", s) for s in range(9, 12)])
            await reading
            self.assertEqual([e["id"] for e in got], list(range(1, 13)))
            self.assertEqual([e["step"] for e in got], list(range(12)))
            self.assertGreaterEqual(sub.connections, 2)

        return d(go())

    def test_new_history_is_a_reset(self) -> Deferred[None]:
        """Another history on the same ports: a reset dict, then its events."""

        async def go() -> None:
            self.server.hub.accept([metric("a", s) for s in range(3)])
            got: list[dict[str, Any]] = []
            sub = Subscriber(self.server.urls["rest"], after=0, backoff_max=0.5)
            reading = deferToThread(collect, sub, got, 6)
            await until(lambda: len(got) == 3)
            await self.server.stop()
            other = StreamServer(config_on(self.ports, retry_ms=100), reactor)
            other.hub.accept([metric("b", s) for s in range(2)])
            self.addCleanup(other.stop)
            await other.start()
            await reading
            self.assertEqual(got[3]["type"], "reset")
            self.assertNotIn("id", got[3])
            self.assertEqual([(e["run"], e["id"]) for e in got[4:]], [("b", 1), ("b", 2)])

        return d(go())
