"""
WebSocket security (PROTOCOL 5 and 6): the close codes a client is told
(1009 for a message over the limit, 1007 for a text frame that is not
UTF-8), error texts that never show Python, and read-only tokens.

In memory (Autobahn's memory agent on the site's own ``StreamFactory``)
where no socket is needed; on real loopback servers where what matters is
what crosses TCP: the close frame with its code, answered (a clean close
handshake), where the old code aborted the connection. What ends the TCP
connection after the handshake is the listener's business (it resets,
leaving no TIME_WAIT on our port: ``trainstream.listeners``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clients import ANY_PORTS, WSClient
from tests.webtools import FakeBackend, MemoryWS, make_site, metric
from trainstream.events import MAX_BODY_BYTES, Limits
from trainstream.server import StreamServer
from trainstream.web.access import READ, WRITE
from trainstream.web.ws import READ_ONLY_PUBLISH, StreamFactory

WRITE_TOKEN, READ_TOKEN = "w-secret-1", "r-secret-2"

#: What an error text must never hold: Python's words and reprs.
PYTHON_TEXT = re.compile(
    r"Traceback|sys\.|set_int_max_str_digits|Python|Error\b|object at 0x|<class"
    r"|\bNone\b|\bTrue\b|\bFalse\b|\{'|\['|\[\]|\{\}|not iterable|codec can't"
)


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def site_factory(backend: FakeBackend, **config: Any) -> StreamFactory:
    """The ``StreamFactory`` under ``/ws`` of the real site of ``backend``."""
    ws: Any = make_site(backend, **config).resource.children[b"ws"]
    factory: StreamFactory = getattr(ws, "ws", ws)._factory  # the resource, or its wrapper
    return factory


def assert_clear(testcase: SynchronousTestCase, text: object) -> None:
    testcase.assertIsInstance(text, str)
    assert isinstance(text, str)
    # What the client sent, echoed as a JSON string ("True"), is not Python's text.
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    testcase.assertIsNone(PYTHON_TEXT.search(unquoted), text)
    testcase.assertLess(len(text), 400, text[:400])


class MemoryCase(SynchronousTestCase):
    limits = Limits(max_body_bytes=1024)

    def setUp(self) -> None:
        self.backend = FakeBackend(limits=self.limits)
        self.factory = site_factory(self.backend)
        self.ws = self.connect()

    def connect(self) -> MemoryWS:
        return MemoryWS(self, self.factory, self.backend.clock)

    def still_open(self, ws: MemoryWS) -> None:
        """The session answers a ping: the connection stayed open."""
        nonce = len(ws.client.messages)
        ws.send({"op": "ping", "nonce": nonce})
        self.assertIsNone(ws.client.close_code)
        self.assertEqual(ws.last("pong")["nonce"], nonce)


class CloseCodeTests(MemoryCase):
    """Fails on the old code: Autobahn dropped the connection (the client saw 1006)."""

    def test_oversized_message_closes_1009(self) -> None:
        self.ws.send({"op": "ping", "nonce": "x" * 2000})
        self.assertEqual(self.ws.client.close_code, 1009)
        reason = self.ws.client.close_reason or ""
        self.assertIn("over the limit of 1024 bytes", reason)
        self.assertEqual(self.ws.client.ops("pong"), [])
        # Another client is served as before.
        other = self.connect()
        other.send({"op": "publish", "events": [metric("r", 1)]})
        self.assertEqual(other.last("ack")["accepted"], 1)

    def test_message_at_the_limit_is_served(self) -> None:
        text = json.dumps({"op": "ping", "nonce": ""})
        nonce = "x" * (1024 - len(text))
        self.ws.send({"op": "ping", "nonce": nonce})
        self.assertEqual(self.ws.last("pong")["nonce"], nonce)
        self.assertIsNone(self.ws.client.close_code)

    def test_invalid_utf8_closes_1007(self) -> None:
        self.ws.send_raw(b'{"op": "ping", "nonce": "\xff"}')
        self.assertEqual(self.ws.client.close_code, 1007)
        self.assertIn("invalid UTF-8", self.ws.client.close_reason or "")
        self.assertEqual(self.ws.client.ops("pong"), [])


def odd_values() -> list[tuple[str, str]]:
    """JSON texts of values no field wants, each with a name for the failure message."""
    return [
        ("4299 digits", "9" * 4299),
        ("4300 digits", "9" * 4300),
        ("-4300 digits", "-" + "9" * 4300),
        ("4301 digits", "9" * 4301),
        ("1e400", "1e400"),
        ("-1e400", "-1e400"),
        ("5e-324", "5e-324"),
        ("1.5", "1.5"),
        ("-1", "-1"),
        ("true", "true"),
        ("null in a list", "[null]"),
        ("empty object", "{}"),
        ("object", '{"a": [1, {"b": true}]}'),
        ("empty array", "[]"),
        ("array of numbers", "[1, 2]"),
        ("long string", json.dumps("s" * 5000)),
        ("lone surrogate", '"\\ud800"'),
        ("nested 500", "[" * 500 + "]" * 500),
        ("nested 5000", "[" * 5000 + "]" * 5000),
        ("objects nested 900", '{"a":' * 900 + "1" + "}" * 900),
    ]


#: Every field of every op, as a message with ``%s`` for the value.
FIELD_MESSAGES = [
    ("subscribe after", '{"op": "subscribe", "after": %s}'),
    ("subscribe max_rate", '{"op": "subscribe", "max_rate": %s}'),
    ("subscribe runs", '{"op": "subscribe", "runs": %s}'),
    ("subscribe names", '{"op": "subscribe", "names": %s}'),
    ("subscribe types", '{"op": "subscribe", "types": %s}'),
    ("subscribe runs item", '{"op": "subscribe", "runs": ["a", %s]}'),
    ("subscribe an unknown field", '{"op": "subscribe", "x": %s}'),
    ("publish events", '{"op": "publish", "events": %s}'),
    ("publish event", '{"op": "publish", "events": [%s]}'),
    (
        "publish step",
        '{"op": "publish", "events": [{"type": "metric", "run": "r", '
        '"name": "n", "value": 1, "step": %s}]}',
    ),
    (
        "publish time",
        '{"op": "publish", "events": [{"type": "log", "run": "r", '
        '"level": "info", "message": "m", "time": %s}]}',
    ),
    (
        "publish params",
        '{"op": "publish", "events": [{"type": "hparams", "run": "r", "params": {"lr": %s}}]}',
    ),
    ("ping nonce", '{"op": "ping", "nonce": %s}'),
    ("op", '{"op": %s}'),
    ("the message", "%s"),
]


class ErrorTextTests(MemoryCase):
    """Whatever a client sends, it is answered in words, and the session stays open."""

    limits = Limits()

    def answers(self, raw: str) -> list[dict[str, Any]]:
        before = len(self.ws.client.messages)
        self.ws.send_raw(raw.encode("utf-8", "surrogatepass"))
        return self.ws.client.messages[before:]

    def test_every_field_of_every_op(self) -> None:
        """
        Fails on the old code: ``runs: 5`` raised TypeError out of the session
        (connection dropped), a lone surrogate in a nonce UnicodeEncodeError,
        and texts showed ``True``, ``None``, ``{}``, ``[]`` and whole inputs.
        """
        for where, template in FIELD_MESSAGES:
            for name, value in odd_values():
                answers = self.answers(template % value)
                for answer in answers:
                    if answer["op"] == "error":
                        assert_clear(self, answer["error"])
                        self.assertNotIn("Python", json.dumps(answer))
                self.assertLessEqual(
                    {a["op"] for a in answers}, {"error", "pong", "reset", "ack"}, (where, name)
                )
                self.still_open(self.ws)

    def test_error_names_the_field(self) -> None:
        for raw, words in [
            (
                '{"op": "subscribe", "runs": 5}',
                "subscribe: 'runs' must be a list of strings, got 5",
            ),
            (
                '{"op": "subscribe", "names": ["a", 1]}',
                "subscribe: 'names' must be a list of strings, got 1 at position 1",
            ),
            ('{"op": "subscribe", "types": {"a": 1}}', "'types' must be a list of strings, got an"),
            ('{"op": "subscribe", "after": true}', '"after" must be an event id >= 0'),
            ('{"op": "subscribe", "after": %s}' % ("9" * 4299), "got an integer of 14281 bits"),
            ('{"op": "subscribe", "after": 9223372036854775808}', "(64-bit)"),
            ('{"op": "subscribe", "max_rate": "x"}', '"max_rate" must be a number'),
            ('{"op": "subscribe", "max_rate": {}}', "got an object"),
            ('{"op": "ping", "nonce": "\\ud800"}', 'ping: "nonce" holds a lone surrogate'),
            ('{"op": "x%s"}' % ("y" * 100), "unknown op 'xyyy"),
            ('{"op": null}', 'a message must have an "op"'),
            ('{"op": 7}', "unknown op 7;"),
            ('{"op": "publish", "events": [{"type": "metric", "step": true}]}', 'field "run"'),
        ]:
            error = self.answers(raw)[-1]
            self.assertEqual(error["op"], "error", raw)
            self.assertIn(words, error["error"], raw)
            assert_clear(self, error["error"])
        self.assertEqual(self.backend.hub.last_id, 0)
        self.still_open(self.ws)

    def test_a_bug_answers_without_python(self) -> None:
        """
        A failure the session did not foresee is logged; the client is told
        in words and the connection stays (the old code let it escape).
        """

        def broken(*args: object, **kwargs: object) -> object:
            raise KeyError("internal detail")

        self.patch(self.backend.hub, "subscribe", broken)
        error = self.answers('{"op": "subscribe"}')[-1]
        self.assertEqual(error["error"], "internal server error (logged by the server)")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.still_open(self.ws)

    @settings(max_examples=300, deadline=None)
    @given(
        field=st.sampled_from(["after", "max_rate", "runs", "names", "types", "nonce", "events"]),
        value=st.recursive(
            st.none()
            | st.booleans()
            | st.integers(min_value=-(10**4299), max_value=10**4299)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=5), inner, max_size=4)
            ),
            max_leaves=10,
        ),
    )
    def test_any_json_value(self, field: str, value: object) -> None:
        op = {"nonce": "ping", "events": "publish"}.get(field, "subscribe")
        answers = self.answers(json.dumps({"op": op, field: value}))
        for answer in answers:
            self.assertIn(answer["op"], ("error", "pong", "reset", "ack"))
            if answer["op"] == "error":
                assert_clear(self, answer["error"])
        self.still_open(self.ws)
        self.ws.send({"op": "unsubscribe"})


# Real loopback servers


async def connect(url: str, token: str | None = None, query: str = "") -> WSClient:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    factory = WebSocketClientFactory(f"ws://{hostport}/{path}{query}", headers=headers)
    factory.protocol = WSClient
    factory.setProtocolOptions(
        closeHandshakeTimeout=5,
        serverConnectionDropTimeout=5,
        maxMessagePayloadSize=0,
        maxFramePayloadSize=0,
    )
    client: WSClient = await TCP4ClientEndpoint(reactor, host, int(port)).connect(factory)
    await client.hello
    return client


class LoopbackTestCase(TestCase):
    config: dict[str, Any] = {}

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(dict(ANY_PORTS, **self.config), reactor)
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def open(self, token: str | None = None, query: str = "") -> WSClient:
        client = await connect(self.server.urls["ws"], token, query)
        self.addCleanup(self.bye, client)
        return client

    async def bye(self, client: WSClient) -> None:
        if not client.lost.called:  # no close handshake to wait for: the test is over
            client.transport.abortConnection()
            await client.lost

    async def still_served(self, token: str | None = None) -> None:
        """A new client publishes and is acknowledged: the server is fine."""
        other = await self.open(token)
        other.send_json({"op": "publish", "events": [metric("after", 1)]})
        await other.wait_for("ack", 1)
        self.assertEqual(other.messages[-1]["accepted"], 1)


class LoopbackCloseTests(LoopbackTestCase):
    """
    What reaches a real client over TCP. Fails on the old code: the server
    aborted the connection, the client saw no close frame (1006, not clean).
    """

    def test_oversized_message_close_frame_arrives(self) -> Deferred[None]:
        async def go() -> None:
            client = await self.open()
            client.sendMessage(b'{"op": "ping", "nonce": "' + b"x" * MAX_BODY_BYTES + b'"}')
            was_clean, code, reason = await client.closed
            self.assertEqual((was_clean, code), (True, 1009))
            self.assertIn(f"over the limit of {MAX_BODY_BYTES} bytes", reason or "")
            await client.lost
            self.assertEqual(client.count("pong"), 0)
            await self.still_served()

        return d(go())

    def test_invalid_utf8_close_frame_arrives(self) -> Deferred[None]:
        async def go() -> None:
            client = await self.open()
            client.sendMessage(b'{"op": "ping", "nonce": "\xc3\x28"}')
            was_clean, code, reason = await client.closed
            self.assertEqual((was_clean, code), (True, 1007))
            self.assertIn("invalid UTF-8", reason or "")
            await client.lost
            await self.still_served()

        return d(go())


class ReadTokenTests(LoopbackTestCase):
    """A session opened with a read token reads; its publish is refused (403), it stays."""

    config = {"token": WRITE_TOKEN, "read_token": [READ_TOKEN]}

    async def reader_refused(self, reader: WSClient) -> None:
        hub = self.server.hub
        reader.send_json({"op": "subscribe"})
        reader.send_json({"op": "publish", "events": [metric("r", 1)]})
        reader.send_json({"op": "ping", "nonce": "p"})
        await reader.wait_for("pong", 1)
        errors = [m for m in reader.messages if m["op"] == "error"]
        self.assertEqual(errors, [{"op": "error", "error": READ_ONLY_PUBLISH, "status": 403}])
        self.assertIn("--token", READ_ONLY_PUBLISH)
        self.assertEqual(reader.count("ack"), 0)
        self.assertEqual(hub.last_id, 0)
        # The reader still reads: what the writer publishes reaches it.
        writer = await self.open(WRITE_TOKEN)
        writer.send_json({"op": "publish", "events": [metric("w", 1)]})
        await writer.wait_for("ack", 1)
        await reader.wait_for("event", 1)
        self.assertEqual([(e["run"], e["step"]) for e in reader.events], [("w", 1)])
        self.assertFalse(reader.lost.called)

    def test_read_token_in_header(self) -> Deferred[None]:
        """Fails on the old code: the read token's publish was stored and acknowledged."""

        async def go() -> None:
            await self.reader_refused(await self.open(READ_TOKEN))

        return d(go())

    def test_read_token_in_query(self) -> Deferred[None]:
        async def go() -> None:
            await self.reader_refused(await self.open(query=f"?token={READ_TOKEN}"))

        return d(go())

    def test_write_token_publishes(self) -> Deferred[None]:
        async def go() -> None:
            await self.still_served(WRITE_TOKEN)
            writer = await self.open(query=f"?token={WRITE_TOKEN}")
            writer.send_json({"op": "publish", "events": [metric("q", 1)]})
            await writer.wait_for("ack", 1)
            self.assertEqual(self.server.hub.last_id, 2)

        return d(go())


