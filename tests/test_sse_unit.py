"""
``GET /events`` deterministically: the real ``Site`` of a small backend over
a ``StringTransport`` and a ``MemoryReactorClock``; framing, timers, resume
and its reset boundary, filters, flow control and closing.
"""

from __future__ import annotations

import txaio
from twisted.trial.unittest import SynchronousTestCase

from tests.webtools import (
    Connection,
    FakeBackend,
    SSEClient,
    ids,
    log_event,
    make_site,
    metric,
)


class SSETestCase(SynchronousTestCase):
    max_history = 100_000

    def setUp(self) -> None:
        self.backend = FakeBackend(max_history=self.max_history)
        self.clock = self.backend.clock
        self.site = make_site(self.backend, keepalive=15.0, retry_ms=2500)
        self.hub = self.backend.hub


class SSEFramingTests(SSETestCase):
    def test_retry_first_then_keepalive(self) -> None:
        """The first bytes are retry:, and a keepalive comment comes every 15 s."""
        sse = SSEClient(self.site)
        response = sse.response
        self.assertEqual(response.header("content-type"), "text/event-stream; charset=utf-8")
        self.assertEqual(response.header("cache-control"), "no-cache")
        raw = sse.connection.transport.value().split(b"\r\n\r\n", 1)[1]
        self.assertTrue(raw.startswith(b"d\r\nretry: 2500\n\n\r\n"), raw)
        self.assertNotIn(b"keepalive", response.body)
        self.clock.advance(14.9)
        self.assertNotIn(b"keepalive", sse.response.body)
        self.clock.advance(0.2)
        self.assertEqual(sse.response.body.count(b": keepalive\n\n"), 1)
        self.clock.advance(15)
        self.assertEqual(sse.response.body.count(b": keepalive\n\n"), 2)

    def test_event_framing(self) -> None:
        sse = SSEClient(self.site)
        self.hub.accept(
            [{"type": "metric", "run": "r", "name": "loss", "step": 3, "value": "NaN", "time": 1.5}]
        )
        self.assertIn(
            b'id: 1\nevent: metric\ndata: {"id":1,"type":"metric","run":"r","time":1.5,'
            b'"name":"loss","step":3,"value":"NaN"}\n\n',
            sse.response.body,
        )

    def test_each_event_once_in_order(self) -> None:
        sse = SSEClient(self.site)
        _, first, last = self.hub.accept([metric("r1", s, s / 10) for s in range(5)])
        self.assertEqual(ids(sse.events), list(range(first, last + 1)))
        self.assertEqual([e["step"] for e in sse.events], [0, 1, 2, 3, 4])

    def test_client_gone_stops_timers(self) -> None:
        """A client that disconnects leaves no subscription and no timer behind."""
        sse = SSEClient(self.site)
        self.assertEqual(self.backend.clients.counts()["sse"], 1)
        self.assertTrue(any("_ping" in repr(c.func) for c in self.clock.getDelayedCalls()))
        sse.connection.close()
        self.assertEqual(self.backend.clients.counts()["sse"], 0)
        self.assertEqual(self.hub.subscriber_count, 0)
        keepalives = [c for c in self.clock.getDelayedCalls() if "_ping" in repr(c.func)]
        self.assertEqual(keepalives, [])

    def test_close_finishes_the_response(self) -> None:
        """A server stopping ends the stream with its last chunk; the client may resume."""
        sse = SSEClient(self.site)
        self.hub.accept([metric("r", 1)])
        self.backend.clients.close_all("server stopping")
        self.assertTrue(sse.response.complete)
        self.assertEqual(ids(sse.events), [1])
        self.assertEqual(self.hub.subscriber_count, 0)

    def test_bad_last_event_id(self) -> None:
        sse = SSEClient(self.site, **{"Last-Event-ID": "yesterday"})
        self.assertEqual(sse.response.code, 400)
        self.assertIn(b"Last-Event-ID must be an integer event id", sse.response.body)
        sse = SSEClient(self.site, "/events?last_event_id=-3")
        self.assertEqual(sse.response.code, 400)
        self.assertEqual(sse.response.json()["parameter"], "last_event_id")

    def test_unknown_type_filter(self) -> None:
        sse = SSEClient(self.site, "/events?type=metric,bogus")
        self.assertEqual(sse.response.code, 400)
        self.assertIn(b"unknown event type 'bogus'", sse.response.body)
        self.assertEqual(self.hub.subscriber_count, 0)

    def test_filters(self) -> None:
        sse = SSEClient(self.site, "/events?run=keep*&type=metric")
        self.hub.accept([metric("drop", 1), log_event("keep-1"), metric("keep-1", 2)])
        self.assertEqual([(e["run"], e["step"]) for e in sse.events], [("keep-1", 2)])


