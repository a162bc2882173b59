"""
PROTOCOL 6, slow clients: a request head, a whole request and an idle
keep-alive connection each have a deadline no byte resets (``web.channel``);
streams are never cut by them; ``100 Continue`` comes only after the token
and the size are checked.

The timers run on the real site over a ``StringTransport`` and a ``Clock``;
a few tests use real loopback sockets where sockets are the point: 200
slowloris connections closed while a normal client is answered, an SSE
stream and a WebSocket outliving every deadline, ``Expect: 100-continue``
as a client sees it.
"""

from __future__ import annotations

import json
from typing import Any

import txaio
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import ANY_PORTS, connect_sse, connect_ws, keepalive_get
from tests.webtools import (
    UPGRADE,
    WS_PORT,
    Connection,
    FakeBackend,
    SSEClient,
    http_request,
    log_event,
    make_site,
)
from trainstream.server import StreamServer

TOKEN = "s3cret-token"
#: The deadlines of the socket-free tests (seconds).
HEADER, REQUEST, IDLE = 10.0, 30.0, 20.0


def answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every complete response in ``raw``: code, headers, body."""
    out = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while raw:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, raw = body + raw[:size], raw[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            body, raw = raw[:length], raw[length:]
        out.append((int(lines[0].split(" ", 2)[1]), headers, body))
    return out


class TimerTestCase(SynchronousTestCase):
    """The real site on a ``Clock``: connections are ``StringTransport`` s."""

    config: dict[str, Any] = {
        "header_timeout": HEADER,
        "request_timeout": REQUEST,
        "idle_timeout": IDLE,
    }

    def setUp(self) -> None:
        self.backend = FakeBackend()
        self.clock = self.backend.clock
        self.site = make_site(self.backend, **self.config)

    def connect(self, role: str = "rest") -> Connection:
        return Connection(self.site, role)

    def trickle(self, connection: Connection, data: bytes, every: float, until: float) -> None:
        """Send ``data`` a byte each ``every`` seconds until ``until`` (clock time)."""
        for byte in data:
            if self.clock.seconds() + every > until or connection.transport.disconnecting:
                return
            self.clock.advance(every)
            connection.send(bytes([byte]))

    def assertTimedOut(self, connection: Connection, message: str) -> None:
        """A 408 JSON answer with ``Connection: close``, last; the connection closing."""
        self.assertTrue(connection.transport.disconnecting)
        code, headers, body = answers(connection.transport.value())[-1]
        self.assertEqual(code, 408)
        self.assertEqual(headers["connection"], "close")
        self.assertIn(message, json.loads(body)["error"])


class HeadDeadlineTests(TimerTestCase):
    def test_slow_head_is_closed_at_the_header_timeout(self) -> None:
        """A byte every half second does not move the deadline (Twisted's idle timer did)."""
        connection = self.connect()
        slow = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        self.trickle(connection, slow, 0.5, HEADER - 0.5)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(connection.transport.value(), b"")
        self.clock.advance(0.5)
        self.assertTimedOut(connection, f"not received within {HEADER:g} s")
        # Whatever comes later is not read.
        connection.send(b"\r\n\r\n")
        self.assertEqual(len(answers(connection.transport.value())), 1)

    def test_silent_connection_is_a_head_not_completing(self) -> None:
        connection = self.connect()
        self.clock.advance(HEADER - 0.01)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.01)
        self.assertTimedOut(connection, "request line and headers")

    def test_head_in_time_is_answered(self) -> None:
        """
        A head that completes just in time is served, and no 408 follows: the
        connection is idle from its answer, and closed idle_timeout later.
        """
        connection = self.connect()
        head = http_request("GET", "/api/health")
        self.trickle(connection, head[:-1], (HEADER - 0.5) / len(head), HEADER - 0.5)
        connection.send(head[-1:])
        self.assertEqual(connection.response().code, 200)
        self.clock.advance(IDLE - 0.01)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.01)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual([a[0] for a in answers(connection.transport.value())], [200])


class BodyDeadlineTests(TimerTestCase):
    def test_slow_body_is_closed_at_the_request_timeout(self) -> None:
        connection = self.connect()
        head = (
            b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        connection.send(head)
        self.clock.advance(HEADER + 1)  # the head is done: its deadline is gone
        self.assertFalse(connection.transport.disconnecting)
        self.trickle(connection, b"[" + b" " * 998, 0.5, REQUEST - 0.5)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.5)
        self.assertTimedOut(connection, f"request not received within {REQUEST:g} s")


