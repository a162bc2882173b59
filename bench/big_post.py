"""
How long one large ``POST /api/events`` holds everyone else up.

One ``twistd -n trainstream`` (SQLite history in a scratch folder, as
``bench/ingest.py`` starts it). Each round POSTs one batch of ``--events``
metric events (90,000: 6.8 MiB, within the body limit) while a second
connection asks ``GET /api/runs`` every 20 ms; the round's figure is the
slowest of those answers, and ``/api/health`` is asked once the POST is
answered (its reactor-lag check turns it 503 past ``--lag-warn``, 0.5 s).
Prints the median over ``--rounds``; it never fails on speed.

``--baseline DIR`` runs the same rounds on another copy of the package
(``DIR/trainstream``) first, in the same run, and prints the ratio.

    PYTHONPATH=. python bench/big_post.py [--events 90000] [--rounds 5] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine_lines
from bench._stream import wait_healthy
from bench.ingest import IngestServer, plugin_path

#: Seconds between the prober's GETs.
PROBE_EVERY = 0.02


def one_round(server: IngestServer, body: bytes) -> tuple[float, float, int]:
    """``(POST seconds, slowest GET /api/runs seconds meanwhile, health status after)``."""
    host, port, _ = server.address("rest")
    worst = [0.0]
    done = threading.Event()

    def probe() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            while not done.is_set():
                started = time.perf_counter()
                conn.request("GET", "/api/runs")
                conn.getresponse().read()
                worst[0] = max(worst[0], time.perf_counter() - started)
                time.sleep(PROBE_EVERY)
        finally:
            conn.close()

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.2)
    conn = http.client.HTTPConnection(host, port, timeout=120)
    started = time.perf_counter()
    conn.request("POST", "/api/events", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    took = time.perf_counter() - started
    conn.close()
    if response.status != 200:
        raise SystemExit(f"POST answered {response.status}: {answer[:200]!r}")
    time.sleep(0.2)
    done.set()
    prober.join(30)
    health = http.client.HTTPConnection(host, port, timeout=30)
    health.request("GET", "/api/health")
    status = health.getresponse().status
    health.close()
    return took, worst[0], status


def measure(label: str, tree: Path | None, body: bytes, rounds: int) -> list[float]:
    server = IngestServer("db", tree=tree)
    try:
        wait_healthy(server)
        worst: list[float] = []
        for i in range(rounds):
            took, slowest, status = one_round(server, body)
            worst.append(slowest)
            print(
                f"  {label} round {i + 1}: POST {took:.2f} s; slowest GET /api/runs meanwhile "
                f"{slowest * 1000:.0f} ms; /api/health then {status}",
                flush=True,
            )
            time.sleep(11)  # past the health check's 10 s window
        return worst
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--events", type=int, default=90_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another copy of the package, run first")
    args = parser.parse_args(argv)
    plugin_path()
    events = [
        {"type": "metric", "run": "big", "name": f"n{i % 10}", "step": i, "value": i}
        for i in range(args.events)
    ]
    body = json.dumps(events).encode()
    for line in machine_lines():
        print(line)
    print(f"one POST of {args.events:,} metric events ({len(body) / 2**20:.2f} MiB)")
    medians = {}
    trees: list[tuple[str, Path | None]] = [("after", None)]
    if args.baseline is not None:
        trees.insert(0, ("before", args.baseline))
    for label, tree in trees:
        medians[label] = statistics.median(measure(label, tree, body, args.rounds))
        print(f"{label}: median slowest GET during the POST {medians[label] * 1000:.0f} ms")
    if "before" in medians:
        print(f"ratio after/before: {medians['after'] / medians['before']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
