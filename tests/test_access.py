"""
PROTOCOL 6 on the real site, over a ``StringTransport``: the bearer token,
WebSocket origins, body limits and the Host check against DNS rebinding.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.webtools import (
    REST_PORT,
    UPGRADE,
    WS_PORT,
    Connection,
    FakeBackend,
    SSEClient,
    listener,
    log_event,
    make_site,
)
from trainstream.events import Limits

TOKEN = "s3cret-token"


class AccessTestCase(SynchronousTestCase):
    config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.backend = FakeBackend()
        self.site = make_site(self.backend, **self.config)

    def ask(self, path: str, role: str = "rest", **headers: str) -> Any:
        return Connection(self.site, role).request("GET", path, headers)

    def upgrade(self, path: str = "/ws", **headers: str) -> Any:
        import txaio

        self.patch(txaio.config, "loop", self.backend.clock)
        return Connection(self.site, "ws", WS_PORT).request("GET", path, {**UPGRADE, **headers})


class TokenTests(AccessTestCase):
    config = {"token": TOKEN}

    def test_health_is_open_everything_else_needs_the_token(self) -> None:
        self.assertEqual(self.ask("/api/health").code, 200)
        for path, headers in (
            ("/api/events", {}),
            ("/api/events", {"Authorization": f"Bearer {TOKEN}x"}),
            ("/api/events?token=nope", {}),
            ("/", {}),
            ("/metrics", {}),
        ):
            refused = self.ask(path, **headers)
            self.assertEqual(refused.code, 401, (path, headers))
            self.assertIn("missing or wrong token", refused.json()["error"])
            self.assertEqual(refused.header("www-authenticate"), 'Bearer realm="trainstream"')
        for path, headers in (
            ("/api/events", {"Authorization": f"Bearer {TOKEN}"}),
            (f"/api/events?token={TOKEN}", {}),
        ):
            self.assertEqual(self.ask(path, **headers).code, 200, (path, headers))

    def test_sse_and_ws_take_the_token_in_the_query(self) -> None:
        refused = SSEClient(self.site)
        self.assertEqual(refused.response.code, 401)
        self.assertEqual(self.backend.hub.subscriber_count, 0)
        sse = SSEClient(self.site, f"/events?token={TOKEN}")
        self.backend.hub.accept([log_event("r")])
        self.assertEqual([e["message"] for e in sse.events], ["hello"])
        self.assertEqual(self.upgrade("/ws").code, 401)
        self.assertEqual(self.backend.clients.counts()["ws"], 0)
        accepted = self.upgrade(f"/ws?token={TOKEN}")
        self.assertEqual(accepted.code, 101)
        self.assertIn(b'"op":"hello"', accepted.body)
        self.assertEqual(self.backend.clients.counts()["ws"], 1)


class OriginTests(AccessTestCase):
    config = {"allow_origin": ("https://friend.example",)}

    def test_foreign_origin_refused(self) -> None:
        refused = self.upgrade(Origin="http://evil.example")
        self.assertEqual(refused.code, 403)
        self.assertIn("http://evil.example", refused.json()["error"])
        self.assertIn("--allow-origin", refused.json()["error"])
        # Our own host on another of our ports (the dashboard) is fine,
        # but not our host on a port that is not ours.
        self.assertEqual(self.upgrade(Origin="http://127.0.0.1:1").code, 403)
        for origin in (f"http://127.0.0.1:{REST_PORT}", "https://friend.example"):
            accepted = self.upgrade(Origin=origin)
            self.assertEqual(accepted.code, 101, origin)
            self.assertIn(b'"op":"hello"', accepted.body)


class BodyLimitTests(AccessTestCase):
    def post(self, body: bytes, chunked: bool = False) -> Any:
        connection = Connection(self.site)
        if not chunked:
            return connection.request(
                "POST", "/api/events", {"Content-Type": "application/json"}, body
            )
        head = (
            "POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536])
            for i in range(0, len(body), 65536)
        )
        connection.send(head.encode() + chunks + b"0\r\n\r\n")
        return connection.response()

    def test_too_large_body_is_413(self) -> None:
        event = {"type": "log", "run": "r", "level": "info", "message": "x" * 60_000}
        body = json.dumps([event] * 150).encode()  # about 9 MB
        self.assertGreater(len(body), 8 * 1024 * 1024)
        for chunked in (False, True):
            answer = self.post(body, chunked)
            self.assertEqual(answer.code, 413, chunked)
            self.assertIn("8388608", answer.json()["error"])
        self.assertEqual(self.backend.hub.last_id, 0)

    def test_the_hubs_limit_is_the_sites(self) -> None:
        """One limit: the hub's, for REST bodies as they arrive and WebSocket messages."""
        self.backend = FakeBackend(limits=Limits(max_body_bytes=1000))
        self.site = make_site(self.backend)
        event = {"type": "log", "run": "r", "level": "info", "message": "x" * 600}
        self.assertEqual(self.post(json.dumps([event]).encode()).code, 200)
        answer = self.post(json.dumps([event, event]).encode())
        self.assertEqual(answer.code, 413)
        self.assertIn("over the limit of 1000 bytes", answer.json()["error"])
        factory = self.site.resource.children[b"ws"].ws._factory
        self.assertEqual(factory.maxMessagePayloadSize, 1000)
        self.assertEqual(factory.maxFramePayloadSize, 1000)


class RebindingTests(AccessTestCase):
    def test_foreign_host_refused_on_loopback(self) -> None:
        """Bound to loopback, a request naming another host (DNS rebinding) is refused."""
        for host, code in (
            ("evil.example", 403),
            (f"evil.example:{REST_PORT}", 403),
            ("localhost", 200),
            (f"127.0.0.1:{REST_PORT}", 200),
            ("[::1]", 200),
        ):
            self.assertEqual(self.ask("/api/health", Host=host).code, code, host)
        refused = self.ask("/api/events", Host="evil.example")
        self.assertIn("loopback only", refused.json()["error"])

    def test_any_host_when_not_only_on_loopback(self) -> None:
        self.backend.listeners = (listener("rest", REST_PORT, loopback=False),)
        self.assertEqual(self.ask("/api/health", Host="evil.example").code, 200)
