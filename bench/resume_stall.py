"""
Benchmark: does a resume whose filter matches nothing stall the reactor on a
long SQLite history? (issue #11 item 6: "the reactor never waits on the
disk"; target: ``/api/health`` p99 under 50 ms while three clients resume
with non-matching filters on a 1M-event history.)

Measured from outside, on a real ``twistd -n trainstream --db FILE``:

1. Builds a history of N events (1,000,000; ``--quick``: 200,000) through
   the store's own write path (``schema.migrate``, ``rows.add_rows``,
   ``writer.apply``, batches of 5000): a run ``early`` at ids 1..100 only,
   300 runs ``sweep-NNN`` of one ``final/score`` point each at ids 101..400,
   then runs ``train-0..3`` and ``eval`` interleaved (metrics of four names,
   one event in ten a log, a status at each run's start and end). No alerts.
2. In process, a store just started on that file (cache empty): what one
   read costs the reactor thread, ``store.after(after, Filter, 2000)`` (the
   replay batch), per scenario (median of ``--reps``).
3. Per scenario, a fresh server on the file (its cache cold): ``/api/health``
   on one keep-alive connection every 20 ms, first alone (``--baseline``
   seconds), then (``--seconds``) while three resumers run, each in a
   process of its own (so their work does not delay the prober's reads):

   - SSE: a new connection per resume, ``GET /events?FILTER`` with
     ``Last-Event-ID``; done at the first bytes (the server writes them
     after the replay), or for a replay once the last matching id is read;
   - poll: ``GET /api/events?after=ID&FILTER&limit=1000`` on a keep-alive
     connection (a replay pages on with ``limit=10000``);
   - WebSocket: one session, ``subscribe`` then ``ping``: done at the
     ``pong`` (messages are handled in order), or once the last matching
     id is read; then ``unsubscribe`` and again.

   Scenarios matching nothing: ``run=nosuchrun``, ``run=early`` resumed
   after its last id, ``type=alert``, ``type=metric&name=nosuch*``, and,
   resumed after id 400, ``run=sweep-*`` (300 runs: more (run, type) ranges
   than ``reads.MAX_RANGES``) and ``type=metric&name=final/score`` (a name
   held by 300 series). And two that legitimately stream (the replay runs
   in the reactor in batches): ``name=nosuch*`` (a name filter lets every
   log and status through) and no filter at all (a full replay from id 1).
   (REST and SSE take ``run=``, ``type=``, ``name=``; an unknown parameter
   such as ``runs=`` is ignored, which makes it a full replay.)

Prints p50/p90/p99/max of health latency alone and with the resumers (and
the p99 ratio), and what the resumers achieved. It never fails on speed::

    .venv/bin/python bench/resume_stall.py [--quick] [--events N] [--seconds 20]
        [--baseline 10] [--only NAME ...] [--clients sse,poll,ws] [--tree DIR]
        [--db FILE] [--py-spy]

``--db FILE`` keeps the history it builds there, and reuses it next time.
``--py-spy`` samples the server while the resumers run and prints where its
reactor thread was busy (``pip install py-spy``).

``--tree DIR`` runs the server (and the build) from another checkout, e.g. a
snapshot of the last commit: ``git archive HEAD | tar -x -C /tmp/snap``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _common import REPO_ROOT, machine_lines, percentile, source_lines

HOST = "127.0.0.1"
LISTEN = "tcp:0:interface=127.0.0.1"
HEALTH_INTERVAL_S = 0.02
EARLY_LAST = 100  # run "early" holds ids 1..100 only
SWEEP = 300  # then runs sweep-000..299, one "final/score" point each
SWEEP_LAST = EARLY_LAST + SWEEP
RUNS = ("train-0", "train-1", "train-2", "train-3", "eval")
NAMES = ("train/loss", "train/acc", "lr", "grad_norm")


@dataclass(frozen=True)
class Scenario:
    name: str
    runs: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    after: int = 1
    replay: bool = False  # it matches events: the resumers read them all

    @property
    def query(self) -> str:
        parts = [f"run={r}" for r in self.runs]
        parts += [f"type={t}" for t in self.types]
        parts += [f"name={n}" for n in self.names]
        return "&".join(parts)

    @property
    def subscribe(self) -> dict[str, Any]:
        message: dict[str, Any] = {"op": "subscribe", "after": self.after}
        for key, value in (("runs", self.runs), ("names", self.names), ("types", self.types)):
            if value:
                message[key] = list(value)
        return message


SCENARIOS = (
    Scenario("run=nosuchrun", runs=("nosuchrun",)),
    Scenario("run=early (after its last id)", runs=("early",), after=EARLY_LAST),
    Scenario("type=alert", types=("alert",)),
    Scenario("type=metric&name=nosuch*", types=("metric",), names=("nosuch*",)),
    Scenario("run=sweep-* (after their last id)", runs=("sweep-*",), after=SWEEP_LAST),
    Scenario(
        "name=final/score (after its last id)",
        types=("metric",),
        names=("final/score",),
        after=SWEEP_LAST,
    ),
    Scenario("name=nosuch* (logs+status pass)", names=("nosuch*",), replay=True),
    Scenario("no filter (full replay)", replay=True),
)


# Building the history (in the bench process, with the tree's store code)


def build(path: Path, n: int) -> float:
    """Write ``n`` events to a new history at ``path``; seconds it took."""
    from trainstream.store import Record
    from trainstream.store.rows import add_rows, rows_op
    from trainstream.store.schema import migrate
    from trainstream.store.writer import apply, connect

    def status(i: int, run: str, state: str) -> Record:
        t = 1e9 + i / 1000
        text = f'{{"id":{i},"type":"status","run":"{run}","time":{t},"state":"{state}"}}'
        return Record(i, "status", run, None, {"time": t, "state": state}, text)

    def log(i: int, run: str) -> Record:
        t = 1e9 + i / 1000
        text = (
            f'{{"id":{i},"type":"log","run":"{run}","time":{t},'
            f'"level":"info","message":"step {i} done"}}'
        )
        return Record(i, "log", run, None, {"time": t, "level": "info"}, text)

    def metric(i: int, run: str, name: str) -> Record:
        t = 1e9 + i / 1000
        event: dict[str, object] = {"step": i, "value": 1.0 / i, "time": t}
        text = (
            f'{{"id":{i},"type":"metric","run":"{run}","time":{t},'
            f'"name":"{name}","step":{i},"value":{event["value"]}}}'
        )
        return Record(i, "metric", run, name, event, text)

    def event(i: int) -> Record:
        if i <= EARLY_LAST:
            if i == 1:
                return status(i, "early", "running")
            if i == EARLY_LAST:
                return status(i, "early", "finished")
            return log(i, "early") if i % 10 == 0 else metric(i, "early", NAMES[i % 4])
        if i <= SWEEP_LAST:
            return metric(i, f"sweep-{i - EARLY_LAST - 1:03d}", "final/score")
        k = i - SWEEP_LAST
        if k <= len(RUNS):
            return status(i, RUNS[k - 1], "running")
        if n - i < len(RUNS):
            return status(i, RUNS[n - i], "finished")
        run = RUNS[i % len(RUNS)]
        return log(i, run) if i % 10 == 0 else metric(i, run, NAMES[(i // 5) % 4])

    started = time.perf_counter()
    db = connect(str(path))
    migrate(db, str(path))
    series: dict[Any, Any] = {}
    batch = 5000
    for first in range(1, n + 1, batch):
        records = [event(i) for i in range(first, min(n, first + batch - 1) + 1)]
        rows: list[Any] = []
        bad: list[Any] = []
        add_rows(records, rows, series, bad)
        assert not bad, bad[:3]
        apply(db, [rows_op(rows, series, records[-1].id)])
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - started


def last_matching(path: Path, scenario: Scenario) -> int:
    """The highest id the scenario's filter matches (0: none), from the file's tail."""
    import sqlite3

    from trainstream.store.filter import Filter

    flt = Filter(runs=scenario.runs, names=scenario.names, types=scenario.types)
    db = sqlite3.connect(str(path))
    try:
        for row in db.execute("SELECT id, type, run, name FROM events ORDER BY id DESC"):
            if row[0] <= scenario.after:
                return 0
            if flt.accepts(row[1], row[2], row[3]):
                return int(row[0])
    finally:
        db.close()
    return 0


def in_process(path: Path, reps: int) -> list[str]:
    """What one replay batch costs the reactor thread, per scenario, on a cold store."""
    from trainstream.store.filter import Filter
    from trainstream.store.sqlite import SQLiteStore

    store = SQLiteStore(str(path), lambda f, *a: None)
    store.start()
    lines = []
    try:
        for s in SCENARIOS:
            flt = Filter(runs=s.runs, names=s.names, types=s.types)
            times, got = [], 0
            budget = time.monotonic() + 5.0  # a slow read is measured fewer times
            for _ in range(reps):
                t = time.perf_counter()
                got = len(store.after(s.after, flt, 2000))
                times.append((time.perf_counter() - t) * 1000)
                if time.monotonic() > budget:
                    break
            lines.append(
                f"  {s.name:<38} after={s.after:<4} {statistics.median(times):10.3f} ms "
                f"(n={len(times)}, {got} events)"
            )
    finally:
        store.close()
    return lines


# The server


class Server:
    """``twistd -n trainstream --db PATH`` from ``tree``, on free loopback ports."""

    def __init__(self, path: Path, tree: Path, pycache: Path) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="trainstream-stall-"))
        ports = self.scratch / "ports.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)  # nothing written in the tree
        twistd = Path(sys.executable).with_name("twistd")
        self.log = open(self.scratch / "twistd.log", "wb")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                *(str(twistd), "-n", "--pidfile=", "trainstream", "--db", str(path)),
                *("--sse", LISTEN, "--ws", LISTEN, "--rest", LISTEN, "--ports-file", str(ports)),
            ],
            cwd=self.scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if ports.exists():
                    try:
                        self.urls: dict[str, str] = json.loads(ports.read_text())
                        break
                    except ValueError:
                        pass  # being written
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"twistd did not start; its output:\n{self.output()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.flush()
        return (self.scratch / "twistd.log").read_text(errors="replace")[-3000:]

    def address(self, role: str) -> tuple[str, int, str]:
        parts = urlsplit(self.urls[role])
        return parts.hostname or HOST, parts.port or 80, parts.path

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self.log.close()
            shutil.rmtree(self.scratch, ignore_errors=True)


# Resumers: each in a process of its own (spawned: stdlib only in here)


def _abortive(s: socket.socket) -> None:
    # Reset on close: no TIME_WAIT pile-up from thousands of resumes. No
    # Nagle: a second small write would wait for the server's delayed ACK.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _last_id_in(data: bytes, marker: bytes) -> int | None:
    """The id after the last ``marker`` in ``data`` (events come in id order)."""
    i = data.rfind(marker)
    if i < 0:
        return None
    j = i + len(marker)
    k = j
    while k < len(data) and 48 <= data[k] <= 57:
        k += 1
    return int(data[j:k]) if k > j and k < len(data) else None


def sse_resumer(
    addr: tuple[str, int, str], s: Scenario, expected: int, stop: Any, out: Any
) -> None:
    host, port, path = addr
    request = (
        f"GET {path}?{s.query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Accept: text/event-stream\r\nLast-Event-ID: {s.after}\r\n\r\n"
    ).encode()
    began = time.monotonic()
    done: list[tuple[float, float]] = []
    errors, events, nbytes = 0, 0, 0
    marker = f"\nid: {expected}\n".encode()
    for _ in range(10_000_000):  # bounded; ends on stop
        if stop.is_set():
            break
        t = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=60) as c:
                _abortive(c)
                c.sendall(request)
                first = c.recv(65536)
                if not first:
                    errors += 1
                    continue
                nbytes += len(first)
                if not s.replay:
                    if b"\ndata: " in first or b"\nid: " in first:
                        events += 1  # should never happen: the filter matches nothing
                else:
                    tail = first
                    while marker not in tail and not stop.is_set():
                        chunk = c.recv(1 << 20)
                        if not chunk:
                            errors += 1
                            break
                        nbytes += len(chunk)
                        events += chunk.count(b"\nevent: ")
                        tail = tail[-64:] + chunk
                    if marker not in tail:
                        continue
        except OSError:
            errors += 1
            continue
        done.append((time.monotonic(), time.perf_counter() - t))
    out.put(("sse", done, errors, events, nbytes, began, time.monotonic()))


def poll_resumer(
    addr: tuple[str, int, str], s: Scenario, expected: int, stop: Any, out: Any
) -> None:
    host, port, path = addr  # path: the REST root, /api
    conn = http.client.HTTPConnection(host, port, timeout=60)
    began = time.monotonic()
    done: list[tuple[float, float]] = []
    errors, events, nbytes = 0, 0, 0
    base = f"{path.rstrip('/')}/events?{s.query}{'&' if s.query else ''}"
    cursor = s.after
    t = time.perf_counter()
    for _ in range(10_000_000):
        if stop.is_set():
            break
        if not s.replay:
            t = time.perf_counter()
        try:
            limit = 10000 if s.replay else 1000
            conn.request("GET", f"{base}after={cursor}&limit={limit}")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            continue
        nbytes += len(body)
        if response.status != 200:
            errors += 1
            continue
        if not s.replay:
            if not body.startswith(b'{"events":[]'):
                events += 1
            done.append((time.monotonic(), time.perf_counter() - t))
            continue
        events += body.count(b'{"id":')
        last = _last_id_in(body, b'{"id":')
        if last is None:  # nothing more: the replay is over
            errors += cursor < expected
            cursor = expected
        else:
            cursor = last
        if cursor >= expected:
            done.append((time.monotonic(), time.perf_counter() - t))
            cursor = s.after
            t = time.perf_counter()
    conn.close()
    out.put(("poll", done, errors, events, nbytes, began, time.monotonic()))


class _WS:
    """The least WebSocket client: text frames out (masked), frames in."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=60)
        _abortive(self.sock)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("closed during the WebSocket handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise OSError(f"WebSocket upgrade refused: {head[:200]!r}")

    def send(self, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise OSError("WebSocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> bytes:
        """One whole data message (control frames skipped)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._need(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._need(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._need(8))
            if b1 & 0x80:
                self._need(4)  # a server does not mask; tolerate it anyway
            payload = self._need(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                raise OSError(f"WebSocket close frame: {payload[:120]!r}")
            if opcode >= 8:
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts)

    def close(self) -> None:
        self.sock.close()


def ws_resumer(addr: tuple[str, int, str], s: Scenario, expected: int, stop: Any, out: Any) -> None:
    host, port, path = addr
    began = time.monotonic()
    done: list[tuple[float, float]] = []
    errors, events, nbytes = 0, 0, 0
    ws: _WS | None = None
    for nonce in range(10_000_000):
        if stop.is_set():
            break
        t = time.perf_counter()
        try:
            if ws is None:
                ws = _WS(host, port, path)
                ws.recv()  # hello
            ws.send(s.subscribe)
            if s.replay:
                while not stop.is_set():
                    frame = ws.recv()
                    nbytes += len(frame)
                    if frame.startswith(b'{"op":"events"'):
                        events += frame.count(b'{"id":')
                        last = _last_id_in(frame, b'{"id":')
                        if last is not None and last >= expected:
                            break
                    elif b'"op":"error"' in frame[:40]:
                        raise OSError(frame[:200].decode(errors="replace"))
                if stop.is_set():
                    break
                ws.send({"op": "unsubscribe"})
            ws.send({"op": "ping", "nonce": nonce})
            while True:
                frame = ws.recv()
                nbytes += len(frame)
                if frame.startswith(b'{"op":"pong"'):
                    break
                if frame.startswith(b'{"op":"events"'):
                    events += frame.count(b'{"id":') if not s.replay else 0
                elif b'"op":"error"' in frame[:40]:
                    raise OSError(frame[:200].decode(errors="replace"))
            if not s.replay:
                ws.send({"op": "unsubscribe"})
        except OSError:
            errors += 1
            if ws is not None:
                ws.close()
                ws = None
            time.sleep(0.01)
            continue
        done.append((time.monotonic(), time.perf_counter() - t))
    if ws is not None:
        ws.close()
    out.put(("ws", done, errors, events, nbytes, began, time.monotonic()))


# One scenario on a fresh server


def probe(conn: http.client.HTTPConnection, path: str, seconds: float) -> list[float]:
    """``GET path`` every 20 ms for ``seconds``; each latency in ms."""
    latencies = []
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / HEALTH_INTERVAL_S) + 10):
        if time.monotonic() >= deadline:
            break
        t = time.perf_counter()
        conn.request("GET", path)
        conn.getresponse().read()
        latencies.append((time.perf_counter() - t) * 1000)
        time.sleep(HEALTH_INTERVAL_S)
    return latencies


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


def find_py_spy() -> str | None:
    sibling = Path(sys.executable).with_name("py-spy")
    return str(sibling) if sibling.exists() else shutil.which("py-spy")


def spy_summary(raw: Path, samples_expected: int) -> list[str]:
    """
    The reactor thread's busy samples (py-spy ``--format raw``), by the
    trainstream functions on the stack (inclusive) and by leaf function.
    """
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    busy = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack.startswith("<module> (twistd") or not count_text.isdigit():
            continue  # another thread (the writer's), or not a stack
        count = int(count_text)
        busy += count
        frames = stack.split(";")
        seen = set()
        for frame in frames:
            if "trainstream/" in frame:
                name = frame.rsplit(":", 1)[0] + ")"  # no line number
                if name not in seen:
                    seen.add(name)
                    inclusive[name] = inclusive.get(name, 0) + count
        key = frames[-1].rsplit(":", 1)[0] + ")"
        leaf[key] = leaf.get(key, 0) + count
    total = max(samples_expected, 1)
    lines = [f"  py-spy: reactor thread busy in {busy}/{total} samples ({100 * busy / total:.0f}%)"]
    for label, table, k in (("inclusive", inclusive, 10), ("leaf", leaf, 6)):
        for name, count in sorted(table.items(), key=lambda kv: -kv[1])[:k]:
            lines.append(f"    {label:<9} {100 * count / total:5.1f}%  {name}")
    return lines


RESUMERS = ((sse_resumer, "sse"), (poll_resumer, "poll"), (ws_resumer, "ws"))


def run_scenario(
    path: Path,
    tree: Path,
    s: Scenario,
    expected: int,
    seconds: float,
    baseline: float,
    spy: str | None,
    pycache: Path,
    kinds: tuple[str, ...] = ("sse", "poll", "ws"),
) -> dict[str, Any]:
    server = Server(path, tree, pycache)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    out = ctx.Queue()
    procs: list[Any] = []
    recorder: subprocess.Popen[bytes] | None = None
    raw = server.scratch / "py-spy.raw"
    spy_lines: list[str] = []
    try:
        rest = server.address("rest")
        health_path = rest[2].rstrip("/") + "/health"
        conn = http.client.HTTPConnection(rest[0], rest[1], timeout=120)
        conn.request("GET", health_path)
        last_id = json.loads(conn.getresponse().read())["last_id"]
        alone = probe(conn, health_path, baseline)
        for target, role in RESUMERS:
            if role not in kinds:
                continue
            addr = server.address("rest" if role == "poll" else role)
            p = ctx.Process(target=target, args=(addr, s, expected, stop, out))
            p.start()
            procs.append(p)
        time.sleep(1.0)  # the resumers import and connect
        if spy is not None:
            recorder = subprocess.Popen(
                [
                    *(spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds))),
                    *("--rate", "100", "--format", "raw", "--nonblocking", "-o", str(raw)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        load = os.getloadavg()[0]
        window = time.monotonic()
        loaded = probe(conn, health_path, seconds)
        window_end = time.monotonic()
        stop.set()
        if recorder is not None:
            recorder.wait(60)
            if raw.exists():
                spy_lines = spy_summary(raw, int(seconds) * 100)
        results = [out.get(timeout=180) for _ in procs]
        conn.close()
        alive = server.proc.poll() is None
    finally:
        stop.set()
        if recorder is not None and recorder.poll() is None:
            recorder.kill()
            recorder.wait(10)
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(10)
        server.stop()
    span = window_end - window
    clients = {}
    for kind, done, errors, events, nbytes, began, ended in sorted(results, key=lambda r: r[0]):
        inside = [d for (at, d) in done if window <= at <= window_end]
        ran = max(ended - began, 1e-9)
        clients[kind] = {
            "per_s": len(inside) / span,
            "p50_ms": percentile([d * 1000 for d in inside], 50),
            "p99_ms": percentile([d * 1000 for d in inside], 99),
            "errors": errors,
            "events": events,
            "events_s": events / ran,
            "mb_s": nbytes / 1e6 / ran,
        }
    return {
        "start_s": server.start_s,
        "last_id": last_id,
        "load": load,
        "alone": stats(alone),
        "loaded": stats(loaded),
        "clients": clients,
        "alive": alive,
        "spy": spy_lines,
    }


def fmt(st: dict[str, float]) -> str:
    return (
        f"n={st['n']:<4} p50={st['p50']:7.2f} p90={st['p90']:7.2f} "
        f"p99={st['p99']:8.2f} max={st['max']:8.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=None, help="history size (1,000,000)")
    parser.add_argument("--quick", action="store_true", help="200,000 events, 8 s per phase")
    parser.add_argument("--seconds", type=float, default=None, help="with resumers (20)")
    parser.add_argument("--baseline", type=float, default=None, help="health alone (10)")
    parser.add_argument("--reps", type=int, default=30, help="in-process repetitions (30)")
    parser.add_argument("--only", nargs="*", default=None, help="scenarios whose name starts so")
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="checkout to run")
    parser.add_argument(
        "--clients",
        default="sse,poll,ws",
        help="which resumers run, comma-separated (sse,poll,ws)",
    )
    parser.add_argument("--db", type=Path, default=None, help="reuse (or keep) this history")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the server with py-spy record while the resumers run (perturbs a little)",
    )
    args = parser.parse_args()
    kinds = tuple(k.strip() for k in args.clients.split(",") if k.strip())
    if not kinds or set(kinds) - {"sse", "poll", "ws"}:
        raise SystemExit(
            f"--clients: a comma-separated list of sse, poll, ws; got {args.clients!r}"
        )
    spy = find_py_spy() if args.py_spy else None
    if args.py_spy and spy is None:
        raise SystemExit("--py-spy: no py-spy next to this python or on PATH (pip install py-spy)")
    n = args.events or (200_000 if args.quick else 1_000_000)
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    baseline = args.baseline or (4.0 if args.quick else 10.0)
    tree = args.tree.resolve()
    sys.path.insert(0, str(tree))
    import trainstream

    print(*machine_lines(), *source_lines(trainstream.__file__), sep="\n")
    scenarios = [
        s for s in SCENARIOS if args.only is None or any(s.name.startswith(o) for o in args.only)
    ]
    scratch = Path(tempfile.mkdtemp(prefix="trainstream-stall-"))
    try:
        path = args.db or scratch / "history.sqlite3"
        if args.db is not None and args.db.exists():
            print(f"history: reusing {path}")
        else:
            took = build(path, n)
            size = path.stat().st_size / 1e6
            print(f"history: {n:,} events built in {took:.1f} s ({size:.0f} MB), {path}")
        print("one replay batch, store.after(after, Filter, 2000), reactor thread, cold store:")
        for line in in_process(path, args.reps):
            print(line)
        print(
            f"/api/health every {HEALTH_INTERVAL_S * 1000:.0f} ms: {baseline:g} s alone, then "
            f"{seconds:g} s while {len(kinds)} resumers ({', '.join(kinds)}) run; "
            "a fresh server per scenario"
        )
        summary = []
        for s in scenarios:
            expected = last_matching(path, s)
            r: dict[str, Any] | None = None
            for attempt in range(3):  # others edit the tree: a start may fail transiently
                try:
                    r = run_scenario(
                        path, tree, s, expected, seconds, baseline, spy, scratch / "pycache", kinds
                    )
                    break
                except RuntimeError as e:
                    print(f"  {s.name}: server did not start (attempt {attempt + 1}): {e}")
                    time.sleep(60)
            if r is None:
                continue
            ratio = r["loaded"]["p99"] / r["alone"]["p99"]
            print(
                f"{s.name}  (?{s.query or '-'}, after {s.after}; "
                f"{'replays to id ' + str(expected) if s.replay else 'matches nothing'}; "
                f"server up in {r['start_s']:.1f} s, last_id {r['last_id']}, "
                f"load average {r['load']:.1f})"
            )
            print(f"  health alone    {fmt(r['alone'])}")
            print(f"  health loaded   {fmt(r['loaded'])}   p99 ratio {ratio:.1f}x")
            for kind, c in r["clients"].items():
                if s.replay:
                    what = (
                        f"{c['per_s']:6.2f} whole replays/s, {c['events_s']:8.0f} events/s "
                        f"({c['mb_s']:.1f} MB/s)"
                    )
                else:
                    what = (
                        f"{c['per_s']:7.1f} resumes/s (each p50={c['p50_ms']:.1f} "
                        f"p99={c['p99_ms']:.1f} ms), events {c['events']}"
                    )
                print(f"  {kind:<5} {what}, errors {c['errors']}")
            for line in r["spy"]:
                print(line)
            if not r["alive"]:
                print("  WARNING: the server had exited")
            summary.append((s.name, r["loaded"]["p99"], ratio))
        print(f"summary: /api/health p99 with {len(kinds)} resumers (target < 50 ms)")
        for name, p99, ratio in summary:
            mark = "ok" if p99 < 50 else "OVER"
            print(f"  {name:<34} p99 {p99:8.2f} ms  ({ratio:.1f}x alone)  {mark}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a --db file is kept


if __name__ == "__main__":
    main()
