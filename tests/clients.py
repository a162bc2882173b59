"""
Real loopback clients for tests: a raw SSE reader and an Autobahn WebSocket
client, both on the test's reactor, each telling its story as Deferreds.
The SSE reader parses with the project's one parser
(``trainstream.client.sse.SSEParser``).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.http import _ChunkedTransferDecoder

from trainstream.client.sse import SSEParser


def _host_port(url: str) -> tuple[str, int, str]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), "/" + path


class SSEClient(Protocol):
    """
    Sends one GET and collects the raw stream and the parsed events: the
    data of ``reset`` messages in ``resets``, of any other in ``events``.
    """

    def __init__(self, path: str, headers: dict[str, str] | None = None) -> None:
        self.path = path
        self.headers = headers or {}
        self.raw = b""
        self.events: list[dict[str, Any]] = []
        self.resets: list[dict[str, Any]] = []
        self.started: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.lost_reason: Failure | None = None
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._head = b""
        self._feed: Any = None  # the body's reader, once the head is read
        self.parser = SSEParser()

    def connectionMade(self) -> None:
        headers = {"Host": "127.0.0.1", "Accept": "text/event-stream", **self.headers}
        lines = [f"GET {self.path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if not self.started.called and b"retry:" in self.raw:
            self.started.callback(None)
        if self._feed is None:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            head, _, data = self._head.partition(b"\r\n\r\n")
            self._feed = self._body
            if b"transfer-encoding: chunked" in head.lower():
                self._feed = _ChunkedTransferDecoder(self._body, lambda rest: None).dataReceived
        self._feed(data)

    def _body(self, data: bytes) -> None:
        for message in self.parser.feed_bytes(data):
            obj = json.loads(message.data)
            (self.resets if message.event == "reset" else self.events).append(obj)
        for n, d in list(self._waiters):
            if len(self.events) >= n:
                self._waiters.remove((n, d))
                d.callback(None)

    def wait_for(self, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.events) >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d

    @property
    def finished_cleanly(self) -> bool:
        """The chunked response ended with its terminating chunk."""
        return self.raw.endswith(b"0\r\n\r\n")

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost_reason = reason
        self.lost.callback(None)


async def connect_sse(url: str, path: str | None = None, **headers: str) -> SSEClient:
    host, port, url_path = _host_port(url)
    client = SSEClient(path or url_path, headers)
    endpoint = TCP4ClientEndpoint(global_reactor, host, port)
    await endpoint.connect(Factory.forProtocol(lambda: client))
    await client.started
    return client


class WSClient(WebSocketClientProtocol):
    """Collects messages; ``hello`` and close are Deferreds."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.hello: Deferred[dict[str, Any]] = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._waiters: list[tuple[str, int, Deferred[None]]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        self.messages.append(message)
        if message.get("op") == "hello" and not self.hello.called:
            self.hello.callback(message)
        for op, n, d in list(self._waiters):
            if self.count(op) >= n:
                self._waiters.remove((op, n, d))
                d.callback(None)

    def count(self, op: str) -> int:
        if op == "event":
            return len(self.events)
        return sum(1 for m in self.messages if m.get("op") == op)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for m in self.messages if m.get("op") == "events" for e in m["events"]]

    def wait_for(self, op: str, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.count(op) >= n:
            d.callback(None)
        else:
            self._waiters.append((op, n, d))
        return d

    def send_json(self, obj: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(obj).encode())

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


async def connect_ws(url: str, path: str | None = None, origin: str | None = None) -> WSClient:
    host, port, url_path = _host_port(url)
    path = path or url_path
    factory = WebSocketClientFactory(f"ws://{host}:{port}{path}", origin=origin)
    factory.protocol = WSClient
    factory.setProtocolOptions(closeHandshakeTimeout=2, serverConnectionDropTimeout=2)
    endpoint = TCP4ClientEndpoint(global_reactor, host, port)
    client: WSClient = await endpoint.connect(factory)
    await client.hello
    return client


def free_port() -> int:
    """A port that was free a moment ago (no SO_REUSEADDR, no TIME_WAIT left)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def plain_bind(port: int) -> OSError | None:
    """Bind and listen like a plain script on Windows would: no SO_REUSEADDR."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind(("127.0.0.1", port))
        s.listen(1)
        return None
    except OSError as e:
        return e
    finally:
        s.close()


#: ``plain_bind`` for a child script's source (it says why a bind failed as text).
PLAIN_BIND_SOURCE = """
import socket

def plain_bind(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind(("127.0.0.1", port)); s.listen(1)
        return None
    except OSError as e:
        return str(e)
    finally:
        s.close()
"""


def config_on(ports: tuple[int, int, int], **extra: Any) -> dict[str, Any]:
    sse, ws, rest = ports
    return {
        "sse": f"tcp:{sse}:interface=127.0.0.1",
        "ws": f"tcp:{ws}:interface=127.0.0.1",
        "rest": f"tcp:{rest}:interface=127.0.0.1",
        "memory": True,
        **extra,
    }


ANY_PORTS = {
    "sse": "tcp:0:interface=127.0.0.1",
    "ws": "tcp:0:interface=127.0.0.1",
    "rest": "tcp:0:interface=127.0.0.1",
    "memory": True,
}


class RawHTTP(Protocol):
    """One HTTP/1.1 request on a connection the client keeps open."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.raw = b""
        self.answered: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if not self.answered.called and b"\r\n\r\n" in self.raw:
            head, _, body = self.raw.partition(b"\r\n\r\n")
            complete = body.endswith(b"0\r\n\r\n")  # chunked
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    complete = len(body) >= int(line.split(b":")[1])
            if complete:
                self.answered.callback(self.raw)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback(None)


async def keepalive_get(port: int, path: str) -> RawHTTP:
    """GET ``path`` and keep the connection open after the answer."""
    client = RawHTTP(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    endpoint = TCP4ClientEndpoint(global_reactor, "127.0.0.1", port)
    await endpoint.connect(Factory.forProtocol(lambda: client))
    await client.answered
    return client
