"""
PROTOCOL 6 on real sockets: the bearer token, WebSocket origins, body limits.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory

from tests.clients import ANY_PORTS, RawHTTP, connect_sse, connect_ws
from tests.test_streaming import ServerTestCase, d

TOKEN = "s3cret-token"


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


async def raw(port: int, request: str) -> RawHTTP:
    client = RawHTTP(request.encode())
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: client)
    )
    await client.answered
    client.transport.loseConnection()
    await client.lost
    return client


def status(client: RawHTTP) -> int:
    return int(client.raw.split(b" ", 2)[1])


def upgrade(path: str, origin: str | None = None) -> str:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin:
        lines.append(f"Origin: {origin}")
    return "\r\n".join(lines) + "\r\n\r\n"


class TokenTests(ServerTestCase):
    config: dict[str, Any] = {**ANY_PORTS, "token": TOKEN}

    def test_health_is_open_everything_else_needs_the_token(self) -> Deferred[None]:
        async def go() -> None:
            rest = port_of(self.server.urls["rest"])
            health = await raw(rest, "GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            self.assertEqual(status(health), 200)
            for request in (
                "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}x\r\n\r\n",
                "GET /api/events?token=nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            ):
                refused = await raw(rest, request)
                self.assertEqual(status(refused), 401, request)
                self.assertIn(b"missing or wrong token", refused.raw)
                self.assertIn(b"WWW-Authenticate: Bearer", refused.raw)
            for request in (
                "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\n\r\n",
                f"GET /api/events?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            ):
                self.assertEqual(status(await raw(rest, request)), 200, request)

        return d(go())

    def test_sse_and_ws_take_the_token_in_the_query(self) -> Deferred[None]:
        async def go() -> None:
            urls = self.server.urls
            refused = await raw(
                port_of(urls["sse"]),
                "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
            )
            self.assertEqual(status(refused), 401)
            sse = await connect_sse(urls["sse"] + f"?token={TOKEN}")
            self.server.hub.accept(
                [{"type": "log", "run": "r", "level": "info", "message": "hello"}]
            )
            await sse.wait_for(1)
            ws_refused = await raw(port_of(urls["ws"]), upgrade("/ws"))
            self.assertEqual(status(ws_refused), 401)
            ws = await connect_ws(urls["ws"] + f"?token={TOKEN}")
            self.assertEqual(ws.messages[0]["op"], "hello")

        return d(go())


class OriginTests(ServerTestCase):
    config: dict[str, Any] = {**ANY_PORTS, "allow_origin": ("https://friend.example",)}

    def test_foreign_origin_refused(self) -> Deferred[None]:
        async def go() -> None:
            ws_port = port_of(self.server.urls["ws"])
            refused = await raw(ws_port, upgrade("/ws", "http://evil.example"))
            self.assertEqual(status(refused), 403)
            self.assertIn(b"http://evil.example", refused.raw)
            self.assertIn(b"--allow-origin", refused.raw)
            # Our own host on another of our ports (the dashboard) is fine,
            # but not our host on a port that is not ours.
            rest_port = port_of(self.server.urls["rest"])
            foreign_port = await raw(ws_port, upgrade("/ws", "http://127.0.0.1:1"))
            self.assertEqual(status(foreign_port), 403)
            own = await connect_ws(self.server.urls["ws"], origin=f"http://127.0.0.1:{rest_port}")
            friend = await connect_ws(self.server.urls["ws"], origin="https://friend.example")
            self.assertEqual([own.messages[0]["op"], friend.messages[0]["op"]], ["hello"] * 2)

        return d(go())


class BodyLimitTests(ServerTestCase):
    def test_too_large_body_is_413(self) -> Deferred[None]:
        async def go() -> None:
            event = {"type": "log", "run": "r", "level": "info", "message": "x" * 60_000}
            body = json.dumps([event] * 150).encode()  # about 9 MB
            self.assertGreater(len(body), 8 * 1024 * 1024)
            code, answer = await self.post("/api/events", body, content_type="application/json")
            self.assertEqual(code, 413)
            self.assertIn("8388608", answer["error"])
            self.assertEqual(self.server.hub.last_id, 0)

        return d(go())


class RebindingTests(ServerTestCase):
    def test_foreign_host_refused_on_loopback(self) -> Deferred[None]:
        """Bound to loopback, a request naming another host (DNS rebinding) is refused."""

        async def go() -> None:
            rest = port_of(self.server.urls["rest"])
            for host, code in (
                ("evil.example", 403),
                (f"evil.example:{rest}", 403),
                ("localhost", 200),
                (f"127.0.0.1:{rest}", 200),
                ("[::1]", 200),
            ):
                answer = await raw(rest, f"GET /api/health HTTP/1.1\r\nHost: {host}\r\n\r\n")
                self.assertEqual(status(answer), code, host)
            refused = await raw(rest, "GET /api/events HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            self.assertIn(b"loopback only", refused.raw)

        return d(go())
