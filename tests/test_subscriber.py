"""
The client library's reading side.

Without sockets (``SynchronousTestCase``): the one SSE parser; URL parsing;
the backoff policy; the resuming SSE client against a fake server (its
``connect``) on a ``Clock`` (its waits), where every retry, backoff, resume,
reset and refusal is checked in virtual time.

On loopback: the SSE client against a scripted server (chunk boundaries
through ``http.client``), ``trainstream.client.Subscriber`` (blocking
iterator, read here in a thread) and ``subscribe_deferred`` against a real
server: history then live, resume with ``after``, filters, tokens, and a
server stopped and started again on the same ports without gaps or doubles.
Every wait is bounded: a broken resume fails an assertion, it does not hang.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import config_on, free_port
from tests.test_streaming import ServerTestCase, d, metric
from tests.test_watch import base_url, until, within
from trainstream.client import Subscriber, SubscriberError, api_base, subscribe_deferred
from trainstream.client.backoff import Backoff
from trainstream.client.http import ClientError, Endpoint, parse_endpoint
from trainstream.client.sse import ConnState, Event, Reset, SSEClient, SSEParser
from trainstream.server import StreamServer


def opened(test: TestCase, subscriber: Subscriber) -> Subscriber:
    """``subscriber``, closed when the test ends (a failed test leaves no reader behind)."""
    test.addCleanup(subscriber.close)
    return subscriber


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
            sub = opened(self, Subscriber(base_url(self.server), after=0))
            reading = deferToThread(collect, sub, got, 8)
            await until(lambda: len(got) == 5)
            hub.accept([metric("a", s) for s in range(5, 8)])
            await within(reading, 10, sub.close)
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
            sub = opened(
                self, Subscriber(self.server.urls["sse"], runs=["a"], types=["metric"], after=4)
            )
            await within(deferToThread(collect, sub, got, 3), 10, sub.close)
            self.assertEqual([(e["run"], e["id"]) for e in got], [("a", 6), ("a", 8), ("a", 10)])
            # Go on from where it stopped: nothing twice.
            more: list[dict[str, Any]] = []
            again = opened(
                self, Subscriber(self.server.urls["rest"], runs=["*"], after=sub.last_id)
            )
            await within(deferToThread(collect, again, more, 1), 10, again.close)
            self.assertEqual([(e["type"], e["id"]) for e in more], [("log", 11)])

        return d(go())

    def test_live_only_and_close_from_another_thread(self) -> Deferred[None]:
        """``after=None``: no history; ``close()`` ends a ``next()`` that waits."""

        async def go() -> None:
            hub = self.server.hub
            hub.accept([metric("old", s) for s in range(3)])
            got: list[dict[str, Any]] = []
            sub = opened(self, Subscriber(base_url(self.server)))
            reading = deferToThread(collect, sub, got, 100)
            await until(lambda: self.server.clients.counts()["sse"] == 1)
            hub.accept([metric("new", 1)])
            await until(lambda: len(got) == 1)
            sub.close()  # the reader waits in next(): it ends
            await reading.addTimeout(10, reactor)
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

            last = await subscribe_deferred(base_url(self.server), slow, after=0).addTimeout(
                10, reactor
            )
            self.assertEqual((last, seen), (4, [1, 2, 3, 4]))
            self.assertTrue(all(in_reactor))
            await until(lambda: self.server.clients.counts()["sse"] == 0)

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
                await subscribe_deferred(base_url(self.server), boom, after=2).addTimeout(
                    10, reactor
                )

        return d(go())


class SubscriberTokenTests(ServerTestCase):
    config = {"listen": "tcp:0:interface=127.0.0.1", "memory": True, "token": "s3cret"}
    timeout = 60

    def test_token(self) -> Deferred[None]:
        async def go() -> None:
            self.server.hub.accept([metric("t", 1)])
            url = base_url(self.server)
            refused = opened(self, Subscriber(url, after=0))
            with self.assertRaises(SubscriberError) as caught:
                await within(deferToThread(collect, refused, [], 1), 10, refused.close)
            self.assertIn("401", str(caught.exception))
            sub = opened(self, Subscriber(url, after=0, token="s3cret"))
            got = await within(deferToThread(collect, sub, [], 1), 10, sub.close)
            self.assertEqual([e["run"] for e in got], ["t"])
            with self.assertRaises(SubscriberError):
                await subscribe_deferred(url, lambda e: None, after=0).addTimeout(10, reactor)

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
            sub = opened(self, Subscriber(self.server.urls["sse"], after=0, backoff_max=0.5))
            reading = deferToThread(collect, sub, got, 12)
            await until(lambda: len(got) == 5)
            await self.server.stop()
            hub.accept([metric("a", s) for s in range(5, 9)])
            # It tries, and fails, to reconnect.
            await until(lambda: sub._client.state.detail == "connection refused")
            await self.server.start()
            await until(lambda: len(got) == 9)
            hub.accept([metric("a", s) for s in range(9, 12)])
            await within(reading, 10, sub.close)
            self.assertEqual([e["id"] for e in got], list(range(1, 13)))
            self.assertEqual([e["step"] for e in got], list(range(12)))
            self.assertGreaterEqual(sub.connections, 2)

        return d(go())

    def test_new_history_is_a_reset(self) -> Deferred[None]:
        """Another history on the same ports: a reset dict, then its events."""

        async def go() -> None:
            self.server.hub.accept([metric("a", s) for s in range(3)])
            got: list[dict[str, Any]] = []
            sub = opened(self, Subscriber(self.server.urls["rest"], after=0, backoff_max=0.5))
            reading = deferToThread(collect, sub, got, 6)
            await until(lambda: len(got) == 3)
            await self.server.stop()
            other = StreamServer(config_on(self.ports, retry_ms=100), reactor)
            other.hub.accept([metric("b", s) for s in range(2)])
            self.addCleanup(other.stop)
            await other.start()
            await within(reading, 10, sub.close)
            self.assertEqual(got[3]["type"], "reset")
            self.assertNotIn("id", got[3])
            self.assertEqual([(e["run"], e["id"]) for e in got[4:]], [("b", 1), ("b", 2)])

        return d(go())


# Without sockets


class ParserTests(SynchronousTestCase):
    """The project's one SSE parser (the tests' SSE reader uses it too)."""

    def test_sse_lines(self) -> None:
        parser = SSEParser()
        messages = [
            parser.feed(line)
            for line in [
                "retry: 3000",
                "",
                ": keepalive",
                "",
                "id: 7",
                "event: metric",
                'data: {"a":',
                "data:1}",
                "",
            ]
        ]
        self.assertEqual(parser.retry_ms, 3000)
        self.assertEqual(parser.comments, 1)
        message = [m for m in messages if m is not None]
        self.assertEqual(len(message), 1)
        self.assertEqual((message[0].event, message[0].id), ("metric", "7"))
        self.assertEqual(json.loads(message[0].data), {"a": 1})

    def test_bytes_in_any_pieces(self) -> None:
        """The same messages whatever the cuts: CRLF, a line and a message split."""
        stream = (
            b'retry: 50\r\n\r\n: keepalive\n\nid: 1\nevent: metric\ndata: {"a": 1}\n\n'
            b"id: 2\r\nevent: reset\r\ndata: x\r\ndata: y\r\n\r\ndata: z\n\n"
        )
        whole = SSEParser().feed_bytes(stream)
        self.assertEqual(
            [(m.event, m.data, m.id) for m in whole],
            [("metric", '{"a": 1}', "1"), ("reset", "x\ny", "2"), ("message", "z", "2")],
        )
        for size in (1, 2, 3, 7, 16):
            parser = SSEParser()
            pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
            got = [m for piece in pieces for m in parser.feed_bytes(piece)]
            self.assertEqual(got, whole, size)
            self.assertEqual((parser.retry_ms, parser.comments), (50, 1))

    def test_ignored_lines(self) -> None:
        parser = SSEParser()
        for line in ("id: a\0b", "retry: soon", "colour: red", "data"):
            self.assertIsNone(parser.feed(line))
        message = parser.feed("")
        self.assertEqual((parser.last_id, parser.retry_ms), (None, None))
        self.assertEqual(message, type(message)("message", "", None))  # "data" alone: ""

    def test_endpoints(self) -> None:
        for url in (
            "http://127.0.0.1:8890",
            "http://127.0.0.1:8890/",
            "http://127.0.0.1:8890/api",
            "http://127.0.0.1:8890/api/health",
            "127.0.0.1:8890",
        ):
            self.assertEqual(parse_endpoint(url).base, "http://127.0.0.1:8890", url)
        sse = parse_endpoint("http://h:8888/events?run=a&run=b&token=t")
        self.assertEqual(
            (sse.base, sse.query["run"], sse.query["token"]), ("http://h:8888", ("a", "b"), ("t",))
        )
        self.assertEqual(parse_endpoint("https://h/ts/events").base, "https://h:443/ts")
        self.assertRaises(ClientError, parse_endpoint, "ws://h:1/ws")
        self.assertRaises(ClientError, parse_endpoint, "http://h:port")
        self.assertRaises(ClientError, parse_endpoint, "http:///events")

    def test_api_base(self) -> None:
        """The Publisher's form of the same parsing (ValueError for a bad URL)."""
        self.assertEqual(api_base("http://h:1/api"), ("http", "h", 1, ""))
        self.assertEqual(api_base("h:2/events"), ("http", "h", 2, ""))
        self.assertEqual(api_base("https://h/proxy/api/"), ("https", "h", 443, "/proxy"))
        with self.assertRaises(ValueError):
            api_base("ftp://h")


