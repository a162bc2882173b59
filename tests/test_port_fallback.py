"""
``--port-fallback N`` (embedded: ``port_fallback``): a configured port that
is busy is followed by the next N; the URLs chosen are reported (the
ports file, a log line, ``server.urls``). ``tcp:0`` and non-tcp endpoints
ignore it; when every port tried is busy the error names them all.

Real loopback: the busy port is held by a plain socket bound without
``SO_REUSEADDR`` (as many scripts, and Windows, bind).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.faultkit import call, wait_until
from tests.test_processes import TWISTD, child_env
from trainstream.config import fallback_endpoints
from trainstream.errors import PortInUseError
from trainstream.server import StreamServer


def hold(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1, bound without SO_REUSEADDR."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    return s


def held_run(test: SynchronousTestCase, count: int) -> list[socket.socket]:
    """``count`` consecutive ports, each held; a few tries to find such a run."""
    for _ in range(20):
        first = hold()
        port = first.getsockname()[1]
        held = [first]
        try:
            for k in range(1, count):
                held.append(hold(port + k))
        except OSError:
            for s in held:
                s.close()
            continue
        for s in held:
            test.addCleanup(s.close)
        return held
    raise AssertionError(f"no run of {count} free consecutive ports found")


def free_after(port: int, count: int) -> bool:
    """Whether the ``count`` ports after ``port`` can be bound now."""
    probes = []
    try:
        for k in range(1, count + 1):
            probes.append(hold(port + k))
    except OSError:
        return False
    finally:
        for s in probes:
            s.close()
    return True


def busy_port(test: SynchronousTestCase, then_free: int) -> int:
    """A held port whose next ``then_free`` ports are free (at the time of asking)."""
    for _ in range(20):
        s = hold()
        port: int = s.getsockname()[1]
        if free_after(port, then_free):
            test.addCleanup(s.close)
            return port
        s.close()
    raise AssertionError("no busy port with free ports after it")


class CandidateTests(SynchronousTestCase):
    def test_tcp(self) -> None:
        self.assertEqual(
            fallback_endpoints("tcp:8888:interface=127.0.0.1", 2),
            [
                "tcp:8888:interface=127.0.0.1",
                "tcp:8889:interface=127.0.0.1",
                "tcp:8890:interface=127.0.0.1",
            ],
        )
        self.assertEqual(
            fallback_endpoints("tcp:port=80:interface=::1", 1),
            ["tcp:port=80:interface=::1", "tcp:port=81:interface=::1"],
        )
        self.assertEqual(
            fallback_endpoints("ssl:8443:privateKey=k.pem", 1),
            ["ssl:8443:privateKey=k.pem", "ssl:8444:privateKey=k.pem"],
        )

    def test_ignored(self) -> None:
        """No fallback asked, ``tcp:0`` (any free port), a UNIX socket: the endpoint alone."""
        for description, n in (
            ("tcp:8888", 0),
            ("tcp:0:interface=127.0.0.1", 5),
            ("unix:/tmp/ts.sock", 5),
        ):
            self.assertEqual(fallback_endpoints(description, n), [description])

    def test_never_past_65535(self) -> None:
        self.assertEqual(fallback_endpoints("tcp:65534", 9), ["tcp:65534", "tcp:65535"])


class EmbeddedFallbackTests(TestCase):
    timeout = 60

    async def start(self, config: dict[str, object]) -> StreamServer:
        server = StreamServer({"memory": True, **config}, reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server

    async def test_busy_port_falls_back(self) -> None:
        port = busy_port(self, 3)
        ports_file = os.path.abspath(self.mktemp())
        server = await self.start(
            {
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "port_fallback": 3,
                "ports_file": ports_file,
            }
        )
        bound = server.listeners[0].port_number
        assert bound is not None
        self.assertTrue(port < bound <= port + 3, (port, bound))
        self.assertEqual(server.urls["rest"], f"http://127.0.0.1:{bound}/api")
        with open(ports_file) as f:
            self.assertEqual(json.load(f)["rest"], f"http://127.0.0.1:{bound}/api")
        health = server.status().listeners[0]
        self.assertEqual(health.endpoint, f"tcp:{bound}:interface=127.0.0.1")
        self.assertEqual(health.port, bound)

    async def test_without_fallback_the_busy_port_fails(self) -> None:
        port = busy_port(self, 0)
        server = StreamServer(
            {"memory": True, "listen": f"tcp:{port}:interface=127.0.0.1"}, reactor
        )
        error = await self.assertFailure(server.start(), PortInUseError)
        self.assertIn(f"port {port}", str(error))
        self.assertFalse(server.listening)

    async def test_all_busy(self) -> None:
        held = held_run(self, 3)
        first = held[0].getsockname()[1]
        server = StreamServer(
            {"memory": True, "listen": f"tcp:{first}:interface=127.0.0.1", "port_fallback": 2},
            reactor,
        )
        error = await self.assertFailure(server.start(), PortInUseError)
        message = str(error)
        self.assertIn(f"{first}, {first + 1}, {first + 2}", message)
        self.assertIn("--port-fallback 2", message)
        self.assertEqual(error.port, first)
        self.assertFalse(server.listening)

    async def test_three_roles_shift_together(self) -> None:
        """sse's port busy: sse takes the next, and ws and rest move on past it."""
        port = busy_port(self, 5)
        server = await self.start(
            {
                "sse": f"tcp:{port}:interface=127.0.0.1",
                "ws": f"tcp:{port + 1}:interface=127.0.0.1",
                "rest": f"tcp:{port + 2}:interface=127.0.0.1",
                "port_fallback": 3,
            }
        )
        ports = [li.port_number for li in server.listeners]
        self.assertEqual(ports, [port + 1, port + 2, port + 3])

    async def test_tcp_0_ignores_it(self) -> None:
        server = await self.start({"listen": "tcp:0:interface=127.0.0.1", "port_fallback": 4})
        self.assertEqual(server.listeners[0].description, "tcp:0:interface=127.0.0.1")


class TwistdFallbackTests(SynchronousTestCase):
    def test_twistd_reports_the_port_it_chose(self) -> None:
        port = busy_port(self, 2)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ports_file = os.path.join(directory, "ports.json")
        log = os.path.join(directory, "server.log")
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    TWISTD,
                    "-n",
                    "--pidfile=",
                    "trainstream",
                    "--memory",
                    "--listen",
                    f"tcp:{port}:interface=127.0.0.1",
                    "--port-fallback",
                    "2",
                    "--ports-file",
                    ports_file,
                ],
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
        chosen = int(urls["rest"].rsplit(":", 1)[1].split("/")[0])
        self.assertTrue(port < chosen <= port + 2, (port, chosen))
        status, health = call("GET", urls["rest"] + "/health")
        self.assertEqual(status, 200, health)
        self.assertEqual(health["listeners"]["listen"]["port"], chosen)
        wait_until(lambda: f"port {port} busy" in output(), 10, "the log line")
        self.assertIn(f"on {chosen}", output())
