"""
A client that stops reading never makes the server hold more than a bounded
buffer for it, and never slows anybody else down (real loopback sockets).
"""

from __future__ import annotations

import base64
import json
import os
import socket
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from trainstream.server import StreamServer

MB = 1024 * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


class CountingSSE(Protocol):
    """A fast SSE reader that keeps only counts, so the test's own memory stays flat."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0
        self.in_order = True
        self._tail = b""
        self.lost: Deferred[None] = Deferred()
        self._waiter: tuple[int, Deferred[None]] | None = None

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        data = self._tail + data
        lines = data.split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            if line.startswith(b"id: "):
                i = int(line[4:])
                self.in_order &= i > self.last
                self.last = i
                self.count += 1
        if self._waiter and self.last >= self._waiter[0]:
            d = self._waiter[1]
            self._waiter = None
            d.callback(None)

    def until(self, last_id: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.last >= last_id:
            d.callback(None)
        else:
            self._waiter = (last_id, d)
        return d


class CountingWS(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.last = 0
        self.in_order = True
        self.ready: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._waiter: tuple[int, Deferred[None]] | None = None

    def onOpen(self) -> None:
        self.sendMessage(json.dumps({"op": "subscribe"}).encode())
        self.sendMessage(json.dumps({"op": "ping", "nonce": "ready"}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        if message["op"] == "pong":
            self.ready.callback(None)
        elif message["op"] == "events":
            for e in message["events"]:
                self.in_order &= e["id"] > self.last
                self.last = e["id"]
                self.count += 1
            if self._waiter and self.last >= self._waiter[0]:
                d = self._waiter[1]
                self._waiter = None
                d.callback(None)

    def until(self, last_id: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.last >= last_id:
            d.callback(None)
        else:
            self._waiter = (last_id, d)
        return d

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


def stalled_socket(port: int, request: bytes) -> socket.socket:
    """A client that sends its request and then never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def ws_upgrade(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + n.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def transport_buffered(transport: Any) -> int:
    """Bytes Twisted itself holds for a TCP connection (write buffer)."""
    return len(transport.dataBuffer) + transport._tempDataLen


class SlowClientTests(TestCase):
    timeout = 300

    def setUp(self) -> Deferred[Any]:
        self.server = StreamServer(
            {
                "sse": "tcp:0:interface=127.0.0.1",
                "ws": "tcp:0:interface=127.0.0.1",
                "rest": "tcp:0:interface=127.0.0.1",
                "memory": True,
                "max_history": 20_000,
                "lag_warn": 60.0,  # a loaded machine must not add reactor_lag alerts to the stream
            },
            reactor,
        )
        self.addCleanup(self.server.stop)
        return self.server.start()

    async def close(self, sse: CountingSSE, ws: CountingWS) -> None:
        sse.transport.loseConnection()
        ws.sendClose()
        await sse.lost
        await ws.lost

    async def fast_clients(self) -> tuple[CountingSSE, CountingWS]:
        urls = self.server.urls
        sse = CountingSSE()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(urls["sse"])).connect(
            Factory.forProtocol(lambda: sse)
        )
        factory = WebSocketClientFactory(urls["ws"])
        factory.protocol = CountingWS
        ws: CountingWS = await TCP4ClientEndpoint(
            reactor, "127.0.0.1", port_of(urls["ws"])
        ).connect(factory)
        await ws.ready
        return sse, ws

    async def stalled(self) -> list[socket.socket]:
        """Connect them from a thread: their blocking handshake needs the reactor running."""
        sockets: list[socket.socket] = await deferToThread(self.stalled_clients)
        for s in sockets:
            self.addCleanup(s.close)
        return sockets

    def stalled_clients(self) -> list[socket.socket]:
        urls = self.server.urls
        sse = stalled_socket(
            port_of(urls["sse"]),
            b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
        )
        ws = stalled_socket(port_of(urls["ws"]), ws_upgrade("/ws"))
        ws.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer:  # the 101, before the first frame
            answer += ws.recv(1)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        ws.sendall(masked_text(b'{"op":"subscribe"}'))
        return [sse, ws]

    async def wait_for_subscriptions(self, n: int) -> None:
        """Poll (bounded) until the stalled clients' requests were handled."""
        for _ in range(1000):
            if self.server.hub.subscriber_count >= n:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{n} subscriptions never arrived")

    def test_fifty_megabytes_past_a_stalled_client(self) -> Deferred[None]:
        """
        50 MB of metric events pass while one SSE and one WebSocket client
        read nothing: their buffers stay within 1 MiB (metrics coalesced),
        the process does not grow by anything like 50 MB, every other client
        gets every event in order, and the stalled SSE client, reading at
        last, gets each series' latest value with counts that add up.
        """

        async def go() -> None:
            sse, ws = await self.fast_clients()
            stalled = await self.stalled()
            await self.wait_for_subscriptions(4)
            hub = self.server.hub
            subscriptions = hub.subscriptions()
            start_rss = rss()
            names = [f"layer{i}/grad_norm" for i in range(8)]
            published = 0
            step = 0
            peak_buffer = 0
            peak_transport = 0
            while published < 50 * MB:
                events = [
                    {
                        "type": "metric",
                        "run": "big",
                        "time": 1.0,
                        "name": names[i % len(names)],
                        "step": step + i,
                        "value": 0.123456789 * i,
                    }
                    for i in range(1000)
                ]
                step += 1000
                _, _, last = hub.accept(events)
                published += sum(len(r.json) for r in hub.store.after(last - 1000, bool))
                await sse.until(last)
                await ws.until(last)
                for sub in subscriptions:
                    peak_buffer = max(peak_buffer, sub.buffered_bytes)
                for listener in self.server.listeners:
                    for wrapper in listener.factory.protocols:
                        peak_transport = max(peak_transport, transport_buffered(wrapper.transport))
            growth = rss() - start_rss
            print(
                f"\n  published {published / MB:.1f} MB in {hub.last_id} events; "
                f"peak client buffer {peak_buffer / 1024:.0f} KiB, peak Twisted buffer "
                f"{peak_transport / 1024:.0f} KiB, RSS growth {growth / MB:.1f} MB, "
                f"coalesced {hub.coalesced_total}"
            )
            self.assertEqual((sse.count, ws.count), (hub.last_id, hub.last_id))
            self.assertTrue(sse.in_order and ws.in_order)
            self.assertLessEqual(peak_buffer, MB)
            self.assertLess(peak_transport, 512 * 1024)
            self.assertLess(growth, 40 * MB)
            self.assertEqual(hub.overflows, 0)
            self.assertGreater(hub.coalesced_total, 0)

            # The stalled SSE client reads at last: every event is accounted
            # for, either itself or folded into a later value of its series.
            total = hub.last_id

            def read_all(s: socket.socket) -> bytes:
                s.settimeout(10)
                data = b""
                while f"id: {total}\n".encode() not in data:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    data += chunk
                return data

            read = deferToThread(read_all, stalled[0])
            data = await read
            covered = 0
            last_values: dict[str, int] = {}
            for line in data.split(b"\n"):
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    covered += 1 + event.get("coalesced", 0)
                    last_values[event["name"]] = event["step"]
            self.assertEqual(covered, total)
            self.assertEqual(last_values, {n: step - 8 + i for i, n in enumerate(names)})
            await self.close(sse, ws)

        return Deferred.fromCoroutine(go())

    def test_uncoalescable_overflow_disconnects_with_reason(self) -> Deferred[None]:
        """
        Log events cannot be coalesced: past the bound the stalled client is
        closed with an ``overflow`` event naming the id to resume after, and
        it can resume from there with nothing missing.
        """

        async def go() -> None:
            sse, ws = await self.fast_clients()
            stalled = await self.stalled()
            await self.wait_for_subscriptions(4)
            hub = self.server.hub
            for batch in range(40):
                _, _, last = hub.accept(
                    [
                        {
                            "type": "log",
                            "run": "chatty",
                            "time": 1.0,
                            "level": "info",
                            "message": f"batch {batch} line {i} " + "x" * 150,
                        }
                        for i in range(1000)
                    ]
                )
                await sse.until(last)
                await ws.until(last)
            self.assertEqual(hub.overflows, 2)
            self.assertEqual((sse.count, ws.count), (hub.last_id, hub.last_id))

            def read_until_closed(s: socket.socket) -> bytes:
                s.settimeout(10)
                data = b""
                try:
                    while chunk := s.recv(1 << 20):
                        data += chunk
                except ConnectionResetError:
                    pass
                return data

            data = await deferToThread(read_until_closed, stalled[0])
            self.assertIn(b"event: overflow", data)
            head, _, overflow = data.partition(b"event: overflow\ndata: ")
            notice = json.loads(overflow.split(b"\n", 1)[0])
            ids = [int(x[4:]) for x in head.split(b"\n") if x.startswith(b"id: ")]
            self.assertEqual(notice["last_id"], ids[-1])
            self.assertEqual(ids, list(range(1, ids[-1] + 1)))
            self.assertIn("resume", notice["reason"])

            def read_until_close_frame(s: socket.socket) -> bytes:
                s.settimeout(10)
                data = b""
                while b"too slow: resume by id" not in data:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    data += chunk
                return data

            ws_data = await deferToThread(read_until_close_frame, stalled[1])
            self.assertIn(b"\x88", ws_data)  # the close frame, after everything queued
            self.assertIn(b'"op":"error"', ws_data)
            self.assertIn(b"too slow", ws_data)
            await self.close(sse, ws)

        return Deferred.fromCoroutine(go())