# The SSE client on a fake server, in virtual time


class FakeResponse:
    """An answer: its status, content type and body; ``then`` is raised at the body's end."""

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        ctype: str = "text/event-stream",
        then: BaseException | None = None,
    ) -> None:
        self.status = status
        self.ctype = ctype
        self.body = io.BytesIO(body)
        self.then = then

    def read(self) -> bytes:
        return self.body.read()

    def readline(self) -> bytes:
        line = self.body.readline()
        if not line and self.then is not None:
            raise self.then
        return line

    def getheader(self, name: str) -> str | None:
        return self.ctype if name.lower() == "content-type" else None


class FakeConnection:
    sock = None

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.response: FakeResponse | None = None

    def request(
        self, method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] = {}
    ) -> None:
        self.response = self.server.answer(url, headers)

    def getresponse(self) -> FakeResponse:
        assert self.response is not None
        return self.response

    def close(self) -> None:
        pass


Step = bytes | FakeResponse | BaseException


class FakeServer:
    """
    The SSE client's transport (its ``connect``), with no socket. Each
    connection (a health check, then ``/events``) takes the next step of
    the script: an exception is raised at the health check (the server is
    away); bytes are a 200 event stream that then ends; a ``FakeResponse``
    is that answer. Health answers ``epoch``. Once the script is done the
    client is closed, so its iteration ends and the test goes on to assert.
    """

    def __init__(self, clock: Clock, script: list[Step]) -> None:
        self.clock = clock
        self.script = list(script)
        self.epoch = "e1"
        self.client: SSEClient | None = None
        #: the client's connection states
        self.states: list[ConnState] = []
        #: (clock time, path, headers) of each /events request
        self.streams: list[tuple[float, str, dict[str, str]]] = []
        #: clock times of the health checks: one per attempt
        self.attempts: list[float] = []

    def connect(self, endpoint: Endpoint, timeout: float) -> FakeConnection:
        return FakeConnection(self)

    def sse(self, **kw: Any) -> SSEClient:
        kw.setdefault("on_state", self.states.append)
        self.client = SSEClient(
            parse_endpoint("http://h:1"), connect=self.connect, clock=self.clock, **kw
        )
        return self.client

    def answer(self, url: str, headers: Mapping[str, str]) -> FakeResponse:
        if not self.script:
            assert self.client is not None
            self.client.close()
            raise ConnectionRefusedError("the script is done")
        if url == "/api/health":
            self.attempts.append(self.clock.seconds())
            if isinstance(self.script[0], BaseException):
                raise self.script.pop(0)
            body = json.dumps({"status": "ok", "epoch": self.epoch}).encode()
            return FakeResponse(200, body, "application/json")
        self.streams.append((self.clock.seconds(), url, dict(headers)))
        step = self.script.pop(0)
        assert not isinstance(step, BaseException)
        return step if isinstance(step, FakeResponse) else FakeResponse(200, step)


