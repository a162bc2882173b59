"""
The web layer without sockets: a small ``Backend`` (a real Hub on a
``MemoryStore``, the real registries), the real ``Site`` over a
``StringTransport``, REST through ``treq.testing.StubTreq`` and WebSocket
through Autobahn's memory agent, all on a ``Clock``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import txaio
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test.iosim import IOPump
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from trainstream.config import Config
from trainstream.events import Limits
from trainstream.events.rules import DEFAULT_LIMITS
from trainstream.hub import Hub
from trainstream.ranks import RanksService
from trainstream.runs import RunsService
from trainstream.store import Store
from trainstream.store.memory import MemoryStore
from trainstream.web.backend import ListenerStatus, ServerStatus
from trainstream.web.clients import Clients
from trainstream.web.site import build_site
from trainstream.web.ws import StreamFactory, StreamSession

#: Ports the fake listeners claim; nothing is bound.
REST_PORT, SSE_PORT, WS_PORT = 18_890, 18_888, 18_889
#: The headers of a WebSocket upgrade request.
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def metric(
    run: str, step: int, value: float | str = 0.5, name: str = "train/loss"
) -> dict[str, Any]:
    return {"type": "metric", "run": run, "name": name, "step": step, "value": value}


def log_event(run: str, message: str = "hello") -> dict[str, Any]:
    return {"type": "log", "run": run, "level": "info", "message": message}


class ControlledStore(MemoryStore):
    """A memory history whose commits (``sync``) fire only when the test says."""

    def __init__(self, max_events: int = 100_000) -> None:
        super().__init__(max_events)
        self.syncs: list[Deferred[None]] = []

    def sync(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.syncs.append(d)
        return d

    def commit(self) -> None:
        """Fire every commit asked for so far."""
        syncs, self.syncs = self.syncs, []
        for d in syncs:
            d.callback(None)


def listener(role: str, port: int, loopback: bool = True) -> ListenerStatus:
    host = "127.0.0.1" if loopback else "192.0.2.7"
    return ListenerStatus(
        role=role,
        endpoint=f"tcp:{port}:interface={host}",
        port=port,
        url=f"http://{host}:{port}/",
        connections=0,
        loopback=loopback,
    )


class FakeBackend:
    """
    What ``web/`` needs of a server and nothing more: a real Hub on a memory
    history, the real runs and ranks registries, the clients, and a status
    the test sets.
    """

    def __init__(
        self,
        clock: MemoryReactorClock | None = None,
        store: Store | None = None,
        max_history: int = 100_000,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.store: Store = store if store is not None else MemoryStore(max_history)
        self.store.start()
        self.hub = Hub(self.store, limits)
        self.runs = RunsService(self.hub, self.clock, 120.0)
        self.ranks: RanksService | None = RanksService(self.hub)
        self.clients = Clients()
        self.uptime_s = 12.5
        self.problems: tuple[str, ...] = ()
        self.listeners: tuple[ListenerStatus, ...] = (
            listener("sse", SSE_PORT),
            listener("ws", WS_PORT),
            listener("rest", REST_PORT),
        )

    @property
    def urls(self) -> dict[str, str]:
        return {
            "sse": f"http://127.0.0.1:{SSE_PORT}/events",
            "ws": f"ws://127.0.0.1:{WS_PORT}/ws",
            "rest": f"http://127.0.0.1:{REST_PORT}/api",
            "dashboard": f"http://127.0.0.1:{REST_PORT}/",
        }

    def status(self) -> ServerStatus:
        return ServerStatus(
            uptime_s=self.uptime_s,
            urls=self.urls,
            listeners=self.listeners,
            problems=self.problems,
        )


def make_site(backend: FakeBackend, **config: Any) -> Site:
    """The real site of ``backend``, on its clock, with ``config`` over the defaults."""
    return build_site(backend, Config.from_value({"memory": True, **config}), backend.clock)


# HTTP over a StringTransport


def http_request(
    method: str, path: str, headers: Mapping[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    given = {"Host": "127.0.0.1", **(headers or {})}
    if body or method in ("POST", "PUT"):
        given.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in given.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked response so far, and whether it ended."""
    out = b""
    while data:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out, True
        if len(rest) < size + 2:
            out += rest[:size]
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out, False


