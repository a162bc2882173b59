"""
Helpers for the streaming benchmarks: a ``twistd trainstream`` subprocess,
/proc figures, and lean Twisted clients (SSE, WebSocket subscriber and
publisher) that count what they receive and how late it is.

Every event a publisher sends carries its send time (``time.time()``) in the
event's ``time`` field; a client takes ``time.time()`` when bytes arrive, so
client and server share the machine's wall clock. Everything is loopback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pstats
import re
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from startup import child_env, find_twistd
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

HOST = "127.0.0.1"
LISTEN = "tcp:0:interface=127.0.0.1"
START_DEADLINE_S = 20.0
STOP_DEADLINE_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
RUN = "bench"

_ID = re.compile(rb'"id":(\d+)')
_TIME = re.compile(rb'"time":([0-9.eE+-]+)')
_METRIC = b'"type":"metric"'
_LOG_PROBLEMS = re.compile(r"Traceback|Unhandled|CRITICAL|\[-\] .*[Ee]rror")


# The server process and /proc


def raise_nofile() -> tuple[int, int]:
    """Raise this process's open-file limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class ServerProcess:
    """
    ``twistd -n trainstream`` on free loopback ports, from the working tree;
    ``--memory`` unless ``store`` says otherwise (``"--db", "{scratch}/h.db"``:
    ``{scratch}`` is this server's temporary folder).
    """

    def __init__(
        self,
        extra: Sequence[str] = (),
        profile: bool = False,
        store: Sequence[str] = ("--memory",),
        prefix: str = "trainstream-bench-",
        roles: Sequence[str] = ("--sse", "--ws", "--rest"),
    ) -> None:
        """:param roles: listener options, each given ``LISTEN`` (``("--listen",)``: one port)."""
        self.scratch = Path(tempfile.mkdtemp(prefix=prefix))
        self.log_path = self.scratch / "twistd.log"
        self.profile_path = self.scratch / "server.pstats" if profile else None
        ports_file = self.scratch / "ports.json"
        command = [str(find_twistd()), "-n", "--pidfile="]
        if self.profile_path is not None:
            command += [f"--profile={self.profile_path}", "--profiler=cprofile", "--savestats"]
        command += ["trainstream", *(a.format(scratch=self.scratch) for a in store)]
        for option in roles:
            command += [option, LISTEN]
        command += ["--ports-file", str(ports_file), *extra]
        self.command = command
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.scratch,
                env=child_env(True, self.scratch),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_DEADLINE_S
        while not ports_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"twistd did not start; its output:\n{self.log_text()[-2000:]}")
            time.sleep(0.01)
        self.urls: dict[str, str] = json.loads(ports_file.read_text(encoding="utf-8"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def address(self, role: str) -> tuple[str, int, str]:
        """Host, port and path of a role's URL."""
        parts = urlsplit(self.urls[role])
        return parts.hostname or HOST, parts.port or 80, parts.path

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_kb(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def problems(self) -> list[str]:
        """Lines of the server's output that look like errors."""
        return [line for line in self.log_text().splitlines() if _LOG_PROBLEMS.search(line)]

    def profile_top(self, limit: int = 15) -> str:
        """The server's hottest functions by own time (after ``stop``), if profiled."""
        if self.profile_path is None or not self.profile_path.exists():
            return "    (no server profile written)"
        out = io.StringIO()
        stats = pstats.Stats(str(self.profile_path), stream=out)
        stats.strip_dirs().sort_stats("tottime").print_stats(limit)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        return "\n".join("    " + line for line in lines[start:] if line.strip())

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL after the deadline); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_DEADLINE_S)
        shutil.rmtree(self.scratch / "pycache", ignore_errors=True)  # keep only the log
        return self.proc.returncode


def wait_healthy(server: ServerProcess, limit: float = START_DEADLINE_S) -> dict[str, Any]:
    """
    Poll the server's ``GET /api/health`` until it answers 200 (a cluster
    server listens before it has reached Redis); its body. Raises
    ``SystemExit`` with the last answer after ``limit`` seconds.
    """
    import urllib.error
    import urllib.request

    host, port, _ = server.address("rest")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + limit
    last = ""
    while time.monotonic() < deadline:
        try:
            with opener.open(f"http://{host}:{port}/api/health", timeout=2) as response:
                body: dict[str, Any] = json.loads(response.read())
                return body
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.read()[:300]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.02)
    raise SystemExit(f"server {server.pid} not healthy after {limit:.0f} s: {last}")