class IdleDeadlineTests(TimerTestCase):
    def test_idle_keepalive_is_closed_at_the_idle_timeout(self) -> None:
        """Closed without a second answer: nobody asked anything."""
        connection = self.connect()
        self.assertEqual(connection.request("GET", "/api/health").code, 200)
        self.clock.advance(IDLE - 0.01)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.01)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual([a[0] for a in answers(connection.transport.value())], [200])

    def test_next_head_gets_the_header_timeout_from_its_first_byte(self) -> None:
        connection = self.connect()
        self.assertEqual(connection.request("GET", "/api/health").code, 200)
        self.clock.advance(IDLE - 1)
        connection.send(b"G")  # no longer idle: a head has begun
        self.clock.advance(HEADER - 0.01)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.01)
        self.assertTimedOut(connection, "request line and headers")

    def test_keepalive_requests_in_time_are_all_answered(self) -> None:
        """
        Each request restarts the deadlines: a keep-alive client asking more
        often than idle_timeout is never cut; once it stops, it is.
        """
        connection = self.connect()
        for _ in range(5):
            connection.send(http_request("GET", "/api/health"))
            self.clock.advance(IDLE - 1)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual([a[0] for a in answers(connection.transport.value())], [200] * 5)
        self.clock.advance(1)
        self.assertTrue(connection.transport.disconnecting)

    def test_pipelined_request_gets_a_head_deadline(self) -> None:
        """A second request sent with the first, its head incomplete: 408 at the header timeout."""
        connection = self.connect()
        connection.send(http_request("GET", "/api/health") + b"GET /api/health HTTP/1.1\r\n")
        self.clock.advance(HEADER)
        self.assertTimedOut(connection, "request line and headers")


class StreamsAreNotCutTests(TimerTestCase):
    config = {**TimerTestCase.config, "keepalive": 5.0}

    def test_sse_outlives_every_deadline(self) -> None:
        """An SSE stream with only server writes stays open; an idle connection beside it goes."""
        sse = SSEClient(self.site)
        idle = self.connect()
        self.assertEqual(idle.request("GET", "/api/health").code, 200)
        self.clock.advance(IDLE)
        self.assertTrue(idle.transport.disconnecting)
        for _ in range(60):  # 300 s more: ten times the longest deadline
            self.clock.advance(5.0)
        self.assertFalse(sse.connection.transport.disconnecting)
        self.backend.hub.accept([log_event("r", "still here")])
        self.assertEqual([e["message"] for e in sse.events], ["still here"])
        self.assertNotIn(b"HTTP/1.1 408", sse.connection.transport.value())  # not a "408" in a time

    def test_websocket_outlives_every_deadline(self) -> None:
        self.patch(txaio.config, "loop", self.clock)
        ws = Connection(self.site, "ws", WS_PORT)
        ws.send(http_request("GET", "/ws", UPGRADE))
        self.assertEqual(ws.response().code, 101)
        idle = self.connect()
        self.assertEqual(idle.request("GET", "/api/health").code, 200)
        self.clock.advance(max(HEADER, REQUEST, IDLE) + 1)
        self.assertTrue(idle.transport.disconnecting)
        self.assertFalse(ws.transport.disconnecting)
        self.assertNotIn(b"HTTP/1.1 408", ws.transport.value())