def sse(*ids: int, retry: int | None = None, end: str = "") -> bytes:
    """An event stream: ``retry:``, metric events with these ids, then ``end``."""
    out = f"retry: {retry}\n\n" if retry is not None else ""
    for i in ids:
        data = json.dumps({"id": i, "type": "metric", "run": "r", "name": "x", "step": i})
        out += f"id: {i}\nevent: metric\ndata: {data}\n\n"
    return (out + end).encode()


OVERFLOW = 'event: overflow\ndata: {"reason": "slow", "last_id": 0}\n\n'


def reset(oldest: int) -> str:
    return f'event: reset\ndata: {{"reason": "gone", "oldest_id": {oldest}}}\n\n'


def refused() -> ConnectionRefusedError:
    return ConnectionRefusedError(111, "Connection refused")


class ResumingClientTests(SynchronousTestCase):
    """Retry, backoff, resume and refusals of ``SSEClient``, in virtual time."""

    def run_client(
        self, script: list[Step], **kw: Any
    ) -> tuple[list[Event | Reset], FakeServer, Clock]:
        clock = Clock()
        server = FakeServer(clock, script)
        kw.setdefault("backoff_initial", 0.5)
        kw.setdefault("backoff_max", 4.0)
        client = server.sse(**kw)
        items = list(itertools.islice(client.items(), 100))  # bounded: never hangs
        self.assertEqual(server.script, [], "the client stopped before the script's end")
        return items, server, clock

    def ids(self, items: list[Event | Reset]) -> list[object]:
        return [i.id if isinstance(i, Event) else ("reset", i.oldest_id) for i in items]

    def last_event_ids(self, server: FakeServer) -> list[str | None]:
        return [headers.get("Last-Event-ID") for _, _, headers in server.streams]

    def test_resumes_after_the_last_id_at_the_servers_retry(self) -> None:
        items, server, _ = self.run_client([sse(1, 2, retry=50), sse(3)], runs=["r"])
        self.assertEqual(self.ids(items), [1, 2, 3])
        self.assertEqual(self.last_event_ids(server), [None, "2"])
        self.assertEqual([t for t, _, _ in server.streams], [0.0, 0.05])
        self.assertEqual(server.streams[0][1], "/events?run=r")
        self.assertEqual(server.client.connections if server.client else 0, 2)

    def test_backoff_doubles_up_to_the_ceiling_and_starts_again(self) -> None:
        script: list[Step] = [refused() for _ in range(5)]
        script += [sse(1), refused(), sse(2)]
        items, server, _ = self.run_client(script)
        self.assertEqual(self.ids(items), [1, 2])
        # 0.5, 1, 2, 4, 4 (the ceiling); after the stream, 0.5 and 1 again.
        self.assertEqual(server.attempts, [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 12.0, 13.0])
        waits = [s for s in server.states if s.status == "reconnecting"]
        self.assertEqual(waits[0].detail, "connection refused")
        self.assertEqual(waits[0].retry_at, 0.5)
        self.assertEqual(server.states[-1].status, "stopped")

    def test_the_servers_retry_is_the_first_delay(self) -> None:
        items, server, _ = self.run_client([sse(1, retry=3000), refused(), sse(2)])
        self.assertEqual(self.ids(items), [1, 2])
        self.assertEqual(server.attempts, [0.0, 3.0, 7.0])  # 3, then min(4, 6)

    def test_overflow_resumes_at_once_without_doubles(self) -> None:
        items, server, _ = self.run_client([sse(1, 2, end=OVERFLOW), sse(2, 3)], after=0)
        self.assertEqual(self.ids(items), [1, 2, 3])
        self.assertEqual(self.last_event_ids(server), ["0", "2"])
        self.assertEqual([t for t, _, _ in server.streams], [0.0, 0.0])

    def test_reset_resumes_from_the_oldest_held(self) -> None:
        items, server, _ = self.run_client([sse(1, end=reset(10)), sse(10)], after=0)
        self.assertEqual(self.ids(items), [1, ("reset", 10), 10])
        self.assertEqual(self.last_event_ids(server), ["0", "9"])

    def test_new_epoch_is_a_reset_and_ids_start_again(self) -> None:
        clock = Clock()
        server = FakeServer(clock, [sse(1, 2), sse(1)])
        clock.callLater(0.2, setattr, server, "epoch", "e2")  # a new history meanwhile
        client = server.sse(after=0)
        items = list(itertools.islice(client.items(), 100))
        self.assertEqual(self.ids(items), [1, 2, ("reset", None), 1])
        self.assertIn("epoch", next(i for i in items if isinstance(i, Reset)).reason)
        self.assertEqual(self.last_event_ids(server), ["0", "0"])

    def test_silence_is_a_timeout_and_a_reconnect(self) -> None:
        timed_out = FakeResponse(200, sse(1), then=TimeoutError("timed out"))
        items, server, _ = self.run_client([timed_out, sse(2)], after=0)
        self.assertEqual(self.ids(items), [1, 2])
        self.assertEqual(self.last_event_ids(server), ["0", "1"])
        self.assertIn("timed out", [s.detail for s in server.states])

    def test_server_errors_are_retried(self) -> None:
        busy = FakeResponse(503, b'{"error": "busy"}', "application/json")
        items, server, _ = self.run_client([busy, sse(1)], after=0)
        self.assertEqual(self.ids(items), [1])
        self.assertEqual(server.attempts, [0.0, 0.5])
        self.assertIn("HTTP 503: busy", [s.detail for s in server.states])

    def test_refusals_retrying_cannot_fix(self) -> None:
        for answer, text in (
            (FakeResponse(401, b'{"error": "bad token"}', "application/json"), "token"),
            (FakeResponse(400, b'{"error": "bad filter ?type=x"}', "application/json"), "?type=x"),
            (FakeResponse(200, b"<html>", "text/html"), "not an event stream"),
        ):
            clock = Clock()
            server = FakeServer(clock, [answer, sse(1)])
            with self.assertRaises(ClientError) as caught:
                list(itertools.islice(server.sse().items(), 10))
            self.assertIn(text, str(caught.exception))
            self.assertEqual(len(server.streams), 1)  # not retried
            self.assertEqual(server.states[-1].status, "stopped")

    def test_close_ends_the_iteration(self) -> None:
        clock = Clock()
        server = FakeServer(clock, [sse(1, 2, 3), sse(4)])
        client = server.sse(after=0)
        got = []
        for item in client.items():
            got.append(item)
            client.close()
        self.assertEqual(self.ids(got), [1])
        self.assertEqual(len(server.streams), 1)
        self.assertTrue(client.closed)


