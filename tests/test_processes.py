"""
trainstream as people run it: ``twistd -n trainstream`` in its own process,
and ``import trainstream`` in a plain script (reactor in crochet's thread).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.clients import PLAIN_BIND_SOURCE, connect_sse, connect_ws, plain_bind

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def child_env() -> dict[str, str]:
    """Run the children on this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def script_result(
    source: str, *args: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """
    Run ``python -c source args`` (this tree on its path) and read the JSON
    of its ``RESULT`` line (``{}`` when there is none: check the return code).
    """
    result = subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    return result, {} if line is None else json.loads(line[len("RESULT ") :])


class Twistd(ProcessProtocol):
    """Collects a twistd child's output; says when it listens and when it ends."""

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.listening.called and b"trainstream listening" in self.output:
            self.listening.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(code)


def spawn_twistd(test: TestCase, *args: str) -> Twistd:
    proto = Twistd()
    workdir = test.mktemp()
    os.makedirs(workdir)
    transport = reactor.spawnProcess(
        proto,
        TWISTD,
        [TWISTD, "-n", "--pidfile=", "trainstream", *args],
        env=child_env(),
        path=workdir,
    )

    def kill() -> Deferred[Any] | None:
        if proto.ended.called:
            return None
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        return proto.ended

    test.addCleanup(kill)
    return proto


class TwistdTests(TestCase):
    timeout = 60

    def test_serves_demo_and_frees_ports_on_sigterm(self) -> Deferred[None]:
        """
        ``twistd -n trainstream --demo`` serves health and live demo events on
        every listener; on SIGTERM it closes the clients and exits (by
        SIGTERM, as twistd does), and the ports bind again at once without
        SO_REUSEADDR.
        """
        ports_file = os.path.abspath(self.mktemp())
        pool = HTTPConnectionPool(reactor, persistent=False)

        async def go() -> None:
            proto = spawn_twistd(
                self,
                "--memory",
                "--demo",
                "--sse=tcp:0:interface=127.0.0.1",
                "--ws=tcp:0:interface=127.0.0.1",
                "--rest=tcp:0:interface=127.0.0.1",
                f"--ports-file={ports_file}",
            )
            await proto.listening
            with open(ports_file) as f:
                urls = json.load(f)
            response = await treq.get(urls["rest"] + "/health", pool=pool)
            health = json.loads(await response.text())
            self.assertEqual(health["status"], "ok")
            sse = await connect_sse(urls["sse"])
            ws = await connect_ws(urls["ws"])
            ws.send_json({"op": "subscribe", "runs": ["demo-*"], "types": ["metric"]})
            await sse.wait_for(3)
            await ws.wait_for("event", 3)
            names = {e["name"] for e in sse.events if e["type"] == "metric"}
            self.assertTrue({"train/loss", "train/accuracy", "train/lr"} & names, names)
            os.kill(proto_pid(proto), signal.SIGTERM)
            code = await proto.ended
            # twistd ends by re-raising the signal it stopped for, after shutdown.
            self.assertEqual(
                (code, proto.signal), (None, signal.SIGTERM), proto.output.decode(errors="replace")
            )
            await sse.lost
            self.assertTrue(sse.finished_cleanly)
            last = [e for e in sse.events if e["type"] == "status"][-1]
            self.assertEqual(last["state"], "paused", last)  # not left "running" for good
            self.assertEqual((await ws.closed)[1], 1001)
            await ws.lost
            ports = [
                int(u.split(":")[2].split("/")[0]) for u in (urls["sse"], urls["ws"], urls["rest"])
            ]
            self.assertEqual([plain_bind(p) for p in ports], [None, None, None])

        return Deferred.fromCoroutine(go())

    def test_port_in_use_exits_with_clear_message(self) -> Deferred[None]:
        import socket

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        held = holder.getsockname()[1]

        async def go() -> None:
            proto = spawn_twistd(
                self,
                "--memory",
                f"--sse=tcp:{held}:interface=127.0.0.1",
                "--ws=tcp:0:interface=127.0.0.1",
                "--rest=tcp:0:interface=127.0.0.1",
            )
            proto.listening.addErrback(lambda _: None)
            code = await proto.ended
            text = proto.output.decode(errors="replace")
            self.assertNotEqual(code, 0)
            self.assertIn(f"cannot listen for sse on port {held}", text)
            self.assertIn(f"tcp:{held}:interface=127.0.0.1", text)
            self.assertNotIn("Traceback", text)

        return Deferred.fromCoroutine(go())

    def test_busy_second_or_third_port_exits_with_clear_message(self) -> Deferred[None]:
        """
        Whichever listener's port is held (here the WebSocket's, then the
        REST one, bound after others succeeded), twistd exits non-zero within
        seconds with the message the first listener gets, instead of hanging.
        """
        import socket
        import time

        async def go() -> None:
            for role in ("ws", "rest"):
                holder = socket.socket()
                holder.bind(("127.0.0.1", 0))
                holder.listen(1)
                self.addCleanup(holder.close)
                held = holder.getsockname()[1]
                endpoints = {r: "tcp:0:interface=127.0.0.1" for r in ("sse", "ws", "rest")}
                endpoints[role] = f"tcp:{held}:interface=127.0.0.1"
                started = time.monotonic()
                args = [f"--{r}={e}" for r, e in endpoints.items()]
                proto = spawn_twistd(self, "--memory", *args)
                proto.listening.addErrback(lambda _: None)
                code = await proto.ended.addTimeout(10, reactor)
                elapsed = time.monotonic() - started
                text = proto.output.decode(errors="replace")
                self.assertNotEqual(code, 0, text)
                self.assertIn(f"cannot listen for {role} on port {held}", text)
                self.assertIn(f"tcp:{held}:interface=127.0.0.1", text)
                self.assertIn(f"--{role} tcp:0 picks a free port", text)
                self.assertNotIn("Traceback", text)
                self.assertLess(elapsed, 5.0, text)

        return Deferred.fromCoroutine(go())


def proto_pid(proto: Twistd) -> int:
    pid = proto.transport.pid if proto.transport is not None else None
    assert isinstance(pid, int)
    return pid


class TwistdCommandLineTests(SynchronousTestCase):
    def run_twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TWISTD, *args], capture_output=True, text=True, env=child_env(), timeout=60
        )

    def test_help_lists_plugin(self) -> None:
        result = self.run_twistd("--help")
        self.assertIn("trainstream", result.stdout)

    def test_bad_options_are_named(self) -> None:
        result = self.run_twistd("-n", "--pidfile=", "trainstream", "--keepalive=-1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("keepalive", result.stdout + result.stderr)
        result = self.run_twistd(
            "-n", "--pidfile=", "trainstream", "--token-file=/nonexistent/token"
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("/nonexistent/token", result.stdout + result.stderr)


class OptionNameTests(SynchronousTestCase):
    """A long option is only ever selected by its whole name."""

    def parse(self, *args: str) -> Any:
        from trainstream.tap import Options

        options = Options()
        options.parseOptions(list(args))
        return options

    def test_prefix_is_refused(self) -> None:
        from twisted.python import usage

        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--port=8888")
        self.assertIn("unknown option --port", str(caught.exception))
        self.assertIn("--ports-file", str(caught.exception))
        with self.assertRaises(usage.UsageError):
            self.parse("--mem")
        with self.assertRaises(usage.UsageError):
            self.parse("--no-such-option", "x")

    def test_whole_names_work(self) -> None:
        options = self.parse("--memory", "--ports-file=p.json", "--allow-origin", "http://a")
        self.assertTrue(options.config.memory)
        self.assertEqual(options.config.ports_file, "p.json")
        self.assertEqual(options.config.allow_origin, ("http://a",))

    def test_twistd_says_which(self) -> None:
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "trainstream", "--port=8888"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("unknown option --port", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)


EMBEDDED = PLAIN_BIND_SOURCE + textwrap.dedent(
    """
    import json, socket, sys, threading, time
    import trainstream


    def port_of(url):
        return int(url.split(":")[2].split("/")[0])

    config = json.loads(sys.argv[1])
    manager = trainstream.get_stream_server_manager()
    out = {}
    server = trainstream.get_stream_server(config)
    out["refcount_1"] = manager.refcount
    out["same"] = trainstream.get_stream_server() is server
    out["refcount_2"] = manager.refcount
    ports = [port_of(server.urls[k]) for k in ("sse", "ws", "rest")]

    sse = socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
    sse.sendall(b"GET /events?type=metric HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n"
                b"Accept: text/event-stream\\r\\n\\r\\n")
    data = b""
    while b"retry:" not in data:
        data += sse.recv(65536)

    run = server.run("embedded", hparams={"lr": 0.1})
    def train(i):
        for step in range(100):
            run.log({f"t{i}/loss": 1.0 / (step + 1)}, step=step)
    threads = [threading.Thread(target=train, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    run.flush()
    deadline = time.monotonic() + 20
    while data.count(b"event: metric") < 400 and time.monotonic() < deadline:
        data += sse.recv(65536)
    out["metric_events"] = data.count(b"event: metric")

    import crochet
    @crochet.run_in_reactor
    def from_reactor_thread():
        try:
            trainstream.get_stream_server()
        except trainstream.ReactorThreadError as e:
            return str(e)
        return "no error"
    out["reactor_thread_error"] = from_reactor_thread().wait(10)

    trainstream.release_stream_server()
    out["running_after_first_release"] = manager.is_server_running()
    trainstream.release_stream_server()
    out["running_after_second_release"] = manager.is_server_running()
    out["binds"] = [plain_bind(p) for p in ports]
    sse.close()

    fixed = dict(config, sse=f"tcp:{ports[0]}:interface=127.0.0.1",
                 ws=f"tcp:{ports[1]}:interface=127.0.0.1",
                 rest=f"tcp:{ports[2]}:interface=127.0.0.1")
    restarts = 0
    for _ in range(20):
        with trainstream.serve(fixed) as again:
            restarts += again.listening
    out["restarts"] = restarts
    out["binds_after_restarts"] = [plain_bind(p) for p in ports]

    class TrainingSystem:  # the seed's own call shape
        def parent(self):
            return self
    seed = trainstream.get_stream_server(training_system=TrainingSystem().parent(), config=fixed)
    out["seed_call_listening"] = seed.listening
    trainstream.release_stream_server()
    out["binds_after_seed_call"] = [plain_bind(p) for p in ports]
    try:
        trainstream.get_stream_server({"no_such_option": 1})
    except trainstream.ConfigError as e:
        out["config_error"] = str(e)
    print("RESULT " + json.dumps(out))
    """
)


INTERRUPTED = textwrap.dedent(
    """
    import json, signal, sys, threading, time
    import trainstream
    from trainstream.embedded import StreamServerManager, ensure_reactor_thread

    config = json.loads(sys.argv[1])
    out = {}
    ensure_reactor_thread()

    class Watched(StreamServerManager):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.started = threading.Event()

        async def _acquire(self, config):
            from twisted.internet import reactor
            from twisted.internet.task import deferLater
            await deferLater(reactor, 0.5, lambda: None)  # the caller stops waiting first
            server = await super()._acquire(config)
            self.started.set()
            return server

    def settled(manager):
        # the start the interrupted call asked for completes, then is released
        out.setdefault("started", []).append(manager.started.wait(30))
        deadline = time.monotonic() + 5
        while (manager.refcount or manager._server is not None) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [manager.refcount, manager._server is not None]

    # get() gives up waiting (a timeout) while the server starts
    slow = Watched(timeout=0.0001)
    try:
        slow.get(config)
        out["timeout"] = "returned"
    except Exception as e:
        out["timeout"] = type(e).__name__
    out["after_timeout"] = settled(slow)

    # Ctrl-C in the main thread while get() waits for the start
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGALRM, interrupt)
    ctrl_c = Watched()
    signal.setitimer(signal.ITIMER_REAL, 0.001)
    try:
        ctrl_c.get(config)
        out["ctrl_c"] = "returned"
    except KeyboardInterrupt:
        out["ctrl_c"] = "KeyboardInterrupt"
    out["after_ctrl_c"] = settled(ctrl_c)
    # and the process-wide manager starts and stops as ever afterwards
    with trainstream.serve(config) as server:
        out["serves_after"] = server.listening
    print("RESULT " + json.dumps(out))
    """
)


class InterruptedGetTests(SynchronousTestCase):
    def test_an_interrupted_get_leaves_no_server_held(self) -> None:
        """
        Ctrl-C or a timeout while get_stream_server() waits: the start goes
        on in the reactor, and what it held is released once started, so
        the ports are not kept for a caller that never got the server.
        """
        config = {"listen": "tcp:0:interface=127.0.0.1", "memory": True}
        result, out = script_result(INTERRUPTED, json.dumps(config))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(out["timeout"], "TimeoutError")
        self.assertEqual(out["after_timeout"], [0, False])
        self.assertEqual(out["ctrl_c"], "KeyboardInterrupt")
        self.assertEqual(out["after_ctrl_c"], [0, False])
        self.assertEqual(out["started"], [True, True])
        self.assertTrue(out["serves_after"])


class EmbeddedTests(SynchronousTestCase):
    def test_embedded_script(self) -> None:
        """
        A plain script: get_stream_server() starts the reactor thread and
        binds, run.log() from four threads reaches an SSE client, a blocking
        call from the reactor thread fails clearly, release frees every port,
        twenty restarts on the same ports succeed, and the process exits.
        """
        config = {
            "sse": "tcp:0:interface=127.0.0.1",
            "ws": "tcp:0:interface=127.0.0.1",
            "rest": "tcp:0:interface=127.0.0.1",
            "memory": True,
        }
        result, out = script_result(EMBEDDED, json.dumps(config))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual((out["refcount_1"], out["refcount_2"], out["same"]), (1, 2, True))
        self.assertEqual(out["metric_events"], 400)
        self.assertIn("cannot be called from the reactor thread", out["reactor_thread_error"])
        self.assertTrue(out["running_after_first_release"])
        self.assertFalse(out["running_after_second_release"])
        self.assertEqual(out["binds"], [None, None, None])
        self.assertEqual(out["restarts"], 20)
        self.assertEqual(out["binds_after_restarts"], [None, None, None])
        self.assertTrue(out["seed_call_listening"])
        self.assertEqual(out["binds_after_seed_call"], [None, None, None])
        self.assertIn("unknown config key 'no_such_option'", out["config_error"])