class ContinueTests(TimerTestCase):
    config = {**TimerTestCase.config, "token": TOKEN}

    def expect(self, path: str, length: int, **headers: str) -> Connection:
        connection = self.connect()
        connection.send(
            http_request(
                "POST",
                path,
                {
                    "Content-Type": "application/json",
                    "Content-Length": str(length),
                    "Expect": "100-continue",
                    **headers,
                },
            )
        )
        return connection

    def assertRefusedUnread(self, connection: Connection, code: int, message: str) -> None:
        raw = connection.transport.value()
        self.assertNotIn(b"100 Continue", raw)
        [(got, headers, body)] = answers(raw)
        self.assertEqual(got, code)
        self.assertEqual(headers["connection"], "close")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertIn(message, json.loads(body)["error"])
        self.assertTrue(connection.transport.disconnecting)
        # The body is never read (and never answered).
        connection.send(b"[" + b" " * 100_000)
        self.assertEqual(connection.transport.value(), raw)
        self.assertEqual(self.backend.hub.last_id, 0)

    def test_wrong_token_is_401_before_any_100(self) -> None:
        connection = self.expect("/api/events", 10_000, Authorization="Bearer nope")
        self.assertRefusedUnread(connection, 401, "missing or wrong token")
        self.assertContinued("/api/events", Authorization=f"Bearer {TOKEN}")

    def test_query_token_is_checked_before_any_100(self) -> None:
        """``?token=`` is checked too: the request has its args before its body."""
        connection = self.expect("/api/events?token=nope", 10)
        self.assertRefusedUnread(connection, 401, "missing or wrong token")
        self.assertContinued(f"/api/events?token={TOKEN}")

    def test_oversized_length_is_413_before_any_100(self) -> None:
        connection = self.expect("/api/events", 20_000_000, Authorization=f"Bearer {TOKEN}")
        self.assertRefusedUnread(connection, 413, "over the limit")

    def assertContinued(self, path: str, **headers: str) -> None:
        """A good request gets ``100 Continue``, then, once its body is in, its 200."""
        body = json.dumps([log_event("r")]).encode()
        connection = self.expect(path, len(body), **headers)
        self.assertEqual(connection.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        connection.send(body)
        raw = connection.transport.value()
        interim, _, final = raw.partition(b"\r\n\r\n")
        self.assertEqual(interim, b"HTTP/1.1 100 Continue")
        self.assertEqual(int(final.split(b" ", 2)[1]), 200, final)
        self.assertFalse(connection.transport.disconnecting)


# Real loopback sockets


def _within(seconds: float, d: Deferred[Any], what: str) -> Deferred[Any]:
    """``d``, or a failure naming ``what`` if it has not fired within ``seconds``."""
    out: Deferred[Any] = Deferred()

    def late() -> None:
        if not out.called:
            out.errback(Failure(AssertionError(f"{what}: not within {seconds} s")))

    call = reactor.callLater(seconds, late)

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        if not out.called:
            out.callback(result)
        return None

    d.addBoth(done)
    return out


class Slowloris(Protocol):
    """Sends a head that never ends, a byte every ``every`` seconds (at most ``limit``)."""

    def __init__(self, every: float, limit: int = 200) -> None:
        self.every = every
        self.data = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * limit
        self.sent = 0
        self.raw = b""
        self.opened_at = 0.0
        self.lived = -1.0
        self.lost: Deferred[None] = Deferred()
        self._loop = LoopingCall(self._send)

    def connectionMade(self) -> None:
        self.opened_at = reactor.seconds()
        self._loop.start(self.every, now=True)

    def _send(self) -> None:
        if self.sent >= len(self.data):
            self._loop.stop()
            return
        self.transport.write(self.data[self.sent : self.sent + 1])
        self.sent += 1

    def dataReceived(self, data: bytes) -> None:
        self.raw += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._loop.running:
            self._loop.stop()
        self.lived = reactor.seconds() - self.opened_at
        self.lost.callback(None)

    def abort(self) -> None:
        if self.transport is not None and self.lived < 0:
            self.transport.abortConnection()


class ServerTestCase(TestCase):
    config: dict[str, Any] = {
        **ANY_PORTS,
        "header_timeout": 1.0,
        "request_timeout": 2.0,
        "idle_timeout": 1.0,
        "close_timeout": 0.5,
        "keepalive": 0.25,
    }

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(self.config, reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    def port(self, role: str = "rest") -> int:
        url = self.server.urls[role]
        return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    async def open(self, protocol: Protocol) -> None:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port())
        await endpoint.connect(Factory.forProtocol(lambda: protocol))


class SlowlorisTests(ServerTestCase):
    timeout = 60

    def test_slowloris_sockets_are_closed_while_others_are_answered(self) -> Deferred[None]:
        """
        200 connections trickling a head (a byte each 0.2 s) are all closed
        within header_timeout plus the close grace and some slack (they
        lived 60 s and more before), each answered 408; meanwhile a normal
        client is answered every time it asks.
        """
        bound = 1.0 + 0.5 + 2.0

        async def go() -> None:
            slow = [Slowloris(0.2) for _ in range(200)]
            for s in slow:
                self.addCleanup(s.abort)
            await DeferredList([Deferred.fromCoroutine(self.open(s)) for s in slow])
            codes = []
            all_lost = DeferredList([s.lost for s in slow])
            for _ in range(5):
                client = await keepalive_get(self.port(), "/api/health")
                codes.append(int(client.raw.split(b" ", 2)[1]))
                client.transport.loseConnection()
                await client.lost
                await deferLater(reactor, 0.2, lambda: None)
            await _within(bound, all_lost, "200 slowloris connections closed")
            self.assertEqual(codes, [200] * 5)
            lived = sorted(s.lived for s in slow)
            self.assertLess(lived[-1], bound, lived)
            self.assertGreaterEqual(lived[0], 0.9, lived)
            got = [s.raw.split(b"\r\n", 1)[0] for s in slow]
            self.assertEqual(got.count(b"HTTP/1.1 408 Request Timeout"), 200, set(got))
            print(f"\n200 slowloris sockets lived {lived[0]:.2f}-{lived[-1]:.2f} s")

        return Deferred.fromCoroutine(go())


class StreamsOnSocketsTests(ServerTestCase):
    timeout = 30

    def test_streams_stay_open_past_every_deadline(self) -> Deferred[None]:
        """
        An SSE stream and a WebSocket live on past three times every
        deadline, while an idle keep-alive connection opened with them is closed.
        """

        async def go() -> None:
            sse = await connect_sse(self.server.urls["sse"])
            ws = await connect_ws(self.server.urls["ws"])
            idle = await keepalive_get(self.port(), "/api/health")
            await _within(1.0 + 0.5 + 1.5, idle.lost, "idle keep-alive connection closed")
            seen = len(sse.raw)
            await deferLater(reactor, 6.0, lambda: None)  # 3 x request_timeout
            self.assertFalse(sse.lost.called)
            self.assertFalse(ws.lost.called)
            self.assertGreater(len(sse.raw), seen)  # keepalives kept coming
            ws.send_json({"op": "ping", "nonce": "late"})
            await _within(2.0, ws.wait_for("pong", 1), "WebSocket pong")
            await self.server.stop()  # ends both politely
            await sse.lost
            self.assertTrue(sse.finished_cleanly)
            await ws.closed
            await ws.lost

        return Deferred.fromCoroutine(go())


class RawClient(Protocol):
    """Sends ``head``; sends ``body`` once it reads ``100 Continue``; collects."""

    def __init__(self, head: bytes, body: bytes = b"") -> None:
        self.head = head
        self.body = body
        self.raw = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if self.raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n") and self.body:
            self.transport.write(self.body)
            self.body = b""
        rest = self.raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
        if answers(rest) and len(answers(rest)[0][2]) >= int(
            answers(rest)[0][1].get("content-length", "0")
        ):
            self.transport.loseConnection()  # answered: the client closes

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback(None)


class ContinueOnSocketsTests(ServerTestCase):
    config = {**ServerTestCase.config, "token": TOKEN}
    timeout = 20

    async def post(self, length: int, token: str, body: bytes = b"") -> bytes:
        head = (
            f"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        client = RawClient(head, body)
        await self.open(client)
        await _within(5.0, client.lost, "answer and close")
        return client.raw

    def test_refused_before_100_and_good_after(self) -> Deferred[None]:
        async def go() -> None:
            for token, length, code in ((f"{TOKEN}x", 10_000, 401), (TOKEN, 20_000_000, 413)):
                raw = await self.post(length, token, b"x" * 65536)
                self.assertFalse(raw.startswith(b"HTTP/1.1 100"), raw[:200])
                [(got, headers, body)] = answers(raw)
                self.assertEqual(got, code)
                self.assertEqual(headers["connection"], "close")
                self.assertIn("error", json.loads(body))
            body = json.dumps([log_event("r")]).encode()
            raw = await self.post(len(body), TOKEN, body)
            self.assertTrue(raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), raw[:200])
            [(got, _, answer)] = answers(raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
            self.assertEqual(got, 200, answer)
            self.assertEqual(json.loads(answer)["accepted"], 1)

        return Deferred.fromCoroutine(go())
