"""
Benchmark: fan-out to many watchers, each scenario on a fresh
``twistd -n trainstream`` subprocess.

(a) 50 watchers (25 SSE + 25 WebSocket) at 200 points/s: every point
    delivered, p99 latency (target <= 10 ms), server RSS (target <= 60 MB).
(b) 1,000 events/s to 500 SSE + 500 WebSocket clients: none lost, p99
    latency (target <= 100 ms), server RSS growth per idle client (target
    <= 50 KB).

One client process (this one, one epoll reactor) holds every watcher; a
small WebSocket publisher runs in a process of its own (``--inline-publisher``
puts it in this one) and sends batches of metric events whose ``time`` is the
send time, so its send times and its publish -> ack figures do not wait on
the busy client reactor. Latency is one sample per client per distinct send time seen
in one read. The client process is Python too: its CPU and its reactor's
timer lag are printed, so a client-side bottleneck shows. It prints figures
and never fails on speed::

    PYTHONPATH=. .venv/bin/python bench/fanout.py [--quick] [--seconds S] [--only a|b]
"""

from __future__ import annotations

import argparse
import sys
import time
from array import array
from typing import Any

from _common import machine_lines, percentile, summary_line
from _stream import (
    Client,
    CpuWatch,
    LagProbe,
    Publisher,
    RssWatch,
    ServerProcess,
    SSEClient,
    Tally,
    WSClient,
    close_all,
    connect,
    connect_many,
    delivery_lines,
    drain,
    publish_in_subprocess,
    raise_nofile,
)


async def scenario(
    reactor: Any,
    label: str,
    per_kind: int,
    rate: float,
    seconds: float,
    hz: float,
    latency_target_ms: float,
    rss_target_mb: float | None,
    idle_target_kb: float | None,
    profile: bool = False,
    filtered: bool = True,
    inline_publisher: bool = False,
) -> None:
    """Start a server, attach ``per_kind`` SSE and WebSocket clients, publish, report."""
    print(
        f"\n({label}) {per_kind} SSE + {per_kind} WS clients, {rate:g} events/s in "
        f"{hz:g} batches/s for {seconds:g} s; clients subscribe "
        + ("to ?run=bench&type=metric" if filtered else "unfiltered (everything)")
    )
    server = ServerProcess(profile=profile)
    print(f"  server pid {server.pid}: {' '.join(server.command)}")
    clients: list[Client] = []
    lag = LagProbe(reactor)
    try:
        sse_ms: array[float] = array("d")
        ws_ms: array[float] = array("d")
        # Warm-up: one client of each kind, then gone, so one-time costs are not per client.
        warm = [
            SSEClient(Tally(array("d")), *server.address("sse")),
            WSClient(Tally(array("d")), *server.address("ws")),
        ]
        for client, role in zip(warm, ("sse", "ws"), strict=True):
            await connect(client, *server.address(role)[:2], reactor)
        await close_all(warm, reactor)
        await sleep(reactor, 0.5)
        rss_idle0 = server.rss()

        sse_host, sse_port, sse_path = server.address("sse")
        ws_host, ws_port, ws_path = server.address("ws")

        def make(i: int) -> tuple[Client, str, int]:
            if i % 2 == 0:
                sse = SSEClient(Tally(sse_ms), sse_host, sse_port, sse_path, filtered=filtered)
                return sse, sse_host, sse_port
            ws = WSClient(Tally(ws_ms), ws_host, ws_port, ws_path, filtered=filtered)
            return ws, ws_host, ws_port

        t0 = time.monotonic()
        cpu_connect = CpuWatch(server.pid)
        clients = await connect_many(make, 2 * per_kind, reactor)
        connect_s = time.monotonic() - t0
        connect_cpu = cpu_connect.line()
        await sleep(reactor, 1.0)
        rss_idle1 = server.rss()
        grow_kb = (rss_idle1 - rss_idle0) / len(clients)
        print(
            f"  connected {len(clients)} clients in {connect_s:.2f} s; server RSS "
            f"{rss_idle0 / 1024:.1f} MiB before, {rss_idle1 / 1024:.1f} MiB with them idle: "
            f"{grow_kb:.1f} KiB per idle client"
            + (target(grow_kb, idle_target_kb, "KB") if idle_target_kb is not None else "")
        )
        print(f"  connecting: {connect_cpu.strip()}")

        rss = RssWatch(reactor, server.pid)
        cpu = CpuWatch(server.pid)
        lag.start()
        if inline_publisher:
            pub_ws = WSClient(Tally(array("d")), ws_host, ws_port, ws_path, subscribe=False)
            await connect(pub_ws, ws_host, ws_port, reactor)
            clients.append(pub_ws)
            publisher = Publisher(pub_ws, rate=rate, hz=hz, names=10, reactor=reactor)
            wall = await publisher.run(seconds)
            pub: dict[str, Any] = {
                "sent": publisher.sent,
                "acked": publisher.acked,
                "messages": publisher.messages,
                "wall": wall,
                "ack_ms": publisher.ack_ms,
                "errors": publisher.errors,
                "cpu": None,
            }
        else:
            pub = await publish_in_subprocess(reactor, server, rate, hz, seconds, names=10)
        watchers = [c for c in clients if c.tally.samples is sse_ms or c.tally.samples is ws_ms]
        waited = await drain(watchers, pub["sent"], reactor, limit=max(10.0, seconds))
        lag.stop()
        rss.stop()
        cpu_text = cpu.line()
        where = "in this process" if inline_publisher else "in its own process"
        print(
            f"  published ({where}) {pub['sent']} events in {pub['messages']} messages over "
            f"{pub['wall']:.1f} s ({pub['sent'] / pub['wall']:.0f}/s), acked {pub['acked']}; "
            f"all delivered {waited:.2f} s after the last publish"
            + (" (or gave up)" if waited >= max(10.0, seconds) else "")
        )
        if pub["errors"]:
            print(f"  publisher errors: {pub['errors'][:3]}")
        for kind, cls in (("sse", SSEClient), ("ws", WSClient)):
            of_kind = [c for c in watchers if type(c) is cls]
            for line in delivery_lines(kind, of_kind, pub["acked"]):
                print(line)
        print("  latency, send -> bytes at the client (ms), one sample per client per batch:")
        print(summary_line("SSE", sse_ms))
        print(summary_line("WebSocket", ws_ms))
        both = array("d", sse_ms)
        both.extend(ws_ms)
        print(summary_line("all", both))
        print(summary_line("publish -> ack", pub["ack_ms"]))
        print(summary_line("client timer lag", lag.lag_ms))
        p99 = percentile(both, 99)
        print(
            f"  p99 {p99:.1f} ms vs target {latency_target_ms:g} ms: "
            f"{'met' if p99 <= latency_target_ms else 'NOT met'}"
        )
        print(cpu_text)
        if pub["cpu"] is not None:
            print(f"  publisher process CPU: {pub['cpu']:.2f} s")
        peak = rss.peak_kb / 1024
        print(
            f"  server RSS: peak {peak:.1f} MiB, at the end {rss.last_kb / 1024:.1f} MiB"
            + (target(peak * 1.048576, rss_target_mb, "MB") if rss_target_mb is not None else "")
        )
    finally:
        left = await close_all(clients, reactor, limit=10.0)
        code = server.stop()
        problems = server.problems()
        print(
            f"  {left} clients had to be aborted; server exit code {code}; "
            f"log {server.log_path}: {len(problems)} error lines"
        )
        for line in problems[:10]:
            print(f"    {line[:300]}")
        if profile:
            print("  server profile (cProfile under twistd, whole life), top 15 by tottime:")
            print(server.profile_top(15))


