"""
Benchmark: the two Redis clients that fit a Twisted server, on this machine,
against one ``redis-server`` this script starts on a free port
(``--save "" --appendonly no``) and stops by its pid:

- ``txredisapi`` (1.6.0) on Twisted's default reactor (epoll): Deferreds;
- redis-py's asyncio client (``redis.asyncio``, with ``hiredis`` when
  installed) on Twisted's asyncio reactor, each call bridged with
  ``Deferred.fromFuture(asyncio.ensure_future(...))`` as Scrapy does.

For each: what importing it costs (ms, MiB RSS; for redis-py the asyncio
reactor too), the round trip of one EVALSHA of a publish-like Lua script
(INCRBY a counter, XADD one entry with the explicit id ``<n>-0``, return n)
and of one pipelined batch of 100 XADDs, events/s for such batches sent
back to back, and the client's CPU per call. Each client runs in a fresh
child process (one reactor per process); rounds alternate the two, and the
figures quoted are the medians over rounds. It prints figures, never fails
on speed::

    .venv/bin/pip install txredisapi==1.6.0 redis hiredis
    .venv/bin/python bench/redis_clients.py [--rounds 5] [--evals 2000] [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import RedisServer, machine_lines, percentile

CLIENTS = ("txredisapi", "redis-py")
BATCH = 100
WARMUP = 200
#: One event as the cluster would store it (~150 bytes of JSON).
PAYLOAD = (
    '{"type":"metric","run":"bench","name":"train/loss","step":1200,'
    '"value":0.4311,"time":1764412345.123,"rank":0,"id":0}'
)
#: Publish-like: one counter gives the id, the entry is added under it.
SCRIPT = """
local n = redis.call('INCRBY', KEYS[1], 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, n .. '-0', 'e', ARGV[1])
return n
"""
#: One publish batch in one call, as a cluster engine would send it.
BATCH_SCRIPT = """
local first = redis.call('INCRBY', KEYS[1], #ARGV) - #ARGV + 1
for i = 1, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, (first + i - 1) .. '-0', 'e', ARGV[i])
end
return first
"""


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# The child: one client, one reactor.


def worker(client: str, port: int, evals: int, batches: int, tag: str) -> None:
    import importlib

    for name in ("twisted.internet.defer", "twisted.internet.protocol", "twisted.internet.task"):
        importlib.import_module(name)  # what every trainstream server imports anyway: not counted
    out: dict[str, Any] = {"client": client}
    rss0, t0 = rss_kib(), time.perf_counter()
    if client == "redis-py":
        import asyncio

        from twisted.internet import asyncioreactor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # as Scrapy does: futures made before run() use it
        asyncioreactor.install(loop)
    from twisted.internet import reactor

    rss1, t1 = rss_kib(), time.perf_counter()
    if client == "redis-py":
        import redis.asyncio
        import redis.utils

        out["hiredis"] = bool(redis.utils.HIREDIS_AVAILABLE)
        out["version"] = redis.__version__
    else:
        import txredisapi

        out["version"] = getattr(txredisapi, "__version__", "?")
    rss2, t2 = rss_kib(), time.perf_counter()
    out["reactor"] = type(reactor).__name__
    out["reactor_import_ms"] = (t1 - t0) * 1000
    out["reactor_import_mib"] = (rss1 - rss0) / 1024
    out["lib_import_ms"] = (t2 - t1) * 1000
    out["lib_import_mib"] = (rss2 - rss1) / 1024

    from twisted.internet import task
    from twisted.internet.defer import Deferred

    keys = [f"bench:{tag}:n", f"bench:{tag}:s"]
    batch_key = f"bench:{tag}:b"

    async def timed(name: str, call: Any, n: int, events_each: int) -> None:
        """``n`` calls one after another: p50/p99 (ms), events/s, client CPU per event."""
        for k in range(max(1, n // 10)):  # warm-up, not counted
            await call(k)
        ms = []
        c0, w0 = cpu_s(), time.perf_counter()
        for k in range(n // 10 + 1, n // 10 + 1 + n):
            s = time.perf_counter()
            await call(k)
            ms.append((time.perf_counter() - s) * 1000)
        wall, cpu = time.perf_counter() - w0, cpu_s() - c0
        out[f"{name}_p50_ms"] = percentile(ms, 50)
        out[f"{name}_p99_ms"] = percentile(ms, 99)
        out[f"{name}_events_per_s"] = n * events_each / wall
        out[f"{name}_cpu_us"] = cpu / (n * events_each) * 1e6

    async def measure(ops: dict[str, Any]) -> None:
        await timed("eval", ops["eval"], evals, 1)
        await timed("evalbatch", ops["evalbatch"], batches, BATCH)
        await timed("batch", ops["batch"], batches, BATCH)
        await timed("xrange", ops["xrange"], batches, BATCH)
        await timed("echo", await echo_call(), evals, 1)

    async def echo_call() -> Any:
        """
        A Twisted TCP echo on loopback, both ends in this process: what the
        reactor itself costs per round trip, for everything else the server
        does (SSE, WebSocket, REST) on that reactor.
        """
        from twisted.internet.endpoints import (
            TCP4ClientEndpoint,
            TCP4ServerEndpoint,
            connectProtocol,
        )
        from twisted.internet.protocol import Factory, Protocol

        class Echo(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(data)

        class Ping(Protocol):
            waiting: Deferred[None] | None = None

            def dataReceived(self, data: bytes) -> None:
                d, self.waiting = self.waiting, None
                if d is not None:
                    d.callback(None)

        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Echo)
        )
        ping = Ping()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port), ping
        )

        async def call(k: int) -> None:
            ping.waiting = Deferred()
            ping.transport.write(b"x" * 64)
            await ping.waiting

        return call

    async def with_txredisapi() -> None:
        import txredisapi

        conn = await txredisapi.Connection("127.0.0.1", port, reconnect=False)
        sha = await conn.script_load(SCRIPT)
        sha_batch = await conn.script_load(BATCH_SCRIPT)
        last = 0

        async def call_eval(k: int) -> None:
            nonlocal last
            n = await conn.evalsha(sha, keys, [PAYLOAD])
            assert n > last, (n, last)
            last = n

        async def call_evalbatch(k: int) -> None:
            nonlocal last
            first = await conn.evalsha(sha_batch, keys, [PAYLOAD] * BATCH)
            assert first > last, (first, last)
            last = first + BATCH - 1

        async def call_batch(k: int) -> None:
            pipe = await conn.pipeline()
            for i in range(BATCH):
                pipe.execute_command("XADD", batch_key, f"{k * BATCH + i + 1}-0", "e", PAYLOAD)
            ids = await pipe.execute_pipeline()
            assert len(ids) == BATCH, ids

        async def call_xrange(k: int) -> None:
            got = await conn.execute_command(
                "XRANGE", batch_key, f"{(k % batches) * BATCH + 1}-0", "+", "COUNT", BATCH
            )
            assert len(got) == BATCH, len(got)

        await measure(
            {
                "eval": call_eval,
                "evalbatch": call_evalbatch,
                "batch": call_batch,
                "xrange": call_xrange,
            }
        )
        await conn.disconnect()

    async def with_redis_py() -> None:
        import asyncio

        import redis.asyncio

        def bridge(coro: Any) -> Deferred[Any]:
            return Deferred.fromFuture(asyncio.ensure_future(coro))  # as Scrapy does

        r = redis.asyncio.Redis(host="127.0.0.1", port=port)
        sha = await bridge(r.script_load(SCRIPT))
        sha_batch = await bridge(r.script_load(BATCH_SCRIPT))
        last = 0

        async def call_eval(k: int) -> None:
            nonlocal last
            n = await bridge(r.evalsha(sha, 2, *keys, PAYLOAD))
            assert n > last, (n, last)
            last = n

        async def call_evalbatch(k: int) -> None:
            nonlocal last
            first = await bridge(r.evalsha(sha_batch, 2, *keys, *([PAYLOAD] * BATCH)))
            assert first > last, (first, last)
            last = first + BATCH - 1

        async def call_batch(k: int) -> None:
            async def one() -> list[Any]:
                pipe = r.pipeline(transaction=False)
                for i in range(BATCH):
                    pipe.xadd(batch_key, {"e": PAYLOAD}, id=f"{k * BATCH + i + 1}-0")
                result: list[Any] = await pipe.execute()
                return result

            ids = await bridge(one())
            assert len(ids) == BATCH, ids

        async def call_xrange(k: int) -> None:
            start = f"{(k % batches) * BATCH + 1}-0"
            got = await bridge(r.xrange(batch_key, start, "+", count=BATCH))
            assert len(got) == BATCH, len(got)

        await measure(
            {
                "eval": call_eval,
                "evalbatch": call_evalbatch,
                "batch": call_batch,
                "xrange": call_xrange,
            }
        )
        await bridge(r.aclose())

    async def run() -> None:
        await (with_txredisapi() if client == "txredisapi" else with_redis_py())
        print(json.dumps(out), flush=True)  # the parent reads the last line

    task.react(lambda _reactor: Deferred.fromCoroutine(run()))


def run_child(client: str, port: int, evals: int, batches: int, tag: str) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        client,
        str(port),
        str(evals),
        str(batches),
        tag,
    ]
    done = subprocess.run(command, capture_output=True, timeout=600, check=False)
    try:
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(
            f"{client} child failed ({done.returncode}): {done.stderr.decode()[-2000:]}"
        ) from None
    return result


ROWS = (
    ("reactor_import_ms", "reactor import (ms)", "{:.1f}"),
    ("reactor_import_mib", "reactor import (MiB RSS)", "{:.2f}"),
    ("lib_import_ms", "client import (ms)", "{:.1f}"),
    ("lib_import_mib", "client import (MiB RSS)", "{:.2f}"),
    ("eval_p50_ms", "EVALSHA 1 event p50 (ms)", "{:.3f}"),
    ("eval_p99_ms", "EVALSHA 1 event p99 (ms)", "{:.3f}"),
    ("eval_events_per_s", "  events/s, one call at a time", "{:,.0f}"),
    ("eval_cpu_us", "  client CPU per call (us)", "{:.0f}"),
    ("evalbatch_p50_ms", f"EVALSHA {BATCH} events p50 (ms)", "{:.2f}"),
    ("evalbatch_p99_ms", f"EVALSHA {BATCH} events p99 (ms)", "{:.2f}"),
    ("evalbatch_events_per_s", "  events/s", "{:,.0f}"),
    ("evalbatch_cpu_us", "  client CPU per event (us)", "{:.1f}"),
    ("batch_p50_ms", f"{BATCH} XADD pipelined p50 (ms)", "{:.2f}"),
    ("batch_p99_ms", f"{BATCH} XADD pipelined p99 (ms)", "{:.2f}"),
    ("batch_events_per_s", "  events/s", "{:,.0f}"),
    ("batch_cpu_us", "  client CPU per event (us)", "{:.1f}"),
    ("xrange_p50_ms", f"XRANGE {BATCH} entries p50 (ms)", "{:.2f}"),
    ("xrange_p99_ms", f"XRANGE {BATCH} entries p99 (ms)", "{:.2f}"),
    ("xrange_events_per_s", "  events/s read", "{:,.0f}"),
    ("xrange_cpu_us", "  client CPU per event (us)", "{:.1f}"),
    ("echo_p50_ms", "Twisted TCP echo p50 (ms, no Redis)", "{:.3f}"),
    ("echo_p99_ms", "Twisted TCP echo p99 (ms, no Redis)", "{:.3f}"),
    ("echo_cpu_us", "  CPU per round trip (us)", "{:.0f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="child runs per client")
    parser.add_argument("--evals", type=int, default=2000, help="EVALSHA calls per run")
    parser.add_argument("--batches", type=int, default=200, help=f"batches of {BATCH} per run")
    args = parser.parse_args()
    for line in machine_lines():
        print(line)
    redis = RedisServer(appendonly="no")
    try:
        version = subprocess.run(
            [redis.command[0], "--version"], capture_output=True, check=False
        ).stdout.decode()
        print(
            f"redis:   {version.split(' sha=')[0].strip()} on port {redis.port} (pid {redis.pid})"
        )
        results: dict[str, list[dict[str, Any]]] = {c: [] for c in CLIENTS}
        for r in range(args.rounds):
            order = CLIENTS if r % 2 == 0 else CLIENTS[::-1]
            for client in order:
                res = run_child(client, redis.port, args.evals, args.batches, f"{r}{client[0]}")
                results[client].append(res)
                print(
                    f"  round {r + 1} {client:<10} EVALSHA p50={res['eval_p50_ms']:.3f} ms "
                    f"p99={res['eval_p99_ms']:.3f} ms; {BATCH} events: EVALSHA "
                    f"{res['evalbatch_events_per_s']:,.0f}/s, pipelined XADD "
                    f"{res['batch_events_per_s']:,.0f}/s, XRANGE "
                    f"{res['xrange_events_per_s']:,.0f}/s",
                    flush=True,
                )
    finally:
        redis.stop()
    tx, rp = results["txredisapi"][0], results["redis-py"][0]
    print()
    print(
        f"txredisapi {tx['version']} on {tx['reactor']}; redis-py {rp['version']} "
        f"(hiredis {'on' if rp.get('hiredis') else 'off'}) on {rp['reactor']}, "
        "calls bridged by Deferred.fromFuture"
    )
    print(
        f"medians of {args.rounds} interleaved rounds ({args.evals} EVALSHA, "
        f"{args.batches} batches of {BATCH} each):"
    )
    print(f"  {'':<36}{'txredisapi':>14}{'redis-py':>14}{'redis-py/tx':>13}")
    for key, label, fmt in ROWS:
        a = statistics.median(x[key] for x in results["txredisapi"])
        b = statistics.median(x[key] for x in results["redis-py"])
        ratio = f"{b / a:.2f}x" if a else "-"
        print(f"  {label:<36}{fmt.format(a):>14}{fmt.format(b):>14}{ratio:>13}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        name, port, evals, batches, tag = sys.argv[2:7]
        worker(name, int(port), int(evals), int(batches), tag)  # prints its figures, exits
    else:
        main()
