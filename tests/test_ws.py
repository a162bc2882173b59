"""
WebSocket sessions (PROTOCOL section 5) through Autobahn's memory agent:
the site's own ``StreamFactory`` on a small backend, a ``Clock`` for every
timer, no sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.webtools import (
    ControlledStore,
    FakeBackend,
    MemoryWS,
    ids,
    log_event,
    metric,
    ws_factory,
)
from trainstream._version import __version__ as trainstream_version
from trainstream.events import EventError, decode_body


class WSTestCase(SynchronousTestCase):
    max_history = 100_000
    config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.backend = FakeBackend(store=self.make_store())
        self.hub = self.backend.hub
        self.clock = self.backend.clock
        self.factory = ws_factory(self.backend, **self.config)

    def make_store(self) -> Any:
        return None

    def connect(self) -> MemoryWS:
        return MemoryWS(self, self.factory, self.clock)


class SessionTests(WSTestCase):
    def test_hello(self) -> None:
        self.hub.accept([metric("r", 1)])
        ws = self.connect()
        hello = ws.client.messages[0]
        self.assertEqual((hello["op"], hello["last_id"]), ("hello", 1))
        self.assertEqual(hello["version"], trainstream_version)
        self.assertEqual(self.backend.clients.counts()["ws"], 1)

    def test_ping(self) -> None:
        ws = self.connect()
        ws.send({"op": "ping", "nonce": "n1"})
        self.assertEqual(ws.last("pong"), {"op": "pong", "nonce": "n1"})

    def test_subscribe_then_live_events(self) -> None:
        ws = self.connect()
        ws.send({"op": "subscribe", "runs": ["*"]})
        _, first, last = self.hub.accept([metric("r1", s, s / 10) for s in range(5)])
        ws.flush()
        self.assertEqual(ids(ws.client.events), list(range(first, last + 1)))
        self.assertEqual([e["step"] for e in ws.client.events], [0, 1, 2, 3, 4])
        ws.send({"op": "unsubscribe"})
        self.hub.accept([metric("r1", 9)])
        ws.flush()
        self.assertEqual(len(ws.client.events), 5)
        self.assertEqual(self.hub.subscriber_count, 0)

    def test_a_batch_is_framed_once_for_every_client(self) -> None:
        """One frame's bytes for all: Autobahn's own framing of the message, made once."""
        sessions = [self.connect() for _ in range(5)]
        for ws in sessions:
            ws.send({"op": "subscribe", "runs": ["*"]})
        framed: list[bytes] = []
        events_frame = self.factory.events_frame

        def counting(records: Any, coalesced: Any) -> bytes:
            framed.append(events_frame(records, coalesced))
            return framed[-1]

        self.factory.events_frame = counting  # type: ignore[method-assign]
        self.hub.accept([metric("r1", s, s / 10) for s in range(3)])
        for ws in sessions:
            ws.flush()
        self.assertEqual(len(framed), 1)
        message = self.factory.prepareMessage(  # type: ignore[no-untyped-call]
            b'{"op":"events","events":['
            + b",".join(r.json.encode() for r in self.hub.store.after(0, lambda r: True))
            + b"]}"
        )
        self.assertEqual(framed[0], message.payloadHybi)
        for ws in sessions:
            self.assertEqual([e["step"] for e in ws.client.events], [0, 1, 2])

    def test_filters(self) -> None:
        ws = self.connect()
        ws.send({"op": "subscribe", "runs": ["keep*"], "types": ["metric"]})
        self.hub.accept([metric("drop", 1), log_event("keep-1"), metric("keep-1", 2)])
        ws.flush()
        self.assertEqual([(e["run"], e["step"]) for e in ws.client.events], [("keep-1", 2)])

    def test_nan_round_trips(self) -> None:
        ws = self.connect()
        ws.send({"op": "subscribe"})
        ws.send({"op": "publish", "events": [metric("n", 1, "NaN"), metric("n", 2, "-Infinity")]})
        metrics = [e for e in ws.client.events if e["type"] == "metric"]
        self.assertEqual([e["value"] for e in metrics], ["NaN", "-Infinity"])
        alerts = [e for e in ws.client.events if e["type"] == "alert"]
        self.assertEqual([e["kind"] for e in alerts], ["nan"])

    def test_close_sends_1001(self) -> None:
        ws = self.connect()
        ws.send({"op": "subscribe"})
        self.backend.clients.close_all("server stopping")
        ws.flush()
        self.assertEqual(ws.client.close_code, 1001)
        self.assertEqual(self.hub.subscriber_count, 0)
        self.assertEqual(self.backend.clients.counts()["ws"], 0)

    def test_max_rate(self) -> None:
        """At most ``max_rate`` events frames a second; each holds all since the last."""
        ws = self.connect()
        ws.send({"op": "subscribe", "max_rate": 2})
        self.hub.accept([metric("r", 1)])
        self.hub.accept([metric("r", 2)])
        self.hub.accept([metric("r", 3)])
        ws.flush()
        self.assertEqual([ids(m["events"]) for m in ws.client.ops("events")], [[1]])
        self.clock.advance(0.5)
        ws.flush()
        self.assertEqual([ids(m["events"]) for m in ws.client.ops("events")], [[1], [2, 3]])


class PublishTests(WSTestCase):
    def test_publish_ack(self) -> None:
        ws = self.connect()
        ws.send({"op": "publish", "events": [metric("w", 1), metric("w", 2)]})
        ack = ws.last("ack")
        self.assertEqual(ack, {"op": "ack", "accepted": 2, "first_id": 1, "last_id": 2})
        stored = self.backend.store.after(0, lambda r: True)
        self.assertEqual(ids([r.event | {"id": r.id} for r in stored]), [1, 2])

    def test_bad_batch_stores_nothing(self) -> None:
        ws = self.connect()
        batch = [metric("r", 1), {"type": "metric", "run": "r", "name": "x", "step": -1}]
        ws.send({"op": "publish", "events": batch})
        error = ws.last("error")
        self.assertEqual(error["index"], 1)
        self.assertIn("step", error["error"])
        self.assertEqual(self.hub.last_id, 0)
        ws.send({"op": "ping", "nonce": "still open"})
        self.assertEqual(ws.last("pong")["nonce"], "still open")

    def test_same_decoder_as_rest(self) -> None:
        """
        What REST refuses in a body, a WebSocket message is refused for with
        the same words: duplicate keys (however spaced), NaN literals.
        """
        ws = self.connect()
        event = '{"type":"log","run":"a","level":"info","message":"m"%s}'
        for extra in (',"run":"b"', ',"run" :"b"', ',"run"\n:"b"', ',"level":NaN'):
            text = event % extra
            ws.send_raw(('{"op":"publish","events":[' + text + "]}").encode())
            with self.assertRaises(EventError) as rest:
                decode_body(f"[{text}]".encode(), "application/json")
            error = ws.last("error")["error"]
            self.assertTrue(error.startswith("message is not valid JSON: "), error)
            self.assertEqual(error, "message " + rest.exception.detail)
            self.assertEqual(rest.exception.message, "body " + rest.exception.detail)
        self.assertEqual(self.hub.last_id, 0)

    def test_malformed_messages(self) -> None:
        ws = self.connect()
        for payload, words in [
            (b"{", "message is not valid JSON: Expecting property name"),
            (b"[1]", 'a message must be a JSON object with an "op"'),
            (b'{"op": "dance"}', "unknown op 'dance'"),
            (b'{"op": "subscribe", "run": ["a"]}', "subscribe: unknown field 'run'"),
            (b'{"op": "subscribe", "after": -1}', '"after" must be an event id >= 0'),
            (b'{"op": "subscribe", "after": true}', '"after" must be an event id >= 0'),
            (b'{"op": "subscribe", "max_rate": 0}', '"max_rate" must be a number'),
            (b'{"op": "subscribe", "types": ["bogus"]}', "subscribe: unknown event type"),
            (b'{"op": "subscribe", "runs": "a"}', "subscribe: 'runs' must be a list of strings"),
            (b'{"op": "publish", "events": {}}', "events must be a JSON array"),
        ]:
            ws.send_raw(payload)
            self.assertIn(words, ws.last("error")["error"], payload)
        ws.send_raw(b'{"op": "ping"}', binary=True)
        self.assertIn("binary frames", ws.last("error")["error"])
        self.assertEqual(self.hub.subscriber_count, 0)


class CommitTests(WSTestCase):
    """An ack means stored: on a history whose commit the test controls."""

    def make_store(self) -> ControlledStore:
        return ControlledStore()

    def test_ack_only_after_commit(self) -> None:
        ws = self.connect()
        ws.send({"op": "publish", "events": [metric("w", 1)]})
        self.assertEqual(self.hub.last_id, 1)  # accepted
        self.assertEqual(ws.client.ops("ack"), [])  # not yet committed: no ack
        self.backend.store.commit()
        ws.flush()
        self.assertEqual(ws.last("ack")["last_id"], 1)

    def test_no_ack_after_close(self) -> None:
        ws = self.connect()
        ws.send({"op": "publish", "events": [metric("w", 1)]})
        self.backend.clients.close_all("server stopping")
        ws.flush()
        self.backend.store.commit()
        ws.flush()
        self.assertEqual(ws.client.ops("ack"), [])


class ResumeTests(WSTestCase):
    def make_store(self) -> Any:
        from trainstream.store.memory import MemoryStore

        return MemoryStore(5)

    def test_resume_after(self) -> None:
        self.hub.accept([metric("a", s) for s in range(4)])
        ws = self.connect()
        ws.send({"op": "subscribe", "after": 1})
        self.hub.accept([metric("a", 10)])
        ws.flush()
        self.assertEqual(ids(ws.client.events), [2, 3, 4, 5])
        self.assertEqual(ws.client.ops("reset"), [])

    def test_reset_boundary(self) -> None:
        """Holding 6..10: ``after`` 5 (oldest - 1) is complete, ``after`` 4 (oldest - 2) is not."""
        self.hub.accept([metric("a", s) for s in range(10)])
        self.assertEqual(self.backend.store.oldest_id, 6)
        complete = self.connect()
        complete.send({"op": "subscribe", "after": 5})
        self.assertEqual(complete.client.ops("reset"), [])
        self.assertEqual(ids(complete.client.events), [6, 7, 8, 9, 10])
        gap = self.connect()
        gap.send({"op": "subscribe", "after": 4})
        self.assertEqual(
            gap.client.ops("reset"),
            [
                {
                    "op": "reset",
                    "reason": "history no longer holds the events after that id",
                    "oldest_id": 6,
                }
            ],
        )
        ops = [m["op"] for m in gap.client.messages]
        self.assertLess(ops.index("reset"), ops.index("events"))
        self.assertEqual(ids(gap.client.events), [6, 7, 8, 9, 10])


class FlowTests(WSTestCase):
    config = {"client_buffer": 4096}

    def pausable(self, ws: MemoryWS) -> list[bytes]:
        """
        Make the session's transport stop reading while paused, as a TCP
        transport does; what arrives meanwhile is delivered on resume.
        """
        transport: Any = ws.session.transport
        held: list[bytes] = []
        deliver = transport.bufferReceived
        state = {"reading": True}

        def pause() -> None:
            state["reading"] = False

        def resume() -> None:
            state["reading"] = True
            while held:
                deliver(held.pop(0))

        def received(data: bytes) -> None:
            if state["reading"]:
                deliver(data)
            else:
                held.append(data)

        transport.pauseProducing = pause
        transport.resumeProducing = resume
        transport.bufferReceived = received
        return held

    def test_paused_session_reads_nothing(self) -> None:
        """
        While the client's socket is full the session neither writes events
        nor reads requests, so pings and publishes cannot pile up answers.
        """
        ws = self.connect()
        held = self.pausable(ws)
        ws.send({"op": "subscribe"})
        flow = ws.session.transport.producer
        flow.pauseProducing()  # what the transport does when its buffer is full
        self.hub.accept([metric("r", 1)])
        ws.send({"op": "ping", "nonce": "p"})
        ws.send({"op": "publish", "events": [metric("r", 2)]})
        self.assertTrue(held)
        self.assertEqual(ws.client.ops("pong"), [])
        self.assertEqual(ws.client.events, [])
        self.assertEqual(self.hub.last_id, 1)
        flow.resumeProducing()
        ws.flush()
        self.assertEqual(ws.last("pong")["nonce"], "p")
        self.assertEqual(ws.last("ack")["last_id"], 2)
        self.assertEqual(ids(ws.client.events), [1, 2])

    def test_overflow_closes_1013_with_the_id_to_resume_after(self) -> None:
        ws = self.connect()
        ws.send({"op": "subscribe"})
        self.hub.accept([log_event("r", "first")])
        ws.flush()
        ws.session.transport.producer.pauseProducing()
        self.hub.accept([log_event("r", "x" * 200) for _ in range(40)])
        ws.session.transport.producer.resumeProducing()
        ws.flush()
        error = ws.last("error")
        self.assertEqual(error["last_id"], 1)
        self.assertIn("too slow", error["error"])
        self.assertEqual(ws.client.close_code, 1013)
        self.assertEqual(ids(ws.client.events), [1])
        self.assertEqual(self.hub.overflows, 1)
        self.assertEqual(self.hub.subscriber_count, 0)