def target(value: float, limit: float, unit: str) -> str:
    """`` (target <= limit unit: met)`` or ``NOT met``."""
    return f" (target <= {limit:g} {unit}: {'met' if value <= limit else 'NOT met'})"


async def sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


async def measure(reactor: Any, args: argparse.Namespace) -> None:
    if args.only in (None, "a"):
        await scenario(
            reactor,
            "a",
            args.a_clients,
            args.a_rate,
            args.seconds,
            args.hz,
            latency_target_ms=10.0,
            rss_target_mb=60.0,
            idle_target_kb=None,
            profile=args.profile_server,
            filtered=not args.unfiltered,
            inline_publisher=args.inline_publisher,
        )
    if args.only in (None, "b"):
        await scenario(
            reactor,
            "b",
            args.b_clients,
            args.b_rate,
            args.seconds,
            args.hz,
            latency_target_ms=100.0,
            rss_target_mb=None,
            idle_target_kb=50.0,
            profile=args.profile_server,
            filtered=not args.unfiltered,
            inline_publisher=args.inline_publisher,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="publishing time (30)")
    parser.add_argument("--hz", type=float, default=20.0, help="publish batches per second (20)")
    parser.add_argument("--only", choices=("a", "b"), help="run one scenario")
    parser.add_argument("--a-clients", type=int, default=25, help="(a) clients per kind (25)")
    parser.add_argument("--a-rate", type=float, default=200.0, help="(a) events/s (200)")
    parser.add_argument("--b-clients", type=int, default=500, help="(b) clients per kind (500)")
    parser.add_argument("--b-rate", type=float, default=1000.0, help="(b) events/s (1000)")
    parser.add_argument(
        "--profile-server",
        action="store_true",
        help="run the server under twistd --profile (slower: figures are not comparable)",
    )
    parser.add_argument(
        "--unfiltered", action="store_true", help="clients subscribe to everything, no filter"
    )
    parser.add_argument(
        "--inline-publisher",
        action="store_true",
        help="publish from this (client) process instead of a process of its own",
    )
    parser.add_argument("--quick", action="store_true", help="5 s per scenario")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 5.0
    soft, hard = raise_nofile()
    print("fanout: one publisher, many SSE and WebSocket watchers")
    for line in machine_lines():
        print("  " + line)
    print(f"  RLIMIT_NOFILE {soft}/{hard} (the server subprocess inherits it)")
    from _stream import run_reactor

    run_reactor(lambda reactor: measure(reactor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