class Response:
    """One HTTP response as the client saw it (so far)."""

    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.code = int(lines[0].split(" ", 2)[1])
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        if self.headers.get("transfer-encoding") == ["chunked"]:
            self.body, self.complete = dechunk(rest)
        else:
            self.body = rest
            length = self.headers.get("content-length")
            self.complete = length is None or len(rest) >= int(length[0])

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class FillingTransport(StringTransport):
    """
    A ``StringTransport`` that fills as a socket does: past ``capacity``
    bytes the client has not read, it pauses its producer; ``read_all``
    empties it and resumes the producer.
    """

    def __init__(self, capacity: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capacity = capacity
        self.full = False
        self._read = 0

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))

    def write(self, data: bytes) -> None:
        super().write(data)
        unread = len(self.value()) - self._read
        if self.capacity is not None and not self.full and unread > self.capacity:
            self.full = True
            if self.producer is not None:
                self.producer.pauseProducing()

    def read_all(self, then_capacity: int | None = None) -> None:
        """The client reads everything; from now on the buffer holds ``then_capacity``."""
        self._read = len(self.value())
        self.capacity = then_capacity
        if self.full:
            self.full = False
            if self.producer is not None:
                self.producer.resumeProducing()


class Connection:
    """
    One client connection to a real ``Site`` over a ``StringTransport``: what
    the site writes stays in the transport, nothing is a socket.

    :param role: the role of the listener it arrived on (the factory the
        site's ``Root`` asks).
    :param capacity: bytes the client's socket holds unread before it is
        full (``None``: it never fills).
    """

    def __init__(
        self,
        site: Site,
        role: str = "rest",
        port: int = REST_PORT,
        capacity: int | None = None,
    ) -> None:
        self.transport = FillingTransport(
            capacity,
            hostAddress=IPv4Address("TCP", "127.0.0.1", port),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40_000),
        )
        self.transport.factory = SimpleNamespace(role=role)  # type: ignore[attr-defined]
        self.channel = site.buildProtocol(None)
        # As a TCP transport does: a WebSocket upgrade swaps it for the session.
        self.transport.protocol = self.channel  # type: ignore[attr-defined]
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> Response:
        self.send(http_request(method, path, headers, body))
        return self.response()

    def response(self) -> Response:
        return Response(self.transport.value())

    def close(self, reason: Exception | None = None) -> None:
        self.channel.connectionLost(reason or ConnectionError("client went away"))


def sse_blocks(body: bytes) -> list[dict[str, str]]:
    """The complete SSE blocks of a stream's body, each as its fields."""
    blocks = []
    for block in body.decode().split("\n\n")[:-1]:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                fields.setdefault("comment", line[1:].strip())
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        blocks.append(fields)
    return blocks


class SSEClient:
    """``GET /events`` on a ``Connection``, its blocks parsed."""

    def __init__(
        self, site: Site, path: str = "/events", capacity: int | None = None, **headers: str
    ) -> None:
        self.connection = Connection(site, "sse", SSE_PORT, capacity)
        self.connection.send(http_request("GET", path, {"Accept": "text/event-stream", **headers}))

    @property
    def response(self) -> Response:
        return self.connection.response()

    @property
    def blocks(self) -> list[dict[str, str]]:
        return sse_blocks(self.response.body)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(b["data"]) for b in self.blocks if "id" in b]

    def notices(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(b["data"]) for b in self.blocks if b.get("event") == kind]


# WebSocket through Autobahn's memory agent


class WSPeer(WebSocketClientProtocol):
    """The client end: every message it got, parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("op") == op]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for m in self.ops("events") for e in m["events"]]


class MemoryWS:
    """
    One WebSocket session of ``factory`` with a client in memory: bytes move
    when ``flush()`` says (no global reactor: Autobahn's timers run on
    ``clock``, patched in for the test).
    """

    def __init__(
        self, testcase: SynchronousTestCase, factory: StreamFactory, clock: MemoryReactorClock
    ) -> None:
        testcase.patch(txaio.config, "loop", clock)
        self.pumps: list[IOPump] = []
        built: list[StreamSession] = []

        def session() -> StreamSession:
            protocol: StreamSession = factory.buildProtocol(None)  # type: ignore[no-untyped-call]
            built.append(protocol)
            return protocol

        agent = create_memory_agent(MemoryReactorClock(), self, session)
        opened = agent.open(f"ws://127.0.0.1:{WS_PORT}/ws", {}, WSPeer)
        self.flush()
        self.client: WSPeer = testcase.successResultOf(opened)
        self.session = built[0]

    def add(self, pump: IOPump) -> None:
        """The agent's ``IPumper``: we pump by hand."""
        self.pumps.append(pump)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def send(self, obj: object) -> None:
        self.send_raw(json.dumps(obj).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.client.sendMessage(payload, isBinary=binary)
        self.flush()

    def last(self, op: str) -> dict[str, Any]:
        found = self.client.ops(op)
        if not found:
            raise AssertionError(f"no {op!r} message; got {self.client.messages}")
        return found[-1]


def ws_factory(backend: FakeBackend, **config: Any) -> StreamFactory:
    """The site's own WebSocket factory (the one under ``/ws``)."""
    site = make_site(backend, **config)
    factory: StreamFactory = site.resource.children[b"ws"].ws._factory
    return factory


def ids(events: Sequence[Mapping[str, Any]]) -> list[int]:
    return [int(e["id"]) for e in events]
