"""
Benchmark: a cluster of three ``twistd trainstream --redis`` servers and one
``redis-server`` on this machine (all on free loopback ports, stopped by
pid), beside one server without Redis, in the same run.

1. Events/s through the cluster with fan-out: a publisher on each server
   (``{"op": "publish"}`` over a WebSocket, each in a process of its own,
   offering ``--offered`` events/s for ``--seconds``) and an SSE watcher on
   each server, in this process. Each watcher counts every event once and
   keeps a checksum of the ids it got in order: every watcher must have
   every acknowledged event, the same ids in the same order. The figure is
   the events each watcher got over the time from the first arrival at any
   watcher to the last arrival at all (deliveries/s: that times the three
   watchers); a list of offered rates finds where the cluster stops keeping
   up (then the servers coalesce metric events for the watchers, as the
   contract allows: counted, and said). The single server gets the
   same three publishers and three watchers.
2. Latency from publish on server A to a watcher on server C (and on A
   itself), at 20 Hz (20 events/s, one a message) and at 1,000 events/s
   (one a message), p50/p99: arrival time at the watcher minus the event's
   send time, one clock (loopback). The single server: publisher and
   watcher on it.

Redis runs with ``--appendonly`` as given (``no`` by default; ``always``
means ``--appendonly yes --appendfsync always``). It prints figures and
fails only when events are lost or out of order::

    .venv/bin/python bench/cluster.py [--seconds 5] [--offered 10000,20000,40000]
        [--latency-seconds 10] [--aof no|everysec|always] [--store memory|sqlite]
        [--setups single,cluster] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import zlib
from array import array
from typing import Any

from _common import RedisServer, machine_lines, percentile, plugin_on_path, summary_line
from _stream import (
    _ID,
    ServerProcess,
    SSEClient,
    Tally,
    close_all,
    connect,
    cpu_seconds,
    publish_in_subprocess,
    run_reactor,
    wait_healthy,
)
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

DRAIN_S = 60.0
_COALESCED = re.compile(rb'"coalesced":(\d+)')


class OrderTally(Tally):
    """A ``Tally`` that also checks every id it gets: in order, once, and their checksum."""

    def __init__(self, samples: array[float]) -> None:
        super().__init__(samples)
        self.crc = 0
        self.ids_seen = 0
        self.disorder = 0
        self.first = 0
        self.prev = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.folded = 0  # events the server folded into a newer value ("coalesced": n)

    def feed(self, blob: bytes, now: float) -> None:
        super().feed(blob, now)
        found = _ID.findall(blob)
        if not found:
            return
        ids = [int(x) for x in found]
        if not self.first:
            self.first = ids[0]
            self.t_first = now
        self.t_last = now
        prev = self.prev
        for i in ids:
            if i <= prev:
                self.disorder += 1
            prev = i
        self.prev = prev
        self.ids_seen += len(ids)
        if b'"coalesced":' in blob:
            self.folded += sum(int(n) for n in _COALESCED.findall(blob))
        self.crc = zlib.crc32(b",".join(found) + b",", self.crc)


def start_servers(n: int, redis: RedisServer | None, store: str) -> list[ServerProcess]:
    stores = {"memory": ("--memory",), "sqlite": ("--db", "{scratch}/history.db")}
    extra = ["--redis", redis.url] if redis is not None else []
    servers: list[ServerProcess] = []
    try:
        for _ in range(n):
            servers.append(ServerProcess(extra=extra, store=stores[store]))
        for s in servers:
            wait_healthy(s)  # a cluster server listens before it has reached Redis
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


async def watcher(reactor: Any, server: ServerProcess) -> SSEClient:
    host, port, path = server.address("sse")
    client = SSEClient(OrderTally(array("d")), host, port, path)
    await connect(client, host, port, reactor)
    return client


async def throughput(
    reactor: Any,
    servers: list[ServerProcess],
    offered: float,
    seconds: float,
    redis: RedisServer | None,
) -> dict[str, Any]:
    """Three publishers and three watchers, spread over ``servers``."""
    watchers = [await watcher(reactor, servers[i % len(servers)]) for i in range(3)]
    cpu0 = [s.cpu() for s in servers]
    redis0 = cpu_seconds(redis.pid) if redis else 0.0
    t0 = time.monotonic()
    pubs = await gatherResults(
        [
            Deferred.fromCoroutine(
                publish_in_subprocess(
                    reactor, servers[i % len(servers)], offered / 3, 50, seconds, 10
                )
            )
            for i in range(3)
        ]
    )
    acked = sum(p["acked"] for p in pubs)
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        if all(w.tally.count + w.tally.folded >= acked or w.lost for w in watchers):
            break
        await deferLater(reactor, 0.01, lambda: None)
    wall = time.monotonic() - t0
    server_cpu = sum(s.cpu() - c for s, c in zip(servers, cpu0, strict=True))
    redis_cpu = cpu_seconds(redis.pid) - redis0 if redis else 0.0
    tallies: list[OrderTally] = [w.tally for w in watchers]  # type: ignore[misc]
    await close_all(watchers, reactor)
    return {
        "offered": offered,
        "sent": sum(p["sent"] for p in pubs),
        "acked": acked,
        "errors": [e for p in pubs for e in p["errors"]][:3],
        "wall": wall,
        "publish_wall": max(p["wall"] for p in pubs),
        "server_cpu_us": server_cpu / max(1, acked) * 1e6,
        "redis_cpu_us": redis_cpu / max(1, acked) * 1e6,
        "load": os.getloadavg()[0],
        "counts": [t.count for t in tallies],
        "folded": [t.folded for t in tallies],
        "crcs": [t.crc for t in tallies],
        "disorder": [t.disorder for t in tallies],
        "client_errors": [e for t in tallies for e in t.errors][:3],
        # From the first event's arrival at any watcher to the last one's at all.
        "per_s": min(t.count for t in tallies)
        / max(1e-9, max(t.t_last for t in tallies) - min(t.t_first for t in tallies)),
    }


async def latency(
    reactor: Any, publish_on: ServerProcess, watch: list[ServerProcess], rate: float, seconds: float
) -> list[array[float]]:
    watchers = [await watcher(reactor, s) for s in watch]
    figures = await publish_in_subprocess(reactor, publish_on, rate, rate, seconds, 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(w.tally.count >= figures["acked"] or w.lost for w in watchers):
            break
        await deferLater(reactor, 0.02, lambda: None)
    await close_all(watchers, reactor)
    for w in watchers:
        if w.tally.count != figures["acked"]:
            print(f"    WARNING: a watcher got {w.tally.count} of {figures['acked']} events")
    return [w.tally.samples for w in watchers]


def throughput_lines(label: str, r: dict[str, Any]) -> tuple[list[str], bool]:
    ok = (
        all(c + f == r["acked"] for c, f in zip(r["counts"], r["folded"], strict=True))
        and (len(set(r["crcs"])) == 1 or any(r["folded"]))  # each folds at its own pace
        and not any(r["disorder"])
    )
    lines = [
        f"  {label:<22} offered {r['offered']:,.0f}/s for {r['publish_wall']:.1f} s: "
        f"sent {r['sent']:,}, acked {r['acked']:,}; every watcher has all "
        f"{r['acked']:,} {r['wall']:.1f} s after the start: {r['per_s']:,.0f} events/s "
        f"({3 * r['per_s']:,.0f} deliveries/s)",
        f"  {'':<22} CPU per event: servers {r['server_cpu_us']:.0f} us in all"
        + (f", redis-server {r['redis_cpu_us']:.1f} us" if r["redis_cpu_us"] else "")
        + f"; load average {r['load']:.1f}",
        f"  {'':<22} watchers got {r['counts']}"
        + (
            f" + {r['folded']} folded by coalescing (the server fell behind: "
            "the rate above is past what it sustains)"
            if any(r["folded"])
            else ""
        )
        + ", same ids in the same order: "
        f"{'yes' if len(set(r['crcs'])) == 1 else 'NO'}, out of order {r['disorder']}"
        + ("" if ok else "   <-- LOST, EXTRA OR OUT OF ORDER"),
    ]
    if r["errors"] or r["client_errors"]:
        lines.append(f"  {'':<22} errors: {r['errors'] + r['client_errors']}")
    return lines, ok


async def main(reactor: Any, args: argparse.Namespace) -> None:
    for line in machine_lines():
        print(line)
    aof = {
        "no": ("no", ()),
        "everysec": ("yes", ("--appendfsync", "everysec")),
        "always": ("yes", ("--appendfsync", "always")),
    }[args.aof]
    print(f"store: --{args.store} on every server; Redis --appendonly {aof[0]} {' '.join(aof[1])}")
    ok = True
    # results[setup, key] is a list, one entry per round
    results: dict[tuple[str, Any], list[Any]] = {}
    setups = args.setups.split(",")
    offered_rates = [float(x) for x in args.offered.split(",")]
    for round_ in range(args.rounds):
        for setup in setups if round_ % 2 == 0 else setups[::-1]:
            good = await one_setup(reactor, args, setup, aof, offered_rates, results, round_)
            ok = ok and good
    print(f"\nsummary: medians over {args.rounds} round(s), single and cluster interleaved")
    print(f"  latency (ms)                  {'p50':>9}{'p99':>9}")
    for rate in (20.0, 1000.0):
        for setup, label in (("single", "one server"), ("cluster", "A->A"), ("cluster", "A->C")):
            if setup not in setups:
                continue
            runs = [r[label] for r in results[setup, rate]]
            p50 = statistics.median(percentile(v, 50) for v in runs)
            p99 = statistics.median(percentile(v, 99) for v in runs)
            name = f"{rate:g}/s {setup} {label}"
            print(f"  {name:<30}{p50:9.2f}{p99:9.2f}")
    print("  fan-out, events/s to each of 3 watchers (each round)")
    for setup in setups:
        for offered in offered_rates:
            runs = [r for r in results[setup, "throughput"] if r["offered"] == offered]
            per_s = statistics.median(r["per_s"] for r in runs)
            cpu = statistics.median(r["server_cpu_us"] for r in runs)
            redis_cpu = statistics.median(r["redis_cpu_us"] for r in runs)
            folded = sum(1 for r in runs if any(r["folded"]))
            each = ", ".join(f"{r['per_s']:,.0f}" for r in runs)
            print(
                f"  {setup:<8} offered {offered:>8,.0f}/s: median {per_s:>8,.0f}  ({each}); "
                f"CPU per event: servers {cpu:.0f} us"
                + (f", Redis {redis_cpu:.1f} us" if redis_cpu else "")
                + (f", coalescing in {folded} round(s): fell behind" if folded else "")
            )
    if not ok:
        print("events were lost, repeated or out of order")
        sys.exit(1)


async def one_setup(
    reactor: Any,
    args: argparse.Namespace,
    setup: str,
    aof: tuple[str, tuple[str, ...]],
    offered_rates: list[float],
    results: dict[tuple[str, Any], list[Any]],
    round_: int,
) -> bool:
    """One server without Redis, or three on a new Redis: throughput, then latency."""
    ok = True
    redis = RedisServer(appendonly=aof[0], extra=aof[1]) if setup == "cluster" else None
    servers = start_servers(3 if redis else 1, redis, args.store)
    try:
        where = (
            f"3 servers {[s.pid for s in servers]} + redis-server {redis.pid} on {redis.port}"
            if redis
            else f"1 server {servers[0].pid}, no Redis"
        )
        print(f"\nround {round_ + 1}, {setup}: {where}", flush=True)
        for offered in offered_rates:
            r = await throughput(reactor, servers, offered, args.seconds, redis)
            lines, good = throughput_lines("fan-out throughput", r)
            ok = ok and good
            print("\n".join(lines), flush=True)
            results.setdefault((setup, "throughput"), []).append(r)
        for rate in (20.0, 1000.0):
            if redis:
                a, c = servers[0], servers[2]
                samples = await latency(reactor, a, [c, a], rate, args.latency_seconds)
                figures = {"A->C": samples[0], "A->A": samples[1]}
            else:
                s = servers[0]
                samples = await latency(reactor, s, [s], rate, args.latency_seconds)
                figures = {"one server": samples[0]}
            results.setdefault((setup, rate), []).append(figures)
            for label, values in figures.items():
                print(summary_line(f"{rate:g}/s {label}", values), flush=True)
        for s in servers:
            problems = s.problems()
            if problems:
                print(f"  server {s.pid} logged {len(problems)} problem lines: {problems[:2]}")
    finally:
        for s in servers:
            s.stop()
        if redis is not None:
            redis.stop()
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput phase length")
    parser.add_argument(
        "--offered", default="10000,20000,40000", help="events/s, all publishers (a list)"
    )
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="each latency case")
    parser.add_argument("--aof", choices=("no", "everysec", "always"), default="no")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--rounds", type=int, default=1, help="single and cluster, interleaved")
    parser.add_argument("--setups", default="single,cluster", help="single, cluster or both")
    arguments = parser.parse_args()
    plugin_on_path()
    run_reactor(lambda reactor: main(reactor, arguments))
