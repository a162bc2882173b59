"""
``--config FILE`` (``trainstream.configfile``): every option in TOML,
checked with one clear line; options given to the server win over the
file; a reload (SIGHUP, ``POST /api/config/reload``) applies what can
change live without dropping a client, refuses a bad file keeping the old
config, and bumps ``config_version``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.faultkit import wait_until
from tests.test_processes import TWISTD, child_env
from tests.test_server import Reactor
from tests.webtools import Connection
from trainstream.config import Config
from trainstream.configfile import effective, load_file, reload
from trainstream.errors import ConfigError
from trainstream.server import StreamServer
from trainstream.store.service import RetentionService
from trainstream.tap import Options


def write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class LoadTests(SynchronousTestCase):
    def path(self, text: str) -> str:
        return write(os.path.abspath(self.mktemp()) + ".toml", text)

    def test_every_kind_of_option(self) -> None:
        path = self.path(
            'listen = "tcp:0"\nmemory = true\nstall-after = 30\n'
            'allow_origin = ["https://a.example"]\nport_fallback = 3\nlag_warn = 0.2\n'
        )
        config = effective(Config(config=path))
        self.assertEqual(config.listen, "tcp:0")
        self.assertTrue(config.memory)
        self.assertEqual(config.stall_after, 30.0)
        self.assertEqual(config.allow_origin, ("https://a.example",))
        self.assertEqual((config.port_fallback, config.lag_warn), (3, 0.2))
        self.assertEqual(config.config, path)

    def assert_refused(self, text: str, *expected: str) -> None:
        path = self.path(text)
        with self.assertRaises(ConfigError) as caught:
            load_file(path)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(repr(path), message)
        for part in expected:
            self.assertIn(part, message)

    def test_refused(self) -> None:
        self.assert_refused('tokn = "x"\n', "unknown key 'tokn'", "known keys:", "token")
        self.assert_refused('stall_after = "soon"\n', "key 'stall_after'", "a positive number")
        self.assert_refused("memory = 1\n", "key 'memory'", "true or false")
        self.assert_refused("port_fallback = -1\n", "key 'port_fallback'", "0 to 1000")
        self.assert_refused("listen = \n", "not valid TOML", "line 1")
        self.assert_refused('config = "other.toml"\n', "cannot name another")
        self.assert_refused("[server]\nlisten = 'tcp:0'\n", "unknown key 'server'")

    def test_unreadable(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_file("/nonexistent/ts.toml")
        self.assertIn("cannot read it", str(caught.exception))

    def test_given_options_win(self) -> None:
        path = self.path('listen = "tcp:1234"\nstall_after = 30\n')
        config = effective(Config(config=path, stall_after=99))
        self.assertEqual((config.listen, config.stall_after), ("tcp:1234", 99.0))

    def test_twistd_refuses_a_bad_file_in_one_line(self) -> None:
        path = self.path("stall_after = -3\n")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config", path])
        self.assertIn("key 'stall_after'", str(caught.exception))
        options = Options()
        options.parseOptions(["--config", self.path("stall_after = 3\n"), "--port-fallback", "2"])
        config = effective(options.config)
        self.assertEqual((config.stall_after, config.port_fallback), (3.0, 2))


class ReloadTests(SynchronousTestCase):
    """A reload of a server on a memory reactor."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp()) + ".toml"
        write(self.path, 'listen = "tcp:8890:interface=127.0.0.1"\nmemory = true\ntoken = "one"\n')
        self.reactor = Reactor()
        self.server = StreamServer({"config": self.path}, self.reactor)
        self.successResultOf(self.server.start())
        self.addCleanup(lambda: self.successResultOf(self.server.stop()))

    def request(self, method: str, path: str, token: str | None = None) -> tuple[int, Any]:
        """One request through the real ``Site`` (its token check), over a StringTransport."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if method == "POST":
            headers["Content-Type"] = "application/json"
        connection = Connection(self.server.site, role="listen", port=8890)
        self.reactor.advance(0)
        response = connection.request(method, path, headers, b"[]" if method == "POST" else b"")
        connection.close()
        return response.code, response.json()

    def test_live_options_change(self) -> None:
        write(
            self.path,
            'listen = "tcp:8890:interface=127.0.0.1"\nmemory = true\ntoken = "two"\n'
            'read_token = ["reader"]\nstall_after = 7\nclient_buffer = 4096\n'
            'allow_origin = "https://lab.example"\nlag_warn = 2\n',
        )
        self.assertEqual(self.request("GET", "/api/runs", "one")[0], 200)
        done = reload(self.server)
        self.assertTrue(done.ok, done.message)
        self.assertEqual(
            set(done.changed),
            {"token", "read_token", "stall_after", "client_buffer", "allow_origin", "lag_warn"},
        )
        self.assertEqual(done.kept, ())
        self.assertEqual(self.request("GET", "/api/runs", "one")[0], 401)
        self.assertEqual(self.request("GET", "/api/runs", "two")[0], 200)
        self.assertEqual(self.request("GET", "/api/runs", "reader")[0], 200)
        self.assertEqual(self.server.runs.stall_after, 7.0)
        self.assertEqual(self.server.monitoring.lag.warn, 2.0)
        root: Any = self.server.site.resource
        self.assertEqual(root.sse.buffer_bytes, 4096)
        self.assertEqual(self.server.config.token, "two")
        self.assertEqual(self.request("GET", "/api/health")[1]["config_version"], 2)
        # A token is named, never shown, in what a log shows.
        self.assertNotIn("two", done.message)

    def test_bad_file_keeps_the_old_config(self) -> None:
        write(self.path, 'token = "two"\nstall_after = "soon"\n')
        done = reload(self.server)
        self.assertFalse(done.ok)
        self.assertIn("key 'stall_after'", done.message)
        self.assertIn("the running config is kept", done.message)
        self.assertEqual(self.request("GET", "/api/runs", "one")[0], 200)
        self.assertEqual(self.request("GET", "/api/health")[1]["config_version"], 1)
        self.flushLoggedErrors()

    def test_what_cannot_change_live_is_kept(self) -> None:
        write(self.path, 'listen = "tcp:9999"\nmemory = true\ntoken = "one"\nstall_after = 5\n')
        done = reload(self.server)
        self.assertTrue(done.ok)
        self.assertEqual(done.changed, ("stall_after",))
        self.assertEqual(done.kept, ("listen",))
        self.assertIn("listen changed, but cannot change while running", done.message)
        self.assertEqual(self.server.config.listen, "tcp:8890:interface=127.0.0.1")

    def test_rest_reload(self) -> None:
        write(
            self.path,
            'listen = "tcp:8890:interface=127.0.0.1"\nmemory = true\ntoken = "one"\n'
            'read_token = "reader"\n',
        )
        code, body = self.request("POST", "/api/config/reload", "one")
        self.assertEqual(code, 200, body)
        self.assertEqual((body["config_version"], body["changed"]), (2, ["read_token"]))
        code, body = self.request("POST", "/api/config/reload", "reader")
        self.assertEqual(code, 403, body)
        self.assertEqual(self.request("POST", "/api/config/reload")[0], 401)
        write(self.path, "memory = maybe\n")
        code, body = self.request("POST", "/api/config/reload", "one")
        self.assertEqual(code, 400, body)
        self.assertIn("not valid TOML", body["error"])
        self.assertEqual(self.request("GET", "/api/health")[1]["config_version"], 2)
        self.flushLoggedErrors()

    def test_rest_reload_without_a_file_is_404(self) -> None:
        self.server.config = attrs.evolve(self.server.config, config=None)
        code, body = self.request("POST", "/api/config/reload", "one")
        self.assertEqual(code, 404, body)
        self.assertIn("--config", body["error"])


def get(url: str, token: str | None, method: str = "GET") -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if method == "POST":
            headers["Content-Type"] = "application/json"
        conn.request(
            method,
            parts.path + (f"?{parts.query}" if parts.query else ""),
            b"[]" if method == "POST" else None,
            headers,
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


class TwistdReloadTests(SynchronousTestCase):
    """A real ``twistd trainstream --config``, reloaded by SIGHUP."""

    def test_sighup(self) -> None:
        if not hasattr(signal, "SIGHUP"):  # pragma: no cover - Windows
            raise AssertionError("this test needs SIGHUP")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "trainstream.toml")
        ports_file = os.path.join(directory, "ports.json")
        base = f'listen = "tcp:0:interface=127.0.0.1"\nmemory = true\nports_file = "{ports_file}"\n'
        write(config, base + 'token = "old-token"\n')
        log = os.path.join(directory, "server.log")
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "trainstream", "--config", config],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd=directory,
            )

        def stop() -> None:
            if process.poll() is None:
                process.kill()
            process.wait(10)

        self.addCleanup(stop)

        def output() -> str:
            with open(log, "rb") as f:
                return f.read().decode(errors="replace")

        def bound() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"twistd ended ({process.returncode}): {output()}")
            return os.path.exists(ports_file)

        wait_until(bound, 30, "twistd binding")
        with open(ports_file) as f:
            urls = json.load(f)
        rest = urls["rest"]
        self.assertEqual(get(rest + "/runs", "old-token")[0], 200)
        # An SSE client, connected with the old token, before the reload.
        parts = urlsplit(urls["sse"])
        stream = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        self.addCleanup(stream.close)
        stream.request(
            "GET", parts.path + "?token=old-token&run=r", headers={"Accept": "text/event-stream"}
        )
        response = stream.getresponse()
        self.assertEqual(response.status, 200)

        write(config, base + 'token = "new-token"\nstall_after = 33\n')
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: get(rest + "/runs", "new-token")[0] == 200, 10, "the new token works")
        self.assertEqual(get(rest + "/runs", "old-token")[0], 401)
        health = get(rest + "/health", None)[1]
        self.assertEqual(health["config_version"], 2)
        self.assertEqual(health["clients"]["sse"], 1)  # still connected
        # ... and still receiving: an event published after the reload.
        parts_rest = urlsplit(rest)
        conn = http.client.HTTPConnection(parts_rest.hostname, parts_rest.port, timeout=10)
        body = json.dumps([{"type": "log", "run": "r", "level": "info", "message": "after-reload"}])
        conn.request(
            "POST",
            "/api/events",
            body,
            {"Content-Type": "application/json", "Authorization": "Bearer new-token"},
        )
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        deadline = time.monotonic() + 10
        seen = b""
        while b"after-reload" not in seen and time.monotonic() < deadline:
            line = response.fp.readline()
            if not line:
                break
            seen += line
        self.assertIn(b"after-reload", seen)

        # An invalid edit: refused, said why, the old config kept.
        write(config, base + 'token = "newer"\nstall_after = "soon"\n')
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reload refused" in output(), 10, "the refusal")
        self.assertIn("key 'stall_after'", output())
        self.assertEqual(get(rest + "/runs", "new-token")[0], 200)
        self.assertEqual(get(rest + "/health", None)[1]["config_version"], 2)
        # The REST reload, once the file is right again.
        write(config, base + 'token = "new-token"\n')
        code, answer = get(rest + "/config/reload", "new-token", "POST")
        self.assertEqual(code, 200, answer)
        self.assertEqual(answer["config_version"], 3)
        self.assertEqual(answer["changed"], ["stall_after"])
        self.assertNotIn("new-token", output())
        self.assertNotIn("Traceback", output())


class RetentionReloadTests(TestCase):
    """Retention on a SQLite history: started, then changed, by reloads."""

    async def test_retention(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "ts.toml")
        db = os.path.join(directory, "h.sqlite3")
        base = f'listen = "tcp:0:interface=127.0.0.1"\ndb = "{db}"\n'
        write(path, base)
        server = StreamServer({"config": path}, reactor)
        await server.start()
        self.addCleanup(server.stop)

        def retention() -> list[RetentionService]:
            return [s for s in server if isinstance(s, RetentionService)]

        self.assertEqual(retention(), [])
        write(path, base + "retain_days = 3\n")
        self.assertEqual(reload(server).changed, ("retain_days",))
        [service] = retention()
        self.assertTrue(service.running)
        self.assertEqual((service.retain_days, service.max_db_mb), (3.0, None))
        write(path, base + "retain_days = 1.5\nmax_db_mb = 100\n")
        self.assertEqual(set(reload(server).changed), {"retain_days", "max_db_mb"})
        self.assertEqual(retention(), [service])
        self.assertEqual((service.retain_days, service.max_db_mb), (1.5, 100.0))