class BackoffTests(SynchronousTestCase):
    """The one backoff policy (SSE client, watch feeder, Publisher)."""

    def test_doubles_to_the_ceiling_and_resets(self) -> None:
        backoff = Backoff(0.25, 2.0)
        self.assertEqual([backoff.next() for _ in range(6)], [0.25, 0.5, 1.0, 2.0, 2.0, 2.0])
        backoff.reset()
        self.assertEqual(backoff.next(), 0.25)
        self.assertEqual(backoff.next(first=0.1), 0.2)  # a server's retry: doubled as well

    def test_hours_of_failures_do_not_overflow(self) -> None:
        backoff = Backoff(0.5, 10.0)
        for _ in range(5000):
            delay = backoff.next()
        self.assertEqual(delay, 10.0)
        with self.assertRaises(ValueError):
            Backoff(-1, 1)


# The SSE client on loopback, against a scripted server


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(event_id: int, run: str = "r") -> bytes:
    data = json.dumps(
        {"id": event_id, "type": "metric", "run": run, "name": "x", "step": event_id, "value": 1.0}
    )
    return f"id: {event_id}\nevent: metric\ndata: {data}\n\n".encode()


class ScriptedSSE(Protocol):
    def __init__(self, scripts: list[list[bytes]], requests: list[str]) -> None:
        self.scripts, self.requests, self.buf = scripts, requests, b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head = self.buf.split(b"\r\n\r\n")[0].decode()
        self.buf = b""
        if head.split()[1] == "/api/health":
            body = json.dumps({"status": "ok", "last_id": 0, "epoch": "e1"}).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.transport.loseConnection()
            return
        self.requests.append(head)
        if not self.scripts:
            self.transport.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
            self.transport.loseConnection()
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for piece in self.scripts.pop(0):
            self.transport.write(_chunk(piece))
        self.transport.write(b"0\r\n\r\n")
        self.transport.loseConnection()


