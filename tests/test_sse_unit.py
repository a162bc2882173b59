"""
The SSE stream's framing and timers, deterministically: a real ``Site`` over a
``StringTransport`` and a ``MemoryReactorClock``.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from trainstream.service import StreamServer


class SSEFramingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.server = StreamServer(
            {"memory": True, "keepalive": 15.0, "retry_ms": 2500}, self.clock
        )
        self.transport = StringTransport()
        self.channel = self.server.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def request(self, path: bytes, *headers: bytes) -> None:
        lines = [b"GET " + path + b" HTTP/1.1", b"Host: example", *headers]
        self.channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")

    def body(self) -> bytes:
        return self.transport.value().split(b"\r\n\r\n", 1)[1]

    def test_retry_first_then_keepalive(self) -> None:
        """The first bytes are retry:, and a keepalive comment comes every 15 s."""
        self.request(b"/events")
        head = self.transport.value().split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"Content-Type: text/event-stream", head)
        self.assertTrue(self.body().startswith(b"d\r\nretry: 2500\n\n\r\n"), self.body())
        self.assertNotIn(b"keepalive", self.body())
        self.clock.advance(14.9)
        self.assertNotIn(b"keepalive", self.body())
        self.clock.advance(0.2)
        self.assertEqual(self.body().count(b": keepalive\n\n"), 1)
        self.clock.advance(15)
        self.assertEqual(self.body().count(b": keepalive\n\n"), 2)

    def test_event_framing(self) -> None:
        self.request(b"/events")
        self.server.hub.accept(
            [{"type": "metric", "run": "r", "name": "loss", "step": 3, "value": "NaN", "time": 1.5}]
        )
        self.assertIn(
            b'id: 1\nevent: metric\ndata: {"id":1,"type":"metric","run":"r","time":1.5,'
            b'"name":"loss","step":3,"value":"NaN"}\n\n',
            self.body(),
        )

    def test_client_gone_stops_timers(self) -> None:
        """A client that disconnects leaves no subscription and no timer behind."""
        self.request(b"/events")
        self.assertEqual(self.server.clients.counts()["sse"], 1)
        self.assertEqual(len(self.clock.getDelayedCalls()) > 0, True)
        self.channel.connectionLost(Exception("gone"))
        self.assertEqual(self.server.clients.counts()["sse"], 0)
        self.assertEqual(self.server.hub.subscriber_count, 0)
        keepalives = [c for c in self.clock.getDelayedCalls() if "_ping" in repr(c.func)]
        self.assertEqual(keepalives, [])

    def test_bad_last_event_id(self) -> None:
        self.request(b"/events", b"Last-Event-ID: yesterday")
        self.assertIn(b"400", self.transport.value().split(b"\r\n", 1)[0])
        self.assertIn(b"Last-Event-ID must be an integer event id", self.body())

    def test_unknown_type_filter(self) -> None:
        self.request(b"/events?type=metric,bogus")
        self.assertIn(b"unknown event type 'bogus'", self.body())