# What clients receive


class Tally:
    """Metric events one client received: count, id order, latency samples (ms)."""

    def __init__(self, samples: array[float]) -> None:
        self.samples = samples
        self.count = 0
        self.last_id = 0
        self.out_of_order = 0
        self.errors: list[str] = []

    def feed(self, blob: bytes, now: float) -> None:
        """Count the complete events in ``blob``; one latency sample per distinct send time."""
        n = blob.count(_METRIC)
        if not n:
            return
        self.count += n
        ids = _ID.findall(blob)
        if ids:
            if int(ids[0]) <= self.last_id:
                self.out_of_order += 1
            self.last_id = int(ids[-1])
        for sent in set(_TIME.findall(blob)):
            self.samples.append((now - float(sent)) * 1000.0)


class Client(Protocol):
    """A client that is ``ready`` once subscribed; ``closed`` fires when the connection ends."""

    kind = "?"
    transport: Any = None

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.ready: Deferred[Client] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.is_ready = False
        self.lost = False
        self._head = b""
        self._in_head = True

    def _became_ready(self) -> None:
        if not self.is_ready:
            self.is_ready = True
            self.ready.callback(self)

    def fail(self, why: str) -> None:
        self.tally.errors.append(why)
        if not self.is_ready:
            self.is_ready = True
            self.ready.errback(Failure(ConnectionError(why)))
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        if not self.is_ready:
            self.fail(f"{self.kind}: connection lost before ready: {reason}")
        self.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        now = time.time()
        if self._in_head:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    self.fail(f"{self.kind}: no end of headers")
                return
            head, rest = self._head[:end], self._head[end + 4 :]
            self._head = b""
            self._in_head = False
            if not self.head_ok(head):
                return
            data = rest
        if data:
            self.body(data, now)

    def close(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.loseConnection()

    def head_ok(self, head: bytes) -> bool:
        raise NotImplementedError

    def body(self, data: bytes, now: float) -> None:
        raise NotImplementedError


class SSEClient(Client):
    """``GET /events`` over HTTP/1.1 (chunked), filtered to the bench run's metrics."""

    kind = "sse"

    def __init__(
        self, tally: Tally, host: str, port: int, path: str, filtered: bool = True
    ) -> None:
        super().__init__(tally)
        query = f"?run={RUN}&type=metric" if filtered else ""
        self.request = (
            f"GET {path}{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        self._raw = b""  # chunked bytes not yet decoded
        self._text = b""  # decoded bytes not yet a whole event
        self._chunked = False

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def head_ok(self, head: bytes) -> bool:
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status + b" ":
            self.fail(f"sse: {status!r}")
            return False
        self._chunked = b"transfer-encoding: chunked" in head.lower()
        self._became_ready()
        return True

    def body(self, data: bytes, now: float) -> None:
        if self._chunked:
            data = self._dechunk(data)
        text = self._text + data
        end = text.rfind(b"\n\n")
        if end < 0:
            self._text = text
            return
        self._text = text[end + 2 :]
        self.tally.feed(text[: end + 2], now)

    def _dechunk(self, data: bytes) -> bytes:
        raw = self._raw + data
        out: list[bytes] = []
        i = 0
        while True:
            eol = raw.find(b"\r\n", i)
            if eol < 0:
                break
            size = int(raw[i:eol].split(b";", 1)[0] or b"0", 16)
            if size == 0:
                self.tally.errors.append("sse: the server ended the stream")
                i = len(raw)
                break
            if len(raw) < eol + 2 + size + 2:
                break
            out.append(raw[eol + 2 : eol + 2 + size])
            i = eol + 2 + size + 2
        self._raw = raw[i:]
        return b"".join(out)


def frame_head(buf: bytes, i: int) -> tuple[int, int, int, int] | None:
    """
    The WebSocket frame header at ``buf[i:]``: its two first bytes, where its
    payload starts and its length; ``None`` while the header is incomplete.
    """
    n = len(buf)
    if n - i < 2:
        return None
    b0, b1 = buf[i], buf[i + 1]
    length, at = b1 & 0x7F, i + 2
    if length == 126:
        if n - at < 2:
            return None
        (length,) = struct.unpack_from("!H", buf, at)
        at += 2
    elif length == 127:
        if n - at < 8:
            return None
        (length,) = struct.unpack_from("!Q", buf, at)
        at += 8
    return b0, b1, at, length


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


class WSClient(Client):
    """A WebSocket session (RFC 6455 by hand: lean, no per-frame UTF-8 check)."""

    kind = "ws"

    def __init__(
        self,
        tally: Tally,
        host: str,
        port: int,
        path: str,
        subscribe: bool = True,
        filtered: bool = True,
    ) -> None:
        super().__init__(tally)
        self.host, self.port, self.path = host, port, path
        self.subscribe = subscribe
        self.filtered = filtered
        self._buf = b""
        self._fragments: list[bytes] = []
        self.on_message: Callable[[dict[str, Any]], None] | None = None
        self.closing = False

    def connectionMade(self) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def head_ok(self, head: bytes) -> bool:
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self.fail(f"ws: {status!r}")
            return False
        if self.subscribe:
            if self.filtered:
                self.send({"op": "subscribe", "runs": [RUN], "types": ["metric"]})
            else:
                self.send({"op": "subscribe"})
        self.send({"op": "ping", "nonce": "ready"})  # the pong says the subscribe is done
        return True

    def close(self) -> None:
        """Start a clean close (1000); the server answers and we drop the connection."""
        if self.is_ready and not self.lost and not self.closing:
            self.closing = True
            self.transport.write(ws_frame(struct.pack("!H", 1000), 8))
        elif not self.lost:
            self.transport.loseConnection()

    def send(self, message: dict[str, object]) -> None:
        self.transport.write(ws_frame(json.dumps(message, separators=(",", ":")).encode()))

    def body(self, data: bytes, now: float) -> None:
        buf = self._buf + data
        i, n = 0, len(buf)
        while (head := frame_head(buf, i)) is not None:
            b0, b1, at, length = head
            if b1 & 0x80:
                self.fail("ws: masked frame from the server")
                return
            if n - at < length:
                break
            self._frame(b0, buf[at : at + length], now)
            i = at + length
        self._buf = buf[i:]

    def _frame(self, b0: int, payload: bytes, now: float) -> None:
        opcode = b0 & 0x0F
        if opcode in (0, 1, 2):
            self._fragments.append(payload)
            if not b0 & 0x80:
                return
            message, self._fragments = b"".join(self._fragments), []
            if message.startswith(b'{"op":"events"'):
                self.tally.feed(message, now)
            else:
                self._control(message)
        elif opcode == 8:
            if not self.closing:
                self.tally.errors.append(f"ws: close {payload[:2].hex()} {payload[2:80]!r}")
                self.transport.write(ws_frame(payload[:2], 8))
            self.transport.loseConnection()
        elif opcode == 9:
            self.transport.write(ws_frame(payload, 10))

    def _control(self, message: bytes) -> None:
        obj = json.loads(message)
        op = obj.get("op")
        if op == "pong" and obj.get("nonce") == "ready":
            self._became_ready()
        elif op == "error" or op == "reset":
            self.tally.errors.append(f"ws: {obj}")
        if self.on_message is not None:
            self.on_message(obj)


async def connect(client: Client, host: str, port: int, reactor: Any) -> Client:
    """Connect and wait until the client is subscribed."""
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=10), client)
    return await client.ready


