"""
The server as composed services, without sockets: a memory reactor binds
the listeners, so what is checked is the order of things, not the network.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from trainstream.errors import PortInUseError
from trainstream.server import StreamServer, makeService
from trainstream.store.sqlite import SQLiteStore

THREE = {
    "sse": "tcp:8888:interface=127.0.0.1",
    "ws": "tcp:8889:interface=127.0.0.1",
    "rest": "tcp:8890:interface=127.0.0.1",
}


class Reactor(MemoryReactorClock):
    """A memory reactor whose ``callFromThread`` runs at once, and whose ports may be busy."""

    def __init__(self, busy: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.busy = busy

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


def stopped_ports(reactor: Reactor) -> list[bool]:
    return [p._stopped if hasattr(p, "_stopped") else False for p in reactor.tcpServers]


class ComposedServiceTests(SynchronousTestCase):
    def test_constructing_does_no_io(self) -> None:
        """Nothing opens, binds or spawns until the service starts."""
        directory = os.path.abspath(self.mktemp())
        db = os.path.join(directory, "history.sqlite3")
        reactor = Reactor()
        server = makeService({**THREE, "db": db}, reactor)
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(
            [s.name for s in server], ["history", "listeners", "runs", "ranks", "monitoring"]
        )
        self.successResultOf(server.start())
        self.assertTrue(os.path.exists(db))
        self.assertEqual([p[0] for p in reactor.tcpServers], [8888, 8889, 8890])
        self.successResultOf(server.stop())

    def test_stop_publishes_what_run_log_queued(self) -> None:
        """Events queued by ``run.log`` and not yet published are stored by a stop."""
        reactor = Reactor()
        server = StreamServer({**THREE, "memory": True}, reactor)
        self.successResultOf(server.start())
        run = server.run("r")
        run.log({"loss": 0.5}, step=1)
        run.log({"loss": 0.25}, step=2)
        before = [r.event.get("value") for r in server.store.after(0, lambda r: r.type == "metric")]
        self.assertEqual(before, [])  # still queued: the publish is 50 ms away
        self.successResultOf(server.stop())
        after = [r.event["value"] for r in server.store.after(0, lambda r: r.type == "metric")]
        self.assertEqual(after, [0.5, 0.25])

    def test_failed_start_releases_everything(self) -> None:
        """
        A busy third port: the start fails naming it, the two ports bound
        before it are closed, and the history file is released.
        """
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        reactor = Reactor(busy=frozenset({8890}))
        server = StreamServer({**THREE, "db": db}, reactor)
        failure = self.failureResultOf(server.start(), PortInUseError)
        self.assertIn("cannot listen for rest on port 8890", str(failure.value))
        self.assertFalse(server.listening)
        self.assertEqual(len(reactor.tcpServers), 2)
        # The file is free: another store opens it at once.
        again = SQLiteStore(db, reactor.callFromThread)
        again.start()
        again.close()

    def test_twistd_start_exits_with_the_message(self) -> None:
        """Under twistd a failed start is a SystemExit with the message, raised at once."""
        reactor = Reactor(busy=frozenset({8889}))
        server = StreamServer({**THREE, "memory": True}, reactor)
        with self.assertRaises(SystemExit) as caught:
            server.privilegedStartService()
        self.assertIn("trainstream: cannot listen for ws on port 8889", str(caught.exception))
        self.assertIn("--ws tcp:0 picks a free port", str(caught.exception))


class RestartTests(TestCase):
    def test_restart_keeps_history_and_runs(self) -> Deferred[None]:
        """A stopped server starts again on its history (SQLite), with its runs."""
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        server = StreamServer({"listen": "tcp:0:interface=127.0.0.1", "db": db}, reactor)
        self.addCleanup(server.stop)

        async def go() -> None:
            await server.start()
            run = server.run("r")
            run.log({"loss": 1.0}, step=1)
            await server.stop()
            self.assertFalse(server.listening)
            await server.start()
            self.assertIsNotNone(server.runs.get("r"))
            self.assertEqual(server.hub.last_id, 2)  # "created", then the metric
            self.assertEqual(len(server.store.after(0, lambda r: True)), 2)

        return Deferred.fromCoroutine(go())


class ConfigChecksItselfTests(SynchronousTestCase):
    """Whoever builds a Config (a dict, keywords, twistd) gets the same checks."""

    def test_keywords_are_checked(self) -> None:
        from trainstream.config import Config
        from trainstream.errors import ConfigError

        nan, inf = float("nan"), float("inf")
        for bad in (
            {"keepalive": -1},
            {"keepalive": nan},  # NaN once passed "> 0" and broke every SSE stream
            {"close_timeout": inf},
            {"stall_after": nan},
            {"retain_days": inf},
            {"retry_ms": 0},
            {"memory": "yes"},
            {"sse": 8888},
            {"db": ":memory:"},  # once: a writer process with a database of its own, all lost
            {"db": ""},
        ):
            with self.assertRaises(ConfigError) as caught:
                Config(**bad)  # type: ignore[arg-type]
            self.assertIn(repr(next(iter(bad))), str(caught.exception))
            with self.assertRaises(ConfigError):
                Config.from_value(bad)
        self.assertEqual(Config(allow_origin="http://a").allow_origin, ("http://a",))
        self.assertEqual(Config(keepalive=3).keepalive, 3.0)

    def test_twistd_options_are_the_config_fields(self) -> None:
        import attrs

        from trainstream.config import Config
        from trainstream.tap import Options

        offered = {p[0] for p in Options.optParameters} | {f[0] for f in Options.optFlags}
        fields = {f.name.replace("_", "-") for f in attrs.fields(Config) if f.metadata["cli"]}
        self.assertEqual(offered, fields)
        for p in Options.optParameters:
            field = attrs.fields_dict(Config)[p[0].replace("-", "_")]
            self.assertEqual((p[2], p[3]), (field.default, field.metadata["help"]))


class EndpointErrorTests(SynchronousTestCase):
    def test_port_out_of_range_is_a_clear_error(self) -> None:
        """``tcp:99999``: bind() refuses the number; the user is told, not shown a traceback."""
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from trainstream.errors import ConfigError
        from trainstream.listeners import ListenerService

        listener = ListenerService("sse", "tcp:99999", Site(Resource()), reactor, 1.0)
        with self.assertRaises(ConfigError) as caught:
            listener.privilegedStartService()
        self.assertIn("--sse 'tcp:99999' is not a usable endpoint", str(caught.exception))
        self.assertIsNone(listener.bound)


class TailOnceTests(SynchronousTestCase):
    def test_unreachable_server_is_one_line(self) -> None:
        """``tail --once`` does not retry; when it cannot reach the server it says so."""
        import socket
        import subprocess
        import sys

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(
            [sys.executable, "-m", "trainstream", "tail", f"http://127.0.0.1:{port}", "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": root},
        )
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(f"cannot reach http://127.0.0.1:{port}: connection refused", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