class ResumeTests(SSETestCase):
    max_history = 10

    def test_resume_with_last_event_id(self) -> None:
        """A client holding an id gets the stored events after it, then live ones."""
        self.hub.accept([metric("a", s) for s in range(4)])
        sse = SSEClient(self.site, **{"Last-Event-ID": "1"})
        by_param = SSEClient(self.site, "/events?last_event_id=1")
        self.hub.accept([metric("a", 10)])
        for client in (sse, by_param):
            self.assertEqual(ids(client.events), [2, 3, 4, 5])
            self.assertEqual(client.notices("reset"), [])

    def test_reset_boundary(self) -> None:
        """
        The history holds ids 11..20: a client that saw 10 (``oldest_id - 1``)
        missed nothing and gets no reset; one that saw 9 missed id 10 and is
        told so before it gets what is left.
        """
        self.hub.accept([metric("a", s) for s in range(20)])
        self.assertEqual(self.backend.store.oldest_id, 11)
        complete = SSEClient(self.site, **{"Last-Event-ID": "10"})
        self.assertEqual(complete.notices("reset"), [])
        self.assertEqual(ids(complete.events), list(range(11, 21)))
        gap = SSEClient(self.site, **{"Last-Event-ID": "9"})
        self.assertEqual(
            gap.notices("reset"),
            [{"reason": "history no longer holds the events after that id", "oldest_id": 11}],
        )
        self.assertEqual(ids(gap.events), list(range(11, 21)))
        blocks = [b.get("event") for b in gap.blocks if "event" in b]
        self.assertEqual(blocks[0], "reset")  # before any event

    def trimmed_during_replay(self, published_meanwhile: int) -> SSEClient:
        """
        A client replays ids 1..10 (of a history of 10 events) into a socket
        that fills after the first chunk (ids 1 and 2); meanwhile
        ``published_meanwhile`` events push the oldest out; then it reads.
        """
        self.hub.accept([log_event("r", f"{i}" + "x" * 40_000) for i in range(10)])
        self.assertEqual(self.backend.store.oldest_id, 1)
        sse = SSEClient(self.site, capacity=1000, **{"Last-Event-ID": "0"})
        self.assertEqual(ids(sse.events), [1, 2])
        self.assertTrue(sse.connection.transport.full)
        self.hub.accept([log_event("r", "late")] * published_meanwhile)
        sse.connection.transport.read_all()
        return sse

    def test_trimmed_to_the_next_id_during_replay(self) -> None:
        """Trimmed to 3.. while the client (which saw 2) was full: nothing is missing."""
        whole = self.trimmed_during_replay(2)
        self.assertEqual(whole.notices("reset"), [])
        self.assertEqual(ids(whole.events), list(range(1, 13)))

    def test_trimmed_past_it_during_replay(self) -> None:
        """
        Trimmed to 4.. while the client (which saw 2) was full: id 3 was
        read for it already (a replay keeps what the socket did not take,
        it never reads it again), so nothing is missing and no reset is due.
        A trim past what was read is a reset: tests/test_async_reads.py.
        """
        whole = self.trimmed_during_replay(3)
        self.assertEqual(whole.notices("reset"), [])
        self.assertEqual(ids(whole.events), list(range(1, 14)))

    def test_id_from_another_history(self) -> None:
        self.hub.accept([metric("a", 1)])
        sse = SSEClient(self.site, **{"Last-Event-ID": "99"})
        self.assertEqual(
            sse.notices("reset"),
            [{"reason": "that id is newer than this server's history", "oldest_id": 1}],
        )
        self.assertEqual(ids(sse.events), [1])


class FlowTests(SSETestCase):
    def test_paused_transport_holds_events(self) -> None:
        """While the socket is full nothing is written; on resume all of it, in order."""
        sse = SSEClient(self.site)
        producer = sse.connection.transport.producer
        producer.pauseProducing()
        self.hub.accept([metric("r", 1), metric("r", 2)])
        self.assertEqual(sse.events, [])
        self.clock.advance(20)  # no keepalive into a full socket either
        self.assertNotIn(b"keepalive", sse.response.body)
        producer.resumeProducing()
        self.assertEqual(ids(sse.events), [1, 2])

    def test_overflow_closes_with_the_id_to_resume_after(self) -> None:
        """Past its buffer, a paused client is told why and where to resume, then closed."""
        site = make_site(self.backend, client_buffer=4096)
        sse = SSEClient(site)
        self.hub.accept([log_event("r", "first")])
        sse.connection.transport.producer.pauseProducing()
        self.hub.accept([log_event("r", "x" * 200) for _ in range(40)])
        notices = sse.notices("overflow")
        self.assertEqual(len(notices), 1)
        self.assertEqual(notices[0]["last_id"], 1)
        self.assertIn("resume", notices[0]["reason"])
        self.assertEqual(ids(sse.events), [1])
        self.assertTrue(sse.response.complete)
        self.assertEqual(self.hub.subscriber_count, 0)
        self.assertEqual(self.hub.overflows, 1)


class RootTests(SSETestCase):
    def test_seed_roots(self) -> None:
        """
        Seed clients: SSE at / of the SSE listener (when it accepts
        text/event-stream); / elsewhere, or without that, is the page.
        """
        sse_root = SSEClient(self.site, "/")
        self.hub.accept([metric("seed", 1)])
        self.assertEqual(ids(sse_root.events), [1])
        for role in ("rest", "ws"):
            page = Connection(self.site, role).request("GET", "/", {"Accept": "text/event-stream"})
            self.assertIn("text/html", page.header("content-type") or "", role)
        plain = Connection(self.site, "sse").request("GET", "/")
        self.assertIn("text/html", plain.header("content-type") or "")
        single = Connection(self.site, "listen").request(
            "GET", "/", {"Accept": "text/event-stream"}
        )
        self.assertEqual(single.header("content-type"), "text/event-stream; charset=utf-8")

    def test_websocket_at_the_root(self) -> None:
        """A WebSocket upgrade at / of the WebSocket listener (or the only one) is a session."""
        self.patch(txaio.config, "loop", self.clock)
        upgrade = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        for role, code in (("ws", 101), ("listen", 101), ("rest", 200), ("sse", 200)):
            answer = Connection(self.site, role).request("GET", "/", upgrade)
            self.assertEqual(answer.code, code, role)
        self.assertEqual(self.backend.clients.counts()["ws"], 2)

    def test_unknown_page(self) -> None:
        answer = Connection(self.site).request("GET", "/nope")
        self.assertEqual(answer.code, 404)
        self.assertNotIn(b"Traceback", answer.body)