async def connect_many(
    make: Callable[[int], tuple[Client, str, int]], n: int, reactor: Any, wave: int = 40
) -> list[Client]:
    """``n`` clients, at most ``wave`` handshakes at a time (the listen backlog is 50)."""
    from twisted.internet.defer import gatherResults

    clients: list[Client] = []
    for start in range(0, n, wave):
        batch = [make(i) for i in range(start, min(n, start + wave))]
        pending = [Deferred.fromCoroutine(connect(c, h, p, reactor)) for c, h, p in batch]
        await gatherResults(pending)
        clients.extend(c for c, _, _ in batch)
    return clients


class Publisher:
    """
    Publishes metric events over a WebSocket at ``rate`` events/s in ``hz``
    ticks a second; each tick sends what is due by then, so a late tick
    catches up and the total is exact. Every event's ``time`` is its send time.
    """

    def __init__(self, ws: WSClient, rate: float, hz: float, names: int, reactor: Any) -> None:
        self.ws = ws
        self.rate = rate
        self.hz = hz
        self.names = [f"train/m{i}" for i in range(names)]
        self.reactor = reactor
        self.sent = 0
        self.acked = 0
        self.messages = 0
        self.ack_ms: array[float] = array("d")
        self.errors: list[str] = []
        self._unacked: deque[float] = deque()  # send times; acks come back in order
        ws.on_message = self._on_message

    def _on_message(self, obj: dict[str, Any]) -> None:
        if obj.get("op") == "ack":
            self.acked += int(obj.get("accepted", 0))
            if self._unacked:
                self.ack_ms.append((time.time() - self._unacked.popleft()) * 1000.0)
        elif obj.get("op") == "error":
            self.errors.append(str(obj))

    async def run(self, seconds: float, max_batch: int = 5000) -> float:
        """Publish for ``seconds``; returns the achieved wall time."""
        from twisted.internet.task import deferLater

        step = 0
        t0 = time.monotonic()
        end = t0 + seconds
        tick = 1.0 / self.hz
        k = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = min(round(self.rate * (now - t0)) + 1, int(self.rate * seconds))
            n = min(due - self.sent, max_batch)
            if n > 0:
                sent_time = time.time()
                events = []
                for _ in range(n):
                    events.append(
                        {
                            "type": "metric",
                            "run": RUN,
                            "name": self.names[step % len(self.names)],
                            "step": step // len(self.names),
                            "value": 0.5,
                            "time": sent_time,
                        }
                    )
                    step += 1
                self._unacked.append(sent_time)
                self.ws.send({"op": "publish", "events": events})
                self.sent += n
                self.messages += 1
            k += 1
            delay = max(0.0, t0 + k * tick - time.monotonic())
            await deferLater(self.reactor, delay, lambda: None)
        return time.monotonic() - t0


