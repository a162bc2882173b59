"""
Benchmark: reads of a long SQLite history that match nothing (issue "Exact
under faults", item 6: the reactor never waits on the disk). Target:
``/api/health`` p99 under 50 ms while three clients resume with
non-matching filters on a 1M-event history.

1. Builds a history file of N events (1,000,000; ``--quick``: 200,000)
   through the store's own schema and write path (``schema.migrate``,
   ``rows.add_rows``, ``writer.apply``, batches of 5000): metrics of four
   names and logs of runs ``train`` and ``eval``.
2. In process, on that file (a store just started: its cache is empty, every
   read goes to the file), the cost of one resume from id 0 with each
   non-matching filter, as the reactor thread pays it: ``store.after(0,
   flt, 2000)`` with the Filter (indexes) and with ``flt.matches`` (any
   predicate: every row read and decoded). Median of ``--reps``.
3. ``twistd -n trainstream --db FILE`` from the working tree; ``--clients``
   threads resume over SSE with ``Last-Event-ID: 0`` and a non-matching
   filter, again and again (a resume is done once its first bytes arrive:
   the server writes them after the replay); meanwhile ``GET /api/health``
   every 20 ms on one connection. Repeated ``--runs`` times; the median run
   (by health p99) is reported with all the runs.

It prints figures and never fails on speed::

    .venv/bin/python bench/store_reads.py [--quick] [--events N] [--runs 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from _common import machine_lines, percentile, source_lines, use_tree

use_tree()
REPO = Path(__file__).resolve().parent.parent

from startup import find_twistd  # noqa: E402

import trainstream  # noqa: E402
from trainstream.store import Filter, Record  # noqa: E402
from trainstream.store.rows import add_rows, rows_op  # noqa: E402
from trainstream.store.schema import migrate  # noqa: E402
from trainstream.store.sqlite import SQLiteStore  # noqa: E402
from trainstream.store.writer import apply, connect  # noqa: E402

#: (SSE query, the same as a Filter): match nothing in the built history.
NOTHING = (
    ("run=nomatch*", Filter(runs=("nomatch*",))),
    ("type=alert", Filter(types=("alert",))),
    ("run=train&type=metric&name=zz*", Filter(runs=("train",), types=("metric",), names=("zz*",))),
)
NAMES = ("train/loss", "train/acc", "lr", "grad_norm")


def build(path: Path, n: int) -> float:
    """Write ``n`` events to a new history at ``path``; seconds it took."""
    started = time.perf_counter()
    db = connect(str(path))
    migrate(db, str(path))
    series: dict[tuple[str, str], list[object]] = {}
    batch = 5000
    for first in range(1, n + 1, batch):
        records = []
        for i in range(first, min(n, first + batch - 1) + 1):
            run = "train" if i % 5 else "eval"
            if i % 10 == 0:
                text = (
                    f'{{"id":{i},"type":"log","run":"{run}","time":{1e9 + i / 1000},'
                    f'"level":"info","message":"step {i}"}}'
                )
                records.append(Record(i, "log", run, None, {"time": 1e9 + i / 1000}, text))
                continue
            name = NAMES[i % 4]
            event = {"step": i, "value": 1.0 / i, "time": 1e9 + i / 1000}
            text = (
                f'{{"id":{i},"type":"metric","run":"{run}","time":{event["time"]},'
                f'"name":"{name}","step":{i},"value":{event["value"]}}}'
            )
            records.append(Record(i, "metric", run, name, event, text))
        rows: list[tuple[object, ...]] = []
        bad: list[tuple[int, str]] = []
        add_rows(records, rows, series, bad)  # type: ignore[arg-type]
        apply(db, [rows_op(rows, series, records[-1].id)])  # type: ignore[arg-type]
    db.close()
    return time.perf_counter() - started


def in_process(path: Path, reps: int) -> list[str]:
    """One resume from 0 per non-matching filter: Filter vs predicate, in ms."""
    store = SQLiteStore(str(path), lambda f, *a: None)
    store.start()
    lines = []
    try:
        for query, flt in NOTHING:
            timings = {}
            for label, match in (("Filter", flt), ("predicate", flt.matches)):
                runs = []
                for _ in range(reps if label == "Filter" else max(1, reps // 10)):
                    t = time.perf_counter()
                    got = store.after(0, match, 2000)
                    runs.append((time.perf_counter() - t) * 1000)
                    assert got == [], (query, len(got))
                timings[label] = statistics.median(runs)
            lines.append(
                f"  {query:<32} Filter {timings['Filter']:8.3f} ms   "
                f"predicate {timings['predicate']:9.1f} ms"
            )
    finally:
        store.close()
    return lines


def resume_loop(
    host: str, port: int, path: str, stop: threading.Event, took: list[float], errors: list[str]
) -> None:
    """Resume from id 0 again and again until ``stop``; each resume's seconds in ``took``."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        "Last-Event-ID: 0\r\n\r\n"
    ).encode()
    while not stop.is_set():
        t = time.perf_counter()
        try:
            s = socket.create_connection((host, port), timeout=60)
            # Aborted on close: no TIME_WAIT pile-up from thousands of resumes.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(request)
            if not s.recv(4096):
                errors.append("closed before any byte")
            s.close()
        except OSError as e:
            errors.append(str(e))
            continue
        took.append(time.perf_counter() - t)