class ScriptedServerTests(TestCase):
    """The SSE client over real ``http.client`` connections to a scripted server."""

    timeout = 30

    def test_overflow_reset_chunks_and_dedupe(self) -> Deferred[None]:
        """
        Keepalives and a line split across chunks are read; an overflow
        resumes at once with Last-Event-ID; an id already seen is dropped; a
        reset is handed out and ids follow the new history.
        """
        one, two = _sse(1), _sse(2)
        scripts = [
            [
                b"retry: 50\n\n",
                b": keepalive\n\n",
                one,
                two[:20],
                two[20:],
                b'event: overflow\ndata: {"reason": "slow", "last_id": 2}\n\n',
            ],
            [
                two,
                _sse(3),
                b'event: reset\ndata: {"reason": "gone", "oldest_id": 10}\n\n',
                _sse(10),
                b": keepalive\r\n\r\n",
                _sse(11),
            ],
        ]
        requests: list[str] = []

        async def go() -> None:
            port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
                Factory.forProtocol(lambda: ScriptedSSE(scripts, requests))
            )
            self.addCleanup(port.stopListening)
            states: list[ConnState] = []
            client = SSEClient(
                parse_endpoint(f"127.0.0.1:{port.getHost().port}"),
                runs=["r"],
                on_state=states.append,
            )
            self.addCleanup(client.close)

            def collect() -> list[Event | Reset]:
                got: list[Event | Reset] = []
                for item in client.items():
                    got.append(item)
                    if len(got) == 6:
                        client.close()
                return got

            got = await within(deferToThread(collect), 10, client.close)
            self.assertEqual(
                [i.id if isinstance(i, Event) else ("reset", i.oldest_id) for i in got],
                [1, 2, 3, ("reset", 10), 10, 11],
            )
            self.assertEqual(len(requests), 2)
            self.assertTrue(requests[0].startswith("GET /events?run=r "))
            self.assertNotIn("last-event-id", requests[0].lower())
            self.assertIn("Last-Event-ID: 2", requests[1])
            self.assertEqual(client.retry_s, 0.05)
            self.assertIn("connected", [s.status for s in states])
            self.assertEqual(client.last_id, 11)

        return d(go())
