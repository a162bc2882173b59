"""
The manager's lifecycle on real loopback sockets: ports are free the moment a
release returns, even for a bind without SO_REUSEADDR.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
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
from trainstream.errors import (
    ConfigConflictError,
    PortInUseError,
    ReactorThreadError,
    TrainstreamError,
)
from trainstream.manager import StreamServerManager


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


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