async def drain(clients: Sequence[Client], expected: int, reactor: Any, limit: float) -> float:
    """Wait until every live client has ``expected`` events, at most ``limit`` seconds."""
    from twisted.internet.task import deferLater

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if all(c.tally.count >= expected or c.lost for c in clients):
            break
        await deferLater(reactor, 0.05, lambda: None)
    return time.monotonic() - t0


def delivery_lines(label: str, clients: Sequence[Client], expected: int) -> list[str]:
    """Counts per client against what the server accepted."""
    counts = [c.tally.count for c in clients]
    short = [c for c in clients if c.tally.count < expected]
    extra = [c for c in clients if c.tally.count > expected]
    disorder = sum(c.tally.out_of_order for c in clients)
    lost_conn = sum(1 for c in clients if c.lost)
    errors = [e for c in clients for e in c.tally.errors]
    lines = [
        f"  {label:<4} {len(clients)} clients: events per client min={min(counts, default=0)} "
        f"max={max(counts, default=0)} expected={expected}; short={len(short)} "
        f"(missing {sum(expected - c.tally.count for c in short)} in all), over={len(extra)}, "
        f"out-of-order chunks={disorder}, connections lost={lost_conn}"
    ]
    if errors:
        lines.append(f"       {len(errors)} client errors, first: {errors[:3]}")
    return lines