class Server:
    """``twistd -n trainstream --db PATH`` from the working tree, on free loopback ports."""

    def __init__(self, path: Path) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="trainstream-reads-"))
        ports = self.scratch / "ports.json"
        listen = "tcp:0:interface=127.0.0.1"
        env = dict(os.environ)
        # The repository first: its trainstream and its twisted/plugins.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.log = open(self.scratch / "twistd.log", "wb")
        self.proc = subprocess.Popen(
            [
                *(str(find_twistd()), "-n", "--pidfile=", "trainstream", "--db", str(path)),
                *("--sse", listen, "--ws", listen, "--rest", listen, "--ports-file", str(ports)),
            ],
            cwd=self.scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120  # it reads the history at start
        while not ports.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = (self.scratch / "twistd.log").read_text(errors="replace")
                raise SystemExit(f"twistd did not start; its output:\n{text[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written, then closed
        self.urls: dict[str, str] = json.loads(ports.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def one_run(path: Path, clients: int, seconds: float) -> dict[str, object]:
    started = time.perf_counter()
    server = Server(path)
    start_s = time.perf_counter() - started
    try:
        parts = urlsplit(server.urls["sse"])
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        rest = urlsplit(server.urls["rest"])
        health = http.client.HTTPConnection(rest.hostname, rest.port, timeout=60)
        health_path = rest.path.rstrip("/") + "/health"
        health.request("GET", health_path)
        health.getresponse().read()  # warm
        stop = threading.Event()
        took: list[float] = []
        errors: list[str] = []
        threads = [
            threading.Thread(
                target=resume_loop,
                args=(
                    host,
                    port,
                    f"{parts.path}?{NOTHING[i % len(NOTHING)][0]}",
                    stop,
                    took,
                    errors,
                ),
                daemon=True,
            )
            for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        latencies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t = time.perf_counter()
            health.request("GET", health_path)
            health.getresponse().read()
            latencies.append((time.perf_counter() - t) * 1000)
            time.sleep(0.02)
        stop.set()
        for thread in threads:
            thread.join(120)
        health.close()
    finally:
        server.stop()
    return {
        "start_s": start_s,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "n": len(latencies),
        "resumes": len(took),
        "resume_p50": percentile([t * 1000 for t in took], 50),
        "resume_p99": percentile([t * 1000 for t in took], 99),
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=None, help="history size (1,000,000)")
    parser.add_argument("--quick", action="store_true", help="200,000 events, 2 runs of 3 s")
    parser.add_argument("--runs", type=int, default=None, help="server runs (3)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per run (5)")
    parser.add_argument("--clients", type=int, default=3, help="resuming clients (3)")
    parser.add_argument("--reps", type=int, default=50, help="in-process repetitions (50)")
    args = parser.parse_args()
    n = args.events or (200_000 if args.quick else 1_000_000)
    runs = args.runs or (2 if args.quick else 3)
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    for line in [*machine_lines(), *source_lines(trainstream.__file__)]:
        print(line)
    scratch = Path(tempfile.mkdtemp(prefix="trainstream-reads-"))
    try:
        path = scratch / "history.sqlite3"
        took = build(path, n)
        size = sum(os.path.getsize(p) for p in scratch.iterdir()) / 1e6
        print(f"history: {n:,} events built in {took:.1f} s ({size:.0f} MB)")
        print("one resume from id 0 matching nothing, in the reactor thread (median):")
        for line in in_process(path, args.reps):
            print(line)
        print(
            f"/api/health every 20 ms while {args.clients} SSE clients resume from id 0 "
            f"with non-matching filters ({runs} runs of {seconds:g} s):"
        )
        results = []
        for i in range(runs):
            r = one_run(path, args.clients, seconds)
            results.append(r)
            print(
                f"  run {i + 1} (server up in {r['start_s']:.1f} s): health n={r['n']} "
                f"p50={r['p50']:.2f} p99={r['p99']:.2f} "
                f"max={r['max']:.2f} ms; resumes {r['resumes']} "
                f"(each p50={r['resume_p50']:.1f} p99={r['resume_p99']:.1f} ms), "
                f"errors {r['errors']}"
            )
        median = sorted(results, key=lambda r: float(r["p99"]))[len(results) // 2]  # type: ignore[arg-type]
        print(
            f"median run: /api/health p99 {median['p99']:.2f} ms (target < 50 ms), "
            f"max {median['max']:.2f} ms, {median['resumes']} resumes"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
