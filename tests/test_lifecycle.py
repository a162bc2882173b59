"""
The manager's lifecycle on real loopback sockets: ports are free the moment a
release returns, even for a bind without SO_REUSEADDR.
"""

from __future__ import annotations

import errno
import fcntl
import json
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.clients import (
    ANY_PORTS,
    RawHTTP,
    config_on,
    connect_sse,
    connect_ws,
    free_port,
    keepalive_get,
    plain_bind,
)
from trainstream.embedded import StreamServerManager
from trainstream.errors import (
    ConfigConflictError,
    PortInUseError,
    ReactorThreadError,
    TrainstreamError,
)
from trainstream.server import StreamServer


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def publish_answer_of(server: StreamServer, megabytes: float) -> int:
    """
    Publish log events worth about ``megabytes`` of ``/api/events`` answer,
    at most 10,000 (one page); returns the id just before the first.
    """
    size = min(int(megabytes * 1024 * 1024 / 10_000) - 70, 60_000)
    event = {"type": "log", "run": "r", "time": 1.0, "level": "info", "message": "x" * size}
    _, first, _ = server.hub.accept([dict(event) for _ in range(10_000)])
    return first - 1


def stalled_get(port: int, request: bytes) -> socket.socket:
    """
    Send ``request`` from a socket with a small receive buffer that never
    reads (a plain blocking socket: connecting to a listening loopback port
    and sending one short request need no reactor turn).
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def received(s: socket.socket) -> int:
    """Bytes waiting, unread, in the receive queue of ``s``."""
    return int(struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


def twisted_buffered(server: StreamServer) -> int:
    """Bytes Twisted itself still holds for the open connections of ``server``."""
    return sum(
        len(w.transport.dataBuffer) - w.transport.offset + w.transport._tempDataLen
        for listener in server.listeners
        for w in listener.factory.protocols
    )


def handed_to_kernel(server: StreamServer, clients: list[socket.socket]) -> bool:
    """Every client has the start of its answer, and Twisted holds none of it any more."""
    return all(received(c) > 0 for c in clients) and twisted_buffered(server) == 0


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Wait, looking every 10 ms, for ``condition``; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await deferLater(reactor, 0.01)


def read_answer(s: socket.socket) -> tuple[bytes, str]:
    """
    Read ``s`` (in a thread) to the end of its answer: everything received,
    and how it ended: "closed" by the server, or "complete" when the client
    knows it has the whole (chunked) HTTP/1.1 answer, or the socket error.
    """
    s.settimeout(10)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data, "closed"
            data += chunk
            if data.startswith(b"HTTP/1.1") and data.endswith(b"\r\n0\r\n\r\n"):
                return data, "complete"
    except OSError as e:
        return data, errno.errorcode.get(e.errno or 0, str(e))


def events_in(answer: bytes) -> int:
    """How many events a whole ``/api/events`` answer holds (0 if cut short)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks = []
        while body:
            size, _, body = body.partition(b"\r\n")
            chunks.append(body[: int(size, 16)])
            body = body[int(size, 16) + 2 :]
        body = b"".join(chunks)
    try:
        return len(json.loads(body)["events"])
    except ValueError:
        return 0