class CpuWatch:
    """CPU seconds of the server and of this process over a window."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.t0 = time.monotonic()
        self.server0 = cpu_seconds(server_pid)
        self.client0 = cpu_seconds(os.getpid())

    def line(self) -> str:
        wall = time.monotonic() - self.t0
        server = cpu_seconds(self.server_pid) - self.server0
        client = cpu_seconds(os.getpid()) - self.client0
        return (
            f"  CPU over {wall:.1f} s wall: server {server:.2f} s ({100 * server / wall:.0f}% of "
            f"a core), client process {client:.2f} s ({100 * client / wall:.0f}%)"
        )


async def close_all(clients: Sequence[Client], reactor: Any, limit: float = 5.0) -> int:
    """Close every client and wait (bounded) until they are gone; how many were still open."""
    from twisted.internet.task import deferLater

    for c in clients:
        c.close()
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and not all(c.lost for c in clients):
        await deferLater(reactor, 0.05, lambda: None)
    left = [c for c in clients if not c.lost]
    for c in left:
        if c.transport is not None:
            c.transport.abortConnection()
    return len(left)


def run_reactor(main: Callable[[Any], Any]) -> None:
    """Run ``main(reactor)`` (a coroutine function) on the epoll reactor until it ends."""
    import sys

    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import epollreactor

        epollreactor.install()
    from twisted.internet import task

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


class LagProbe:
    """How late this process's reactor runs a timer: the client's own share of latency."""

    def __init__(self, reactor: Any, interval: float = 0.01) -> None:
        from twisted.internet.task import LoopingCall

        self.reactor = reactor
        self.interval = interval
        self.lag_ms: array[float] = array("d")
        self._expected = 0.0
        self._call = LoopingCall(self._tick)
        self._call.clock = reactor

    def start(self) -> None:
        self._expected = time.monotonic()
        self._call.start(self.interval, now=True)

    def _tick(self) -> None:
        now = time.monotonic()
        self.lag_ms.append(max(0.0, (now - self._expected) * 1000.0))
        self._expected = now + self.interval

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()


class RssWatch:
    """Samples a process's RSS every ``interval`` seconds; keeps the peak."""

    def __init__(self, reactor: Any, pid: int, interval: float = 0.5) -> None:
        from twisted.internet.task import LoopingCall

        self.pid = pid
        self.peak_kb = 0
        self.last_kb = 0
        self._call = LoopingCall(self._sample)
        self._call.clock = reactor
        self._call.start(interval, now=True)

    def _sample(self) -> None:
        self.last_kb = rss_kb(self.pid)
        self.peak_kb = max(self.peak_kb, self.last_kb)

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()
        self._sample()


async def publish_in_subprocess(
    reactor: Any, server: ServerProcess, rate: float, hz: float, seconds: float, names: int
) -> dict[str, Any]:
    """
    Run the ``Publisher`` in a process of its own (``python _stream.py publish``),
    so its send times do not wait on this process's busy reactor. Returns its
    figures: ``sent``, ``acked``, ``messages``, ``wall``, ``ack_ms``, ``errors``, ``cpu``.
    """
    import sys

    from twisted.internet.threads import deferToThread

    host, port, path = server.address("ws")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "publish",
        f"{host}:{port}{path}",
        str(rate),
        str(hz),
        str(seconds),
        str(names),
    ]
    done = await deferToThread(
        subprocess.run, command, capture_output=True, timeout=seconds + 60, check=False
    )
    try:
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = done.stderr.decode()[-2000:]
        raise SystemExit(f"publisher failed ({done.returncode}): {tail}") from None
    return result


async def _publisher_main(reactor: Any, argv: list[str]) -> None:
    from twisted.internet.task import deferLater

    address, rate, hz, seconds, names = argv
    host_port, path = address.split("/", 1)
    host, port = host_port.rsplit(":", 1)
    ws = WSClient(Tally(array("d")), host, int(port), "/" + path, subscribe=False)
    await connect(ws, host, int(port), reactor)
    publisher = Publisher(ws, float(rate), float(hz), int(names), reactor)
    cpu0 = cpu_seconds(os.getpid())
    wall = await publisher.run(float(seconds))
    t0 = time.monotonic()
    while publisher.acked < publisher.sent and time.monotonic() - t0 < 30:
        await deferLater(reactor, 0.02, lambda: None)
    await close_all([ws], reactor)
    result = {
        "sent": publisher.sent,
        "acked": publisher.acked,
        "messages": publisher.messages,
        "wall": wall,
        "ack_ms": list(publisher.ack_ms),
        "errors": publisher.errors[:5],
        "cpu": cpu_seconds(os.getpid()) - cpu0,
    }
    print(json.dumps(result), flush=True)


# Raw-socket clients (one epoll loop, no Twisted): many cheap subscribers in
# one process, for fan-out at the scale of thousands. Idle ones only read and
# discard; active ones count events and check their ids without decoding JSON.

_EV_ID = b'{"id":'
_PING_READY = b'"nonce":"fanout-ready"'


def nofile_of(pid: int) -> tuple[int, int]:
    """A process's open-file limit (soft, hard), read from ``/proc/PID/limits``."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    return -1, -1


def busy_seconds() -> tuple[float, float]:
    """The machine's (busy, total) CPU seconds so far, all cores, from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