class NoTokenTests(LoopbackTestCase):
    """With no token configured every session publishes, as before."""

    def test_publishes(self) -> Deferred[None]:
        return d(self.still_served())


class SessionTokenTests(SynchronousTestCase):
    """
    The session reads the token from the upgrade as the site does, byte for
    byte (the site has already refused a wrong one with 401).
    """

    def setUp(self) -> None:
        backend = FakeBackend()
        self.factory = site_factory(backend, token=WRITE_TOKEN, read_token=[READ_TOKEN])

    def level(self, uri: str, **headers: str) -> str:
        session: Any = self.factory.buildProtocol(None)
        session.http_request_uri = uri
        session.onConnect(ConnectionRequest(None, headers, "", "/ws", {}, 13, None, [], []))
        level: str = session.level
        return level

    def test_levels(self) -> None:
        self.assertEqual(self.level("/ws", authorization=f"Bearer {READ_TOKEN}"), READ)
        self.assertEqual(self.level("/ws", authorization=f"bearer  {WRITE_TOKEN} "), WRITE)
        self.assertEqual(self.level(f"/ws?token={READ_TOKEN}"), READ)
        self.assertEqual(self.level(f"/ws?x=1&token={WRITE_TOKEN}&token=y"), WRITE)
        # The header wins over the query, as for the site.
        self.assertEqual(
            self.level(f"/ws?token={WRITE_TOKEN}", authorization=f"Bearer {READ_TOKEN}"), READ
        )

    def test_wrong_token_refused(self) -> None:
        for uri, headers in [
            ("/ws", {}),
            ("/ws?token=nope", {}),
            ("/ws", {"authorization": "Bearer x"}),
        ]:
            with self.assertRaises(ConnectionDeny) as refused:
                self.level(uri, **headers)
            self.assertEqual(refused.exception.code, 401)

    def test_no_access_is_write(self) -> None:
        """A bare factory (no site) publishes, as before read tokens."""
        backend = FakeBackend()
        factory = StreamFactory(backend.hub, backend.clients, backend.clock, 1.0)
        self.assertIsNone(factory.access)
        session: Any = factory.buildProtocol(None)
        session.onConnect(ConnectionRequest(None, {}, "", "/ws", {}, 13, None, [], []))
        self.assertEqual(session.level, WRITE)
