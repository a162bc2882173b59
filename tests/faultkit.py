"""
Fault tests on real processes: a ``twistd -n trainstream`` child on a
SQLite file, killed and started again; blocking clients in threads (plain
HTTP, a WebSocket client, an SSE reader); and a :class:`Ledger` of what
every client was told, to hold against what the file holds afterwards.

Everything is bounded: each socket has a timeout, each wait a deadline,
each loop a stop flag and a deadline; every process started is killed by
its pid at cleanup, its writer processes too.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import websocket
from twisted.trial.unittest import SynchronousTestCase

from tests.test_processes import TWISTD, child_env
from trainstream.client.sse import SSEParser

LISTEN = "tcp:0:interface=127.0.0.1"
#: Seconds any one socket operation may take.
SOCKET_TIMEOUT = 10.0
#: Seconds a server may take to bind its ports.
START_WITHIN = 30.0

Event = dict[str, Any]


def poll_until(done: Callable[[], bool], within: float) -> bool:
    """Poll ``done`` (every 10 ms) until it is true or ``within`` s passed: whether it is."""
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_until(done: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``done`` until it is true; fail naming ``what`` past ``within`` s."""
    if not poll_until(done, within):
        raise AssertionError(f"{what}: not within {within} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's pid now
        return False
    return True


def _is_writer(pid: int) -> bool:
    """``pid`` is (still) a trainstream writer process, not a pid reused since."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"trainstream.store.writer" in f.read()
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads)."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            continue  # the thread ended meanwhile
    return sorted(set(found))


class Server:
    """
    ``twistd -n trainstream`` on one history file, on ports of its own
    (``tcp:0``, read from ``--ports-file``), started again as often as the
    test likes; its output goes to a file per start.
    """

    def __init__(self, test: SynchronousTestCase, db: str) -> None:
        self.db = db
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir)
        self.ports_file = os.path.join(self.dir, "ports.json")
        self.process: subprocess.Popen[bytes] | None = None
        self.urls: dict[str, str] = {}
        self.starts = 0
        self._writers: set[int] = set()
        test.addCleanup(self.cleanup)

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, f"server-{self.starts}.log")

    def start(self) -> Server:
        """Start the server and wait until every listener is bound."""
        assert self.process is None or self.process.poll() is not None, "already running"
        if os.path.exists(self.ports_file):
            os.unlink(self.ports_file)
        self.starts += 1
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [
                    TWISTD,
                    "-n",
                    "--pidfile=",
                    "trainstream",
                    "--db",
                    self.db,
                    "--rest",
                    LISTEN,
                    "--sse",
                    LISTEN,
                    "--ws",
                    LISTEN,
                    "--ports-file",
                    self.ports_file,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd=self.dir,
                start_new_session=True,
            )
        process = self.process

        def bound() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the server ended ({process.returncode}): {self.output()}")
            return os.path.exists(self.ports_file)

        wait_until(bound, START_WITHIN, f"the server binding its ports ({self.log_path})")
        with open(self.ports_file) as f:
            self.urls = json.load(f)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def rest(self) -> str:
        return self.urls["rest"]

    @property
    def sse(self) -> str:
        return self.urls["sse"]

    @property
    def ws(self) -> str:
        return self.urls["ws"]

    @property
    def metrics(self) -> str:
        return self.urls["dashboard"].rstrip("/") + "/metrics"

    def output(self) -> str:
        """What this start of the server wrote so far."""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def writers(self) -> list[int]:
        """The server's writer processes now (remembered, to kill at cleanup)."""
        found = [p for p in children(self.pid) if _is_writer(p)]
        self._writers.update(found)
        return found

    def kill(self) -> None:
        """
        ``kill -9`` the server (only it: its writer lives on until it sees the
        server gone), then wait for that orphaned writer to end, so the next
        start finds the file as the crash left it.
        """
        process = self.process
        assert process is not None
        orphans = self.writers()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(SOCKET_TIMEOUT)
        wait_until(
            lambda: not any(_alive(p) and _is_writer(p) for p in orphans),
            15,
            f"the writer processes {orphans} ending after the server was killed",
        )

    def terminate(self, within: float) -> int:
        """SIGTERM the server; its exit status once it ends (bounded)."""
        process = self.process
        assert process is not None
        self.writers()
        process.send_signal(signal.SIGTERM)
        return process.wait(within)

    def cleanup(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            self.writers()
            process.kill()
            process.wait(SOCKET_TIMEOUT)
        for pid in self._writers:
            if _alive(pid) and _is_writer(pid):
                os.kill(pid, signal.SIGKILL)


# Plain HTTP, blocking


def _connection(
    url: str, timeout: float = SOCKET_TIMEOUT
) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), path


def call(
    method: str, url: str, body: object = None, timeout: float = SOCKET_TIMEOUT
) -> tuple[int, Any]:
    """One request; the status and the body (JSON decoded when it is JSON)."""
    conn, path = _connection(url, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        if (response.getheader("content-type") or "").startswith("application/json"):
            return response.status, json.loads(raw)
        return response.status, raw.decode(errors="replace")
    finally:
        conn.close()


def stored_events(rest: str) -> dict[int, Event]:
    """Every event ``GET /api/events`` holds, by id (paged)."""
    found: dict[int, Event] = {}
    after = 0
    while True:
        status, body = call("GET", f"{rest}/events?after={after}&limit=10000", timeout=30)
        if status != 200:
            raise AssertionError(f"GET /api/events: {status} {body}")
        events = body["events"]
        if not events:
            return found
        for e in events:
            found[e["id"]] = e
        after = events[-1]["id"]


# What clients were told


def log_events(run: str, token: str, first: int, count: int) -> list[Event]:
    """``count`` log events, each unique (run, step and token in its message)."""
    return [
        {
            "type": "log",
            "run": run,
            "level": "info",
            "message": f"{run} step {i} {token}",
            "time": 1_700_000_000.0 + i,
        }
        for i in range(first, first + count)
    ]


def metric_events(run: str, token: str, first: int, count: int) -> list[Event]:
    """``count`` points of one series named after ``token``, steps from ``first``."""
    return [
        {
            "type": "metric",
            "run": run,
            "name": f"loss/{token}",
            "step": i,
            "value": i / 7,
            "time": 1_700_000_000.0 + i,
        }
        for i in range(first, first + count)
    ]


def _without_id(event: Event) -> Event:
    return {k: v for k, v in event.items() if k != "id"}


class Ledger:
    """
    What the server told clients, from any thread: each acknowledged id
    with the event it acknowledged (REST 200, WebSocket ``ack``), each id
    an SSE stream showed with its event; and what contradicted itself.
    """

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:10]
        self._lock = threading.Lock()
        self.acked: dict[int, Event] = {}
        self.shown: dict[int, Event] = {}
        self.problems: list[str] = []

    def ack(self, who: str, answer: dict[str, Any], events: list[Event]) -> None:
        first, last = answer["first_id"], answer["last_id"]
        with self._lock:
            if answer["accepted"] != len(events) or last - first + 1 != len(events):
                self.problems.append(f"{who}: {len(events)} events acknowledged as {answer}")
                return
            for event_id, event in zip(range(first, last + 1), events, strict=True):
                before = self.acked.get(event_id)
                if before is not None and before != event:
                    self.problems.append(
                        f"{who}: id {event_id} acknowledged twice: for {before} and for {event}"
                    )
                self.acked[event_id] = event

    def show(self, who: str, event: Event) -> None:
        with self._lock:
            event_id = event["id"]
            before = self.shown.get(event_id)
            if before is not None and before != _without_id(event):
                self.problems.append(
                    f"{who}: id {event_id} shown twice: as {before} and as {_without_id(event)}"
                )
            self.shown[event_id] = _without_id(event)

    def problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def top(self) -> int:
        """The highest id any client was told of."""
        with self._lock:
            return max([0, *self.acked, *self.shown])

    def contradictions(self, stored: dict[int, Event]) -> list[str]:
        """What clients were told that ``stored`` (the history now) does not hold."""
        with self._lock:
            problems = list(self.problems)
            for told, what in ((self.acked, "acknowledged"), (self.shown, "shown by SSE")):
                missing = sorted(i for i in told if i not in stored)
                other = sorted(i for i in told if i in stored and _without_id(stored[i]) != told[i])
                if missing:
                    problems.append(
                        f"{len(missing)} of {len(told)} ids {what} are not stored: "
                        f"{_ranges(missing)}"
                    )
                if other:
                    i = other[0]
                    problems.append(
                        f"{len(other)} of {len(told)} ids {what} are stored with another event: "
                        f"{_ranges(other)}; e.g. id {i} was {told[i]}, is {stored[i]}"
                    )
        return problems


def _ranges(ids: Iterable[int]) -> str:
    """``1-5, 9, 12-14``."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = [f"{a}-{b}" if a != b else f"{a}" for a, b in spans]
    return ", ".join(text[:8]) + (", ..." if len(text) > 8 else "")


# Clients in threads


class _Client(threading.Thread):
    """A daemon thread that runs ``loop`` until stopped, the server is gone, or ``within`` s."""

    def __init__(self, name: str, within: float) -> None:
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + within
        self.ended: str | None = None  # why the loop ended, if not by stop()
        self.broken: str | None = None  # an answer it could not take

    @property
    def going(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    def run(self) -> None:
        try:
            self.loop()
        except (OSError, http.client.HTTPException, websocket.WebSocketException) as e:
            if not self.stopping.is_set():  # else: our own shutdown of the socket
                self.ended = f"{type(e).__name__}: {e}"
        except (AssertionError, ValueError, KeyError) as e:  # a bad answer: the test sees it
            self.ended = f"{type(e).__name__}: {e}"
            self.broken = self.ended

    def loop(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop and wait for the thread (bounded)."""
        self.stopping.set()
        self.join(SOCKET_TIMEOUT + 5)
        assert not self.is_alive(), f"{self.name} did not stop"


class Publisher(_Client):
    """
    Publishes batches of unique log or metric events of ``run`` (kinds
    and sizes drawn from ``rng``), one at a time, over REST (``POST /api/events``, keep-alive)
    or WebSocket (``publish``, then its ``ack``); each acknowledged batch
    goes into the ledger. Ends at the first broken connection.
    """

    def __init__(
        self,
        kind: str,
        server: Server,
        run: str,
        ledger: Ledger,
        rng: random.Random,
        max_batch: int = 200,
        within: float = 30,
    ) -> None:
        super().__init__(f"{kind} publisher {run}", within)
        assert kind in ("rest", "ws")
        self.kind = kind
        self.url = server.rest if kind == "rest" else server.ws
        self.run_name = run
        self.ledger = ledger
        self.rng = rng
        self.max_batch = max_batch
        self.acks = 0
        self.refused: list[str] = []
        self._step = 0

    def _batch(self) -> list[Event]:
        count = self.rng.randint(1, self.max_batch)
        make = self.rng.choice((log_events, metric_events))  # steps only go up: no rewind
        events = make(self.run_name, self.ledger.token, self._step, count)
        self._step += count
        return events

    def loop(self) -> None:
        if self.kind == "rest":
            self._rest()
        else:
            self._ws()

    def _rest(self) -> None:
        conn, path = _connection(self.url + "/events")
        try:
            while self.going:
                events = self._batch()
                conn.request(
                    "POST",
                    path,
                    body=json.dumps(events).encode(),
                    headers={"Content-Type": "application/json"},
                )
                response = conn.getresponse()
                body = response.read()
                if response.status == 200:
                    self.ledger.ack(self.name, json.loads(body), events)
                    self.acks += 1
                else:
                    self.refused.append(f"{response.status} {body[:200]!r}")
        finally:
            conn.close()

    def _ws(self) -> None:
        ws = ws_connect(self.url)
        try:
            while self.going:
                events = self._batch()
                ws.send(json.dumps({"op": "publish", "events": events}))
                answer = json.loads(ws.recv())
                if answer.get("op") == "ack":
                    self.ledger.ack(self.name, answer, events)
                    self.acks += 1
                else:
                    self.refused.append(str(answer)[:200])
        finally:
            ws.close(timeout=1)


class SSEReader(_Client):
    """
    Reads ``/events`` (from ``Last-Event-ID: after`` when given) and puts
    each event shown into the ledger (and ``events``); ids must increase
    along the stream. Disconnected for being slow (``overflow``), it
    resumes from its last id, as the notice says to.
    """

    def __init__(self, server: Server, ledger: Ledger, after: int | None, within: float = 60):
        super().__init__(f"SSE reader after {after}", within)
        self.url = server.sse
        self.ledger = ledger
        self.after = after
        self.events: list[Event] = []
        self.notices: list[tuple[str, Event]] = []  # (kind, data): reset, overflow
        self.connected = threading.Event()
        self._sock: socket.socket | None = None

    def loop(self) -> None:
        after = self.after
        while self.going:
            if not self._stream(after) or self.stopping.is_set():
                return
            if not self.notices or self.notices[-1][0] != "overflow":
                self.ended = "the server ended the stream"
                return
            after = self.events[-1]["id"] if self.events else after

    def _stream(self, after: int | None) -> bool:
        """One connection; whether the server ended it."""
        conn, path = _connection(self.url, timeout=max(1.0, self.deadline - time.monotonic()))
        headers = {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        try:
            conn.request("GET", path, headers=headers)
            self._sock = conn.sock
            if self.stopping.is_set():
                return False
            response = conn.getresponse()
            if response.status != 200:
                raise AssertionError(f"GET /events: {response.status} {response.read()!r}")
            self.connected.set()
            parser = SSEParser()
            while self.going:
                data = response.read1(65536)
                if not data:
                    return True
                for message in parser.feed_bytes(data):
                    self._message(message.event, message.id, message.data)
            return False
        finally:
            conn.close()

    def _message(self, kind: str, message_id: str | None, data: str) -> None:
        event = json.loads(data)
        if "id" not in event:  # a notice, not an event
            self.notices.append((kind, event))
            return
        if str(event["id"]) != message_id:
            self.ledger.problem(f"{self.name}: id: {message_id} with data {data}")
        if self.events and event["id"] <= self.events[-1]["id"]:
            self.ledger.problem(
                f"{self.name}: id {event['id']} after id {self.events[-1]['id']} on one stream"
            )
        self.events.append(event)
        self.ledger.show(self.name, event)

    def read_until(self, done: Callable[[], bool], idle: float, within: float) -> bool:
        """
        Wait until ``done()``, or the stream showed nothing new for ``idle``
        s, or ``within`` s passed: whether it is done.
        """
        deadline = time.monotonic() + within
        count, since = -1, time.monotonic()
        while not done():
            now = time.monotonic()
            if len(self.events) != count:
                count, since = len(self.events), now
            if now > deadline or now - since > idle:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        self.stopping.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already
        super().stop()


def ws_connect(url: str) -> websocket.WebSocket:
    """A WebSocket client past the server's ``hello``."""
    ws = websocket.create_connection(url, timeout=SOCKET_TIMEOUT, suppress_origin=True)
    hello = json.loads(ws.recv())
    assert hello["op"] == "hello", hello
    return ws


def ws_until(
    ws: websocket.WebSocket, done: Callable[[Event], bool], within: float
) -> tuple[list[Event], str | None]:
    """
    The messages ``ws`` receives until one is ``done`` or the connection
    ends (bounded), and how it ended (``None``: it did not). Frames are
    read one by one: a close frame is reported even when the server drops
    the connection before the client's answer to it.
    """
    messages: list[Event] = []
    parts: list[bytes] = []
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"neither the message awaited nor a close within {within} s")
        ws.settimeout(left)
        try:
            frame = ws.recv_frame()
        except (websocket.WebSocketConnectionClosedException, ConnectionError) as e:
            return messages, f"dropped without a close frame ({type(e).__name__})"
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            data = bytes(frame.data)
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            return messages, f"closed with code {code} {data[2:]!r}"
        if frame.opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_CONT):
            parts.append(bytes(frame.data))
            if frame.fin:
                messages.append(json.loads(b"".join(parts)))
                parts = []
                if done(messages[-1]):
                    return messages, None


def start_all(clients: Iterable[_Client]) -> list[_Client]:
    started = list(clients)
    for c in started:
        c.start()
    return started


def stop_all(clients: Iterable[_Client]) -> None:
    for c in clients:
        c.stop()