class RawConn:
    """One raw subscriber: its socket, handshake state and what it received."""

    __slots__ = (
        "attempts",
        "buf",
        "bytes",
        "disorder",
        "error",
        "events",
        "fd",
        "first_id",
        "gaps",
        "kind",
        "last_id",
        "lost",
        "metrics",
        "request",
        "sock",
        "state",
        "subscribe",
    )

    def __init__(self, kind: str, request: bytes, subscribe: bytes = b"") -> None:
        self.kind = kind
        self.request = request
        self.subscribe = subscribe  # a WebSocket's own subscribe message (else the streams')
        self.sock: Any = None
        self.fd = -1
        self.state = "new"  # new, connecting, head, subscribing, ready, closed
        self.buf = b""
        self.first_id = 0
        self.last_id = 0
        self.events = 0
        self.metrics = 0
        self.gaps = 0
        self.disorder = 0
        self.bytes = 0
        self.lost = False
        self.error = ""
        self.attempts = 0


def raw_sse_request(host: str, port: int, path: str, query: str) -> bytes:
    return (
        f"GET {path}{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()


def raw_ws_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawStreams:
    """
    ``n`` SSE or WebSocket subscribers on one epoll, connected at most
    ``inflight`` at a time (the server's listen backlog is 50). ``active``
    ones count the events of every complete SSE chunk / WebSocket frame
    (``{"id":`` occurrences), check that ids go on one by one from the last
    one seen, and take one latency sample per complete read: arrival time
    minus the ``time`` of its *first* (oldest) event, the worst in that read.
    Idle ones read and discard.
    """

    def __init__(
        self,
        conns: list[RawConn],
        address: dict[str, tuple[str, int]],
        ws_subscribe: bytes,
        active: bool,
        inflight: int = 48,
    ) -> None:
        import select

        self.conns = conns
        self.address = address
        self.ws_subscribe = ws_subscribe
        self.active = active
        self.inflight = inflight
        self.ep = select.epoll()
        self.by_fd: dict[int, RawConn] = {}
        self.lat: dict[str, array[float]] = {"sse": array("d"), "ws": array("d")}
        self.ready = 0
        self.failed = 0
        self.closed_after_ready = 0
        self.extra: dict[int, Callable[[], None]] = {}  # other fds to watch (stdin)

    # Connecting

    def _start(self, c: RawConn) -> None:
        import socket

        c.attempts += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock, c.fd, c.state, c.buf = s, s.fileno(), "connecting", b""
        self.by_fd[c.fd] = c
        s.connect_ex(self.address[c.kind])
        import select

        self.ep.register(c.fd, select.EPOLLOUT | select.EPOLLIN)

    def connect_all(self, deadline_s: float) -> float:
        """Connect and subscribe every client; the seconds it took."""
        import select

        t0 = time.monotonic()
        waiting = deque(self.conns)
        busy = 0
        while (waiting or busy) and time.monotonic() - t0 < deadline_s:
            while waiting and busy < self.inflight:
                self._start(waiting.popleft())
                busy += 1
            for fd, ev in self.ep.poll(0.2):
                c = self.by_fd.get(fd)
                if c is None:
                    self.extra.get(fd, lambda: None)()
                    continue
                before = c.state
                if c.state == "connecting":
                    import socket

                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._drop(c, f"connect: {os.strerror(err)}")
                    else:
                        c.state = "head"
                        c.sock.send(c.request)
                        self.ep.modify(fd, select.EPOLLIN)
                elif ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._readable(c)
                if before != "ready" and c.state in ("ready", "closed"):
                    busy -= 1
                    if c.state == "closed" and c.attempts < 3 and c.error.startswith("connect"):
                        waiting.append(c)  # retried: a refused SYN is not the server's answer
        for c in self.conns:
            if c.state not in ("ready", "closed"):
                self._drop(c, "not subscribed in time")
        self.ready = sum(1 for c in self.conns if c.state == "ready")
        self.failed = len(self.conns) - self.ready
        return time.monotonic() - t0

    def _drop(self, c: RawConn, why: str) -> None:
        if c.state == "ready":
            self.closed_after_ready += 1
        c.lost = c.state == "ready"
        c.state, c.error = "closed", why
        self.by_fd.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    # Reading

    def _readable(self, c: RawConn) -> None:
        try:
            data = c.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(c, f"recv: {e}")
            return
        if not data:
            self._drop(c, "closed by the server")
            return
        c.bytes += len(data)
        if c.state == "ready" and not self.active and c.kind == "sse":
            return  # idle SSE: discard
        buf = c.buf + data if c.buf else data
        if c.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                c.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            buf = buf[end + 4 :]
            if c.kind == "sse":
                if b" 200 " not in status + b" ":
                    self._drop(c, f"sse: {status!r}")
                    return
                c.state = "ready"
            else:
                if b" 101 " not in status + b" ":
                    self._drop(c, f"ws: {status!r}")
                    return
                c.sock.send(
                    ws_frame(c.subscribe or self.ws_subscribe)
                    + ws_frame(b'{"op":"ping","nonce":"fanout-ready"}')
                )
                c.state = "subscribing"
        if c.kind == "sse":
            if self.active:
                # Each chunk is one write of whole SSE blocks; count up to the last whole one.
                end = buf.rfind(b"\n\n\r\n")
                if end >= 0:
                    self._count(c, buf[: end + 4], time.time())
                    buf = buf[end + 4 :]
            c.buf = buf
            return
        c.buf = self._frames(c, buf)

    def _frames(self, c: RawConn, buf: bytes) -> bytes:
        i, n = 0, len(buf)
        now = 0.0
        while (head := frame_head(buf, i)) is not None:
            b0, _, at, length = head
            if n - at < length:
                break
            opcode = b0 & 0x0F
            if opcode == 1:
                if not b0 & 0x80:
                    self._drop(c, "ws: fragmented message (not handled by this client)")
                    return b""
                if c.state == "ready":
                    if self.active and buf.startswith(b'{"op":"events"', at):
                        if not now:
                            now = time.time()
                        self._count(c, buf[at : at + length], now)
                elif buf.find(_PING_READY, at, at + length) >= 0:
                    c.state = "ready"
                elif buf.startswith(b'{"op":"error"', at):
                    self._drop(c, f"ws: {buf[at : at + length][:200]!r}")
                    return b""
            elif opcode == 8:
                self._drop(c, f"ws: close {buf[at : at + length][:120]!r}")
                return b""
            elif opcode == 9:
                c.sock.send(ws_frame(buf[at : at + length], 10))
            i = at + length
        return buf[i:]

    def _count(self, c: RawConn, blob: bytes, now: float) -> None:
        n = blob.count(_EV_ID)
        if not n:
            return
        i = blob.find(_EV_ID)
        first = int(blob[i + 6 : blob.find(b",", i)])
        j = blob.rfind(_EV_ID)
        last = int(blob[j + 6 : blob.find(b",", j)])
        if c.last_id:
            if first <= c.last_id:
                c.disorder += 1
            elif first != c.last_id + 1:
                c.gaps += first - c.last_id - 1
        else:
            c.first_id = first
        if last - first + 1 != n:
            c.gaps += abs(last - first + 1 - n)
        c.last_id = last
        c.events += n
        c.metrics += blob.count(_METRIC)
        m = _TIME.search(blob, i)
        if m is not None:
            self.lat[c.kind].append((now - float(m.group(1))) * 1000.0)

    def pump(self, seconds: float) -> None:
        """Read for up to ``seconds``; early when a watched fd's callback raises StopIteration."""
        import select

        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            for fd, ev in self.ep.poll(min(left, 0.2)):
                c = self.by_fd.get(fd)
                if c is None:
                    callback = self.extra.get(fd)
                    if callback is not None:
                        try:
                            callback()
                        except StopIteration:
                            return
                    continue
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._readable(c)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        import select

        self.extra[fd] = callback
        self.ep.register(fd, select.EPOLLIN)

    def close_all(self) -> None:
        """Abort every connection (SO_LINGER 0: no TIME_WAIT left behind)."""
        import socket

        for c in self.conns:
            if c.state != "closed" and c.sock is not None:
                try:
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                c.sock.close()
                c.state = "closed"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["publish"] or len(sys.argv) != 7:
        raise SystemExit("usage: _stream.py publish HOST:PORT/PATH RATE HZ SECONDS NAMES")
    run_reactor(lambda reactor: _publisher_main(reactor, sys.argv[2:]))
