"""
Benchmark: how much a server's memory grows while big events pass (issue
targets: RSS growth under 150 MiB while 180 MB of 60 KB events pass, under
60 MiB while 40 MB of 2 KB events pass one stalled reader).

Each run starts a fresh ``twistd -n trainstream`` subprocess (the working
tree's code, on ``tcp:0`` loopback ports found through ``--ports-file``),
with a SQLite history in a temporary folder (``--db``) or ``--memory``:

(a) ``large``: 180 MB of 60 KB ``log`` events, POSTed 16 to a request as
    fast as the server acknowledges them, while one SSE client (``GET
    /events``) reads everything;
(b) ``stalled``: 40 MB of 2 KB ``log`` events, 500 to a request, while one
    reader (SSE, or WebSocket with ``--stalled ws``) is connected and never
    reads (its transport is paused once it is subscribed).

The server's RSS is ``VmRSS`` of ``/proc/PID/status`` (the reactor
process; a SQLite writer process is shown apart), sampled every 0.1 s. The
baseline is the median of 10 samples after one warm-up request; growth is
the peak while the events pass (and 2 s after) minus the baseline, and is
what the target is checked against; "settled" is the median of the samples
of those last 2 s, less the baseline. A first server, not measured, compiles
the bytecode the others load. Each case runs ``--repeat`` times (3) per
store; the summary gives the median growth. It prints figures and never
fails on them::

    .venv/bin/python bench/memory.py [--quick] [--repeat 3] [--store db|memory|both]
        [--only large|stalled] [--stalled sse|ws] [--cache-mb M]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _stream
from _common import REPO_ROOT, machine_lines, percentile
from _stream import (
    Client,
    ServerProcess,
    SSEClient,
    Tally,
    WSClient,
    close_all,
    connect,
    raise_nofile,
    rss_kb,
    run_reactor,
)

MIB = 1024 * 1024
RUN = "bench-memory"
_LOG = b'"type":"log"'


class Case:
    """One scenario: how much of what passes, how the reader behaves, the target."""

    def __init__(
        self, name: str, total: int, event: int, batch: int, stalled: bool, target_mib: float
    ) -> None:
        self.name = name
        self.total = total  # bytes of encoded events to publish
        self.event = event  # bytes of one encoded event
        self.batch = batch
        self.stalled = stalled
        self.target_mib = target_mib


CASES = {
    "large": Case("large", 180_000_000, 60_000, 16, False, 150.0),
    "stalled": Case("stalled", 40_000_000, 2_000, 500, True, 60.0),
}


def _shared_bytecode(scratch: Path) -> Callable[[bool, Path], dict[str, str]]:
    """
    ``child_env`` with one bytecode cache for every server of this run: each
    server's own (empty) cache made every start compile Twisted again, 6 to
    13 s here, past the start deadline on a busy machine.
    """
    make = _stream.child_env

    def child_env(tree: bool, server_scratch: Path) -> dict[str, str]:
        env = make(tree, server_scratch)
        env["PYTHONPYCACHEPREFIX"] = str(scratch)
        return env

    return child_env


# Events and the publisher (a thread: it blocks on the socket, the reactor reads)


def _filler(size: int) -> str:
    rng = random.Random(size)
    return "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(size))


class Bodies:
    """Request bodies of ``batch`` log events of ``size`` encoded bytes each, all different."""

    def __init__(self, size: int, batch: int) -> None:
        head = f'{{"type":"log","run":"{RUN}","level":"info","time":%.6f,"message":"%08d '
        # What the server adds when it encodes an event: ``"id":N,``.
        room = size - len(head % (0.0, 0)) - len('"}') - len('"id":1234567,')
        self.filler = _filler(max(1, room))
        self.head = head
        self.batch = batch
        self.count = 0

    def next(self) -> bytes:
        now = time.time()
        items = []
        for _ in range(self.batch):
            self.count += 1
            items.append(self.head % (now, self.count) + self.filler + '"}')
        return ("[" + ",".join(items) + "]").encode()


class Poster:
    """``POST /api/events`` over one keep-alive connection, blocking."""

    def __init__(self, host: str, port: int) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=120)

    def send(self, body: bytes) -> int:
        self.conn.request("POST", "/api/events", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return int(json.loads(data)["accepted"])

    def close(self) -> None:
        self.conn.close()


def publish(host: str, port: int, size: int, batch: int, total: int) -> tuple[int, int, float]:
    """Publish about ``total`` bytes of events; (events, bytes, seconds)."""
    bodies = Bodies(size, batch)
    poster = Poster(host, port)
    sent = events = 0
    t0 = time.monotonic()
    try:
        while sent < total:
            body = bodies.next()
            events += poster.send(body)
            sent += len(body)
    finally:
        poster.close()
    return events, sent, time.monotonic() - t0


# The reader


class LogTally(Tally):
    """Counts the log events a reader got."""

    def feed(self, blob: bytes, now: float) -> None:
        self.count += blob.count(_LOG)


def reader(kind: str, server: ServerProcess) -> tuple[Client, str, int]:
    host, port, path = server.address(kind)
    tally = LogTally(array("d"))
    if kind == "sse":
        return SSEClient(tally, host, port, path, filtered=False), host, port
    return WSClient(tally, host, port, path, filtered=False), host, port


# One run


class Sampler:
    """RSS of the server (and of its children) every ``interval`` seconds."""

    def __init__(self, reactor: Any, pid: int, interval: float = 0.1) -> None:
        from twisted.internet.task import LoopingCall

        self.pid = pid
        self.samples: list[int] = []
        self.children_peak = 0
        self._call = LoopingCall(self._sample)
        self._call.clock = reactor
        self._call.start(interval, now=True)

    def _sample(self) -> None:
        self.samples.append(rss_kb(self.pid))
        children = 0
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children", encoding="ascii") as f:
                for child in f.read().split():
                    children += rss_kb(int(child))
        except OSError:
            pass
        self.children_peak = max(self.children_peak, children)

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()


async def sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, max(0.0, seconds), lambda: None)


def overflows(server: ServerProcess) -> str:
    host, port, _ = server.address("rest")
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode("utf-8", "replace")
        conn.close()
    except OSError as e:
        return f"/metrics failed: {e}"
    for line in text.splitlines():
        if line.startswith("trainstream_client_overflows") and "_created" not in line:
            return line.split()[-1]
    return "?"


_IMPORTS = (
    "import twisted.scripts.twistd, trainstream.tap, trainstream.server, trainstream.embedded, "
    "trainstream.store.writer; from twisted.plugin import getPlugins; "
    "from twisted.application.service import IServiceMaker; list(getPlugins(IServiceMaker))"
)


def precompile() -> None:
    """Import what twistd will, with no deadline: the bytecode every start then reads."""
    scratch = Path(tempfile.mkdtemp(prefix="trainstream-memory-"))
    try:
        env = _stream.child_env(True, scratch)
        subprocess.run([sys.executable, "-c", _IMPORTS], env=env, cwd=scratch, timeout=600)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def start_server(extra: tuple[str, ...], store_args: tuple[str, ...]) -> ServerProcess:
    """A server, tried three times: on a busy machine a start may miss its deadline."""
    for attempt in range(3):
        try:
            return ServerProcess(extra, store=store_args, prefix="trainstream-memory-")
        except SystemExit as e:
            print(f"      start {attempt + 1} failed: {str(e).strip()[:300]}")
    raise SystemExit("twistd did not start three times")


async def one_run(reactor: Any, case: Case, store: str, args: argparse.Namespace) -> float:
    """One fresh server, one case; the growth (MiB, peak minus baseline)."""
    from twisted.internet.threads import deferToThread

    store_args = ("--db", "{scratch}/history.sqlite3") if store == "db" else ("--memory",)
    extra = ("--cache-mb", str(args.cache_mb)) if args.cache_mb is not None else ()
    server = start_server(extra, store_args)
    clients: list[Client] = []
    sampler: Sampler | None = None
    try:
        kind = args.stalled if case.stalled else "sse"
        client, host, port = reader(kind, server)
        await connect(client, host, port, reactor)
        clients.append(client)
        rhost, rport, _ = server.address("rest")
        # Warm-up: one request of the same kind, so the first request's
        # allocations are in the baseline.
        await deferToThread(publish, rhost, rport, case.event, case.batch, 1)
        if case.stalled:
            client.transport.pauseProducing()  # never reads again
        await sleep(reactor, 0.5)
        base = []
        for _ in range(10):
            base.append(server.rss())
            await sleep(reactor, 0.1)
        baseline = percentile(base, 50)
        sampler = Sampler(reactor, server.pid)
        events, sent, seconds = await deferToThread(
            publish, rhost, rport, case.event, case.batch, case.total
        )
        during = len(sampler.samples)
        await sleep(reactor, 2.0)
        sampler.stop()
        samples = sampler.samples
        peak = max(samples)
        settled = percentile(samples[during:], 50) if len(samples) > during else samples[-1]
        growth = (peak - baseline) / 1024
        got = client.tally.count
        print(
            f"  [{store:<6} {case.name}] {events} events, {sent / 1e6:.0f} MB in {seconds:.1f} s "
            f"({sent / 1e6 / seconds:.0f} MB/s); RSS baseline {baseline / 1024:.1f} MiB, "
            f"peak {peak / 1024:.1f} MiB, settled {settled / 1024:.1f} MiB: growth "
            f"{growth:.1f} MiB (settled {(settled - baseline) / 1024:.1f}), target < "
            f"{case.target_mib:.0f} MiB: {'under' if growth < case.target_mib else 'OVER'}"
        )
        print(
            f"      reader ({kind}, {'stalled' if case.stalled else 'reading'}): "
            f"{got} events received; client overflows {overflows(server)}"
            + (
                f"; writer process RSS peak {sampler.children_peak / 1024:.1f} MiB"
                if store == "db"
                else ""
            )
        )
        return growth
    finally:
        if sampler is not None:
            sampler.stop()
        for c in clients:
            if c.transport is not None:
                c.transport.abortConnection()
        await close_all(clients, reactor, limit=5.0)
        code = server.stop()  # twistd ends with the signal's status: -15 is a clean stop
        problems = server.problems()
        if code not in (0, -15) or problems:
            print(f"      server exit {code}; log {server.log_path}: {problems[:3]}")
        else:
            shutil.rmtree(server.scratch, ignore_errors=True)


async def measure(reactor: Any, args: argparse.Namespace) -> None:
    stores = ("db", "memory") if args.store == "both" else (args.store,)
    cases = [CASES[args.only]] if args.only else list(CASES.values())
    # One server first, not measured: it compiles the bytecode every later
    # start reads, memory that a measured server would otherwise free and
    # reuse (a higher baseline, a smaller growth).
    precompile()
    warm = start_server((), ("--memory",))
    warm.stop()
    shutil.rmtree(warm.scratch, ignore_errors=True)
    summary = []
    for case in cases:
        if args.quick:
            case.total //= 4
        for store in stores:
            print(
                f"\n{case.name}: {case.total / 1e6:.0f} MB of {case.event // 1000} KB log events, "
                f"{store}, {args.repeat} run(s)"
            )
            growths = [await one_run(reactor, case, store, args) for _ in range(args.repeat)]
            summary.append((case, store, growths))
    print("\nsummary (median over runs of peak RSS growth):")
    for case, store, growths in summary:
        median = percentile(growths, 50)
        print(
            f"  {case.name:<8} {store:<6} {median:7.1f} MiB (runs: "
            f"{', '.join(f'{g:.1f}' for g in growths)}); target < {case.target_mib:.0f} MiB: "
            f"{'under' if median < case.target_mib else 'OVER'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case and store (3)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the bytes, 1 run")
    parser.add_argument("--store", choices=("db", "memory", "both"), default="both")
    parser.add_argument("--only", choices=tuple(CASES), default=None)
    parser.add_argument("--stalled", choices=("sse", "ws"), default="sse", help="(sse)")
    parser.add_argument(
        "--cache-mb", type=float, default=None, help="pass --cache-mb M (default: the server's)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.repeat = 1
    args.repeat = max(1, min(args.repeat, 20))
    raise_nofile()
    # twistd finds the plugin in this checkout's twisted/plugins (an editable
    # install does not put it on twistd's plugin path).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    print("memory: server RSS growth while big events pass")
    for line in machine_lines():
        print("  " + line)
    pycache = Path(tempfile.mkdtemp(prefix="trainstream-memory-pycache-"))
    _stream.child_env = _shared_bytecode(pycache)
    try:
        run_reactor(lambda reactor: measure(reactor, args))
    finally:
        shutil.rmtree(pycache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