class ReleaseFreesPortsTests(TestCase):
    """PROTOCOL 7: at refcount 0 every port is free when release fires."""

    timeout = 120

    def setUp(self) -> None:
        self.manager = StreamServerManager(reactor)
        self.addCleanup(self.manager.shutdown)

    def test_cycles_with_clients_leave_ports_bindable(self) -> Deferred[None]:
        """
        500 acquire/release cycles on fixed ports with an SSE and a WebSocket
        client attached each time; after each release all three ports bind
        at once without SO_REUSEADDR. Zero failures.
        """
        ports = (free_port(), free_port(), free_port())
        config = config_on(ports)

        async def go() -> None:
            failures: list[str] = []
            for cycle in range(500):
                server = await self.manager.acquire(config)
                sse = await connect_sse(server.urls["sse"])
                ws = await connect_ws(server.urls["ws"])
                await self.manager.release()
                for port in ports:
                    error = plain_bind(port)
                    if error is not None:
                        failures.append(f"cycle {cycle}: port {port}: {error}")
                # Both clients were told politely before the reset.
                await sse.lost
                self.assertTrue(sse.finished_cleanly, sse.raw[-200:])
                was_clean, code, _ = await ws.closed
                self.assertEqual((was_clean, code), (True, 1001))
                await ws.lost
            self.assertEqual(failures, [])
            self.assertEqual(self.manager.refcount, 0)
            self.assertFalse(self.manager.is_server_running())

        return d(go())

    def test_release_with_many_clients_on_each_listener(self) -> Deferred[None]:
        """Ten clients on each role and an idle keep-alive REST connection."""
        ports = (free_port(), free_port(), free_port())

        async def go() -> None:
            server = await self.manager.acquire(config_on(ports))
            sses = [await connect_sse(server.urls["sse"]) for _ in range(10)]
            wss = [await connect_ws(server.urls["ws"]) for _ in range(10)]
            # An idle HTTP/1.1 connection held open after one answer.
            idle = await keepalive_get(ports[2], "/api/health")
            self.assertIn(b'"status":"ok"', idle.raw)
            self.assertEqual(server.clients.counts(), {"sse": 10, "ws": 10})
            await self.manager.release()
            self.assertEqual([plain_bind(p) for p in ports], [None, None, None])
            for c in sses:
                await c.lost
            self.assertTrue(all(s.finished_cleanly for s in sses))
            codes = [(await w.closed)[1] for w in wss]
            self.assertEqual(codes, [1001] * 10)
            await idle.lost
            for w in wss:
                await w.lost

        return d(go())

    def test_http10_answer_ends_by_our_close(self) -> Deferred[None]:
        """
        An HTTP/1.0 answer may be delimited by the close itself, so the server
        still closes it at once (only HTTP/1.1 clients are left to close first).
        """
        ports = (free_port(), free_port(), free_port())

        async def go() -> None:
            await self.manager.acquire(config_on(ports))
            for _ in range(5):
                client = RawHTTP(
                    b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                await TCP4ClientEndpoint(reactor, "127.0.0.1", ports[2]).connect(
                    Factory.forProtocol(lambda c=client: c)  # type: ignore[misc]
                )
                await client.answered
                client.transport.loseConnection()  # as a client that asked for close does
                await client.lost
            old = RawHTTP(b"GET /api/health HTTP/1.0\r\n\r\n")
            await TCP4ClientEndpoint(reactor, "127.0.0.1", ports[2]).connect(
                Factory.forProtocol(lambda: old)
            )
            await old.lost  # the server ended the HTTP/1.0 answer by closing
            self.assertIn(b'"status":"ok"', old.raw)
            await self.manager.release()
            # The HTTP/1.0 close was ours (TIME_WAIT on the REST port is
            # unavoidable there); the SSE and WS ports are untouched by it.
            self.assertEqual([plain_bind(p) for p in ports[:2]], [None, None])

        return d(go())

    def test_connection_close_requests_leave_no_time_wait(self) -> Deferred[None]:
        """
        REST calls with ``Connection: close``: the client, which knows where
        the answer ends, closes first, so no TIME_WAIT is left on our port.
        """
        ports = (free_port(), free_port(), free_port())

        async def go() -> None:
            await self.manager.acquire(config_on(ports))
            for _ in range(5):
                client = RawHTTP(
                    b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                await TCP4ClientEndpoint(reactor, "127.0.0.1", ports[2]).connect(
                    Factory.forProtocol(lambda c=client: c)  # type: ignore[misc]
                )
                await client.answered
                client.transport.loseConnection()
                await client.lost
            await self.manager.release()
            self.assertEqual([plain_bind(p) for p in ports], [None, None, None])

        return d(go())

    async def never_reading_cycles(self, requests: Callable[[StreamServer], list[bytes]]) -> None:
        """
        Five cycles: each request from a client that never reads, the answers
        handed to the kernel (Twisted's own buffer empty), then a release;
        after it all three ports bind at once without SO_REUSEADDR.
        """
        ports = (free_port(), free_port(), free_port())
        failures: list[str] = []
        for cycle in range(5):
            server = await self.manager.acquire(config_on(ports))
            clients = [stalled_get(ports[2], r) for r in requests(server)]
            for c in clients:
                self.addCleanup(c.close)
            await until(partial(handed_to_kernel, server, clients), "answers in the kernel")
            await self.manager.release()
            for port in ports:
                error = plain_bind(port)
                if error is not None:
                    failures.append(f"cycle {cycle}: port {port}: {error}")
            for c in clients:
                c.close()  # (a reset, with unread data: frees what a bug left behind)
        self.assertEqual(failures, [])

    def test_client_that_never_reads_a_large_answer(self) -> Deferred[None]:
        """
        An HTTP/1.0 client asks for a 1.5 MB answer and never reads: all of it
        fits in the kernel's send queue, so a plain close would queue our FIN
        behind it and the closed socket would hold the port in FIN-WAIT-1.
        """

        def requests(server: StreamServer) -> list[bytes]:
            first = publish_answer_of(server, 1.5)
            return [f"GET /api/events?after={first}&limit=10000 HTTP/1.0\r\n\r\n".encode()]

        return d(self.never_reading_cycles(requests))

    def test_client_that_never_reads_a_small_answer(self) -> Deferred[None]:
        """
        HTTP/1.0 clients that never read a small answer nor close: our FIN is
        taken at once, and a closed socket would hold the port in FIN-WAIT-2.
        """

        def requests(server: StreamServer) -> list[bytes]:
            return [
                b"GET /api/health HTTP/1.0\r\n\r\n",
                b"GET /api/events?after=0&limit=20000 HTTP/1.0\r\n\r\n",  # a 400
            ]

        return d(self.never_reading_cycles(requests))

    def test_slow_readers_get_the_whole_answer(self) -> Deferred[None]:
        """
        A close waits for the data, not for a clock: clients that start to
        read a 1.5 MB answer only well after the close grace still get all of
        it, ended by our close (HTTP/1.0) or by the client (Connection: close).
        """

        async def go() -> None:
            server = await self.manager.acquire({**ANY_PORTS, "close_timeout": 0.2})
            port = server.listeners[2].port_number
            assert port is not None
            first = publish_answer_of(server, 1.5)
            path = f"/api/events?after={first}&limit=10000"
            old = stalled_get(port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            new = stalled_get(
                port,
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(),
            )
            for c in (old, new):
                self.addCleanup(c.close)
            await until(partial(handed_to_kernel, server, [old, new]), "answers in the kernel")
            # The clients read late: five close graces after the answers were done.
            await deferLater(reactor, 1.0)
            (old_answer, old_end), (new_answer, new_end) = [
                await deferToThread(read_answer, c) for c in (old, new)
            ]
            self.assertEqual((events_in(old_answer), old_end), (10_000, "closed"))
            self.assertEqual((events_in(new_answer), new_end), (10_000, "complete"))
            new.close()  # the client that asked for close closes first
            await self.manager.release()

        return d(go())

    def test_refcount(self) -> Deferred[None]:
        """The server stops only when the last holder releases."""

        async def go() -> None:
            first = await self.manager.acquire(ANY_PORTS)
            second = await self.manager.acquire()
            self.assertIs(first, second)
            self.assertEqual(self.manager.refcount, 2)
            ports = [listener.port_number for listener in first.listeners]
            await self.manager.release()
            self.assertTrue(self.manager.is_server_running())
            self.assertTrue(all(p is not None and plain_bind(p) is not None for p in ports))
            await self.manager.release()
            self.assertFalse(self.manager.is_server_running())
            self.assertEqual([plain_bind(p) for p in ports if p], [None, None, None])

        return d(go())

    def test_release_too_often(self) -> Deferred[None]:
        async def go() -> None:
            with self.assertRaises(TrainstreamError) as e:
                await self.manager.release()
            self.assertIn("release_stream_server()", str(e.exception))

        return d(go())

    def test_port_in_use(self) -> Deferred[None]:
        """
        A port held by another socket: PortInUseError naming the port and
        endpoint, refcount unchanged, nothing of ours left listening.
        """
        sse_port, rest_port = free_port(), free_port()
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        held = holder.getsockname()[1]
        config = config_on((sse_port, held, rest_port))

        async def go() -> None:
            with self.assertRaises(PortInUseError) as e:
                await self.manager.acquire(config)
            error = e.exception
            self.assertEqual(error.port, held)
            self.assertEqual(error.role, "ws")
            self.assertIn(f"port {held}", str(error))
            self.assertIn(f"tcp:{held}:interface=127.0.0.1", str(error))
            self.assertEqual(self.manager.refcount, 0)
            self.assertFalse(self.manager.is_server_running())
            # The SSE listener, bound before the failure, was closed again.
            self.assertIsNone(plain_bind(sse_port))
            self.assertIsNone(plain_bind(rest_port))
            # And the manager still works once the port is free.
            holder.close()
            server = await self.manager.acquire(config)
            self.assertEqual(self.manager.refcount, 1)
            self.assertEqual(server.listeners[1].port_number, held)

        return d(go())

    def test_any_port_urls(self) -> Deferred[None]:
        """tcp:0 binds free ports and server.urls names the ones bound."""

        async def go() -> None:
            server = await self.manager.acquire(ANY_PORTS)
            bound = {listener.role: listener.port_number for listener in server.listeners}
            self.assertNotIn(0, bound.values())
            self.assertEqual(server.urls["sse"], f"http://127.0.0.1:{bound['sse']}/events")
            self.assertEqual(server.urls["ws"], f"ws://127.0.0.1:{bound['ws']}/ws")
            self.assertEqual(server.urls["rest"], f"http://127.0.0.1:{bound['rest']}/api")
            sse = await connect_sse(server.urls["sse"])
            ws = await connect_ws(server.urls["ws"])
            self.assertEqual(ws.messages[0]["op"], "hello")
            await self.manager.release()
            await sse.lost
            await ws.lost

        return d(go())

    def test_config_conflict(self) -> Deferred[None]:
        async def go() -> None:
            await self.manager.acquire(ANY_PORTS)
            with self.assertRaises(ConfigConflictError) as e:
                await self.manager.acquire({**ANY_PORTS, "keepalive": 3})
            self.assertIn("keepalive: running 15.0, requested 3.0", str(e.exception))
            self.assertEqual(self.manager.refcount, 1)
            await self.manager.release()

        return d(go())

    def test_force_restart_same_ports(self) -> Deferred[None]:
        ports = (free_port(), free_port(), free_port())

        async def go() -> None:
            server = await self.manager.acquire(config_on(ports))
            ws = await connect_ws(server.urls["ws"])
            again = await self.manager.restart()
            self.assertIs(again, server)
            self.assertEqual((await ws.closed)[1], 1001)
            self.assertEqual([listener.port_number for listener in server.listeners], list(ports))
            self.assertEqual(self.manager.refcount, 1)
            await ws.lost
            await self.manager.release()

        return d(go())

    def test_blocking_call_in_reactor_thread(self) -> None:
        """A blocking form called from the reactor thread fails at once, clearly."""
        with self.assertRaises(ReactorThreadError) as e:
            self.manager.get(ANY_PORTS)
        self.assertIn("get_stream_server()", str(e.exception))
        self.assertIn("manager.acquire(config)", str(e.exception))
        self.assertEqual(self.manager.refcount, 0)


class ThreadedRefcountTests(TestCase):
    """Acquire/release in random order from 16 threads."""

    timeout = 600

    def test_random_threads(self) -> Deferred[None]:
        manager = StreamServerManager(reactor)
        self.addCleanup(manager.shutdown)
        snapshots: list[tuple[int, bool]] = []

        def snapshot() -> None:
            snapshots.append((manager.refcount, manager.is_server_running()))

        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(st.lists(st.lists(st.booleans(), max_size=8), min_size=16, max_size=16))
        def scenario(plans: list[list[bool]]) -> None:
            errors: list[BaseException] = []

            def worker(plan: list[bool]) -> None:
                held = 0
                try:
                    for acquire in plan:
                        if acquire:
                            server = manager.get(ANY_PORTS)
                            held += 1
                            # While we hold it, it runs.
                            assert server.listening, "acquired a server that is not listening"
                        elif held:
                            manager.put()
                            held -= 1
                        reactor.callFromThread(snapshot)
                    for _ in range(held):
                        manager.put()
                except BaseException as e:  # reported below, in the test thread
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            assert manager.refcount == 0, manager.refcount
            assert not manager.is_server_running()

        def check(_: object) -> None:
            self.assertTrue(snapshots)
            inconsistent = [s for s in snapshots if (s[0] > 0) != s[1]]
            self.assertEqual(inconsistent, [])

        return deferToThread(scenario).addCallback(check)
