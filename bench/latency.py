"""
Benchmark: publish-to-client latency at 20 Hz (target: p99 <= 2 ms over SSE
and over WebSocket).

The server is ``twistd -n trainstream`` in a subprocess (its own GIL). This
process runs one epoll reactor with a WebSocket publisher (one metric per
``publish`` message, its ``time`` field = ``time.time()`` at send), one SSE
client and one WebSocket subscriber; latency = ``time.time()`` when the bytes
arrive - the event's ``time``. It prints figures and never fails on speed::

    PYTHONPATH=. .venv/bin/python bench/latency.py [--quick] [--seconds S] [--hz HZ]
"""

from __future__ import annotations

import argparse
import sys
from array import array
from typing import Any

from _common import machine_lines, percentile, summary_line
from _stream import (
    CpuWatch,
    Publisher,
    ServerProcess,
    SSEClient,
    Tally,
    WSClient,
    close_all,
    connect,
    delivery_lines,
    drain,
    run_reactor,
)


def verdict(samples: array[float], target_ms: float) -> str:
    p99 = percentile(samples, 99)
    return f"p99 {p99:.2f} ms vs target {target_ms} ms: {'met' if p99 <= target_ms else 'NOT met'}"


async def measure(reactor: Any, args: argparse.Namespace) -> None:
    server = ServerProcess()
    print(f"  server: pid {server.pid}, {server.urls}")
    print(f"  server command: {' '.join(server.command)}")
    clients: list[Any] = []
    try:
        sse_ms: array[float] = array("d")
        ws_ms: array[float] = array("d")
        sse = SSEClient(Tally(sse_ms), *server.address("sse"))
        ws = WSClient(Tally(ws_ms), *server.address("ws"))
        pub_ws = WSClient(Tally(array("d")), *server.address("ws"), subscribe=False)
        for client, role in ((sse, "sse"), (ws, "ws"), (pub_ws, "ws")):
            host, port, _ = server.address(role)
            await connect(client, host, port, reactor)
            clients.append(client)
        publisher = Publisher(pub_ws, rate=args.hz, hz=args.hz, names=1, reactor=reactor)
        rss0 = server.rss()
        cpu = CpuWatch(server.pid)
        wall = await publisher.run(args.seconds)
        waited = await drain([sse, ws], publisher.sent, reactor, limit=10.0)
        print(
            f"\npublished {publisher.sent} events in {publisher.messages} messages over "
            f"{wall:.1f} s ({publisher.sent / wall:.1f}/s); acked {publisher.acked}; "
            f"drained {waited:.2f} s after"
        )
        if publisher.errors:
            print(f"  publisher errors: {publisher.errors[:3]}")
        print("latency, send -> bytes at the client (ms):")
        print(summary_line("SSE", sse_ms))
        print(summary_line("WebSocket", ws_ms))
        print(summary_line("publish -> ack", publisher.ack_ms))
        print(f"  SSE: {verdict(sse_ms, 2.0)}; WebSocket: {verdict(ws_ms, 2.0)}")
        for label, client in (("sse", sse), ("ws", ws)):
            for line in delivery_lines(label, [client], publisher.acked):
                print(line)
        print(cpu.line())
        rss1 = server.rss()
        print(f"  server RSS: {rss0 / 1024:.1f} MiB before publishing, {rss1 / 1024:.1f} after")
    finally:
        await close_all(clients, reactor)
        code = server.stop()
        problems = server.problems()
        print(f"  server exit code {code}; log {server.log_path}: {len(problems)} error lines")
        for line in problems[:10]:
            print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="publishing time (30)")
    parser.add_argument("--hz", type=float, default=20.0, help="events per second (20)")
    parser.add_argument("--quick", action="store_true", help="5 s smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 5.0
    print("latency: publish -> SSE / WebSocket client")
    for line in machine_lines():
        print("  " + line)
    print(f"  {args.hz:g} Hz for {args.seconds:g} s, one metric per publish message")
    run_reactor(lambda reactor: measure(reactor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
