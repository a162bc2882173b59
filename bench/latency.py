"""
Benchmark: how late a point reaches a watcher on each path users have, and
what publishing costs the training thread, all in one invocation.

Paths, each publisher in a process of its own (a training script's):

- ``embedded``: ``run.log()`` in a process that runs the embedded server
  (``get_stream_server``, its reactor in crochet's thread);
- ``remote``: ``trainstream.client.Publisher`` (its own thread) to a
  ``twistd -n trainstream`` subprocess;
- ``raw-ws``: ``{"op": "publish"}`` over a WebSocket to that server (the
  publisher of ``_stream.py``), which no batching of ours touches.

Each rate (``--rate``, default 20,1000) is calls a second of one metric
each (a ``log`` or a WebSocket message). Every case is watched at once by
one SSE client and one WebSocket subscriber in this process; latency =
``time.time()`` when the bytes arrive - the event's ``time`` (``time.time()``
in the ``log`` call or at send), on the machine's one clock.

``--policy new,old`` measures the embedded and remote paths twice, cases
interleaved: ``new`` is this tree's adaptive batching, ``old`` the same code
with the rule of before put back (every batch held 50 ms / every POST after
a 0.25 s linger: ``_common.use_old_inbox``, ``old_publisher``). The training
process times every ``log`` call (``perf_counter_ns`` around it, ~50 ns of
its own), and the embedded one also ``run.log`` back to back in bursts of
200 calls the way ``log_cost.py`` does (``--bursts``), both policies
interleaved; and the machine's floor at 20/s: a no-op call and a bare
``reactor.callFromThread`` (the wake-up an idle inbox's ``run.log`` makes),
each right after a sleep, for what a call costs there trainstream aside.
Then ``bench/overhead.py`` runs in the same invocation with modes
``none, embedded, embedded-old, remote, remote-old`` (its slowdown of a real
training loop, by rounds and by interleaved turns, ``--overhead-cycles``;
``--overhead-steps 0`` skips it).

Goals, printed and never asserted: p99 <= 2 ms embedded (and raw WS) and
<= 5 ms remote at 20/s; p99 <= 20 ms at 1,000/s; ``run.log`` p50 <= 1 us.
On a shared machine the figures are noisy: compare the medians and ratios
of one run::

    PYTHONPATH=. .venv/bin/python bench/latency.py [--quick] [--seconds S]
        [--rate R[,R...]] [--policy new,old] [--paths embedded,remote,raw-ws]
        [--store memory|sqlite|both] [--bursts N] [--overhead-steps N]
        [--overhead-rounds N] [--overhead-cycles N] [--json PATH]

``--quick`` (3 s per 20/s case, 1.5 s per 1,000/s case, one short overhead
round) is a smoke run of under a minute; the default is 20 s and 10 s per
case and 3 overhead rounds of 2,000 steps. ``--store`` is the history of
every server (``--memory`` by default; ``both`` runs every case again with
SQLite). The block of the twistd server says which ``trainstream`` it
imported, and a hash of its ``hub.py`` and ``store/sqlite.py``, so runs of
two checkouts can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import _stream
from _common import (
    TREE_PACKAGE,
    differing_files,
    machine_lines,
    old_publisher,
    percentile,
    plugin_on_path,
    summary_line,
    use_old_inbox,
    use_tree,
    wait_or_kill,
)
from _stream import (
    LISTEN,
    RUN,
    ServerProcess,
    SSEClient,
    Tally,
    WSClient,
    close_all,
    connect,
    delivery_lines,
    drain,
    publish_in_subprocess,
    run_reactor,
)

PATHS = ["embedded", "remote", "raw-ws"]
#: p99 goals (ms) per path at 20/s; every path at 1,000/s (above ``SLOW_RATE``).
GOAL_MS = {"embedded": 2.0, "remote": 5.0, "raw-ws": 2.0}
FAST_GOAL_MS = 20.0
SLOW_RATE = 100.0
LOG_GOAL_US = 1.0

#: Seconds a server gets to write its ports file. ``ServerProcess`` compiles
#: everything afresh (its own ``PYTHONPYCACHEPREFIX``), which takes far longer
#: than its 20 s on a loaded machine.
START_DEADLINE_S = 90.0


#: Run in the server's own environment: which package and sources it imports.
_WHICH = """
import hashlib, os, sys
import trainstream
package = os.path.dirname(os.path.realpath(trainstream.__file__))
def digest(name):
    with open(os.path.join(package, name), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]
import twisted.plugins.trainstream_plugin as plugin
print(package)
print(os.path.realpath(plugin.__file__))
print(digest("hub.py"), digest(os.path.join("store", "sqlite.py")))
"""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
    except OSError:
        return []
    return [int(p) for p in text.split()]


def code_lines(server: ServerProcess) -> tuple[list[str], dict[str, str]]:
    """
    Which ``trainstream`` the server runs: imported with the server's own
    environment (read from /proc) in its folder, as twistd does; and the
    PYTHONPATH of its writer process, if it has one.
    """
    env = _environ(server.pid)
    lines = [f"  server PYTHONPATH: {env.get('PYTHONPATH', '(unset)')}"]
    info: dict[str, str] = {}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _WHICH],
            env=env or None,
            cwd=server.scratch,
            capture_output=True,
            timeout=30,
            check=False,
        )
        package, plugin, hashes = done.stdout.decode().strip().splitlines()[-3:]
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        lines.append(f"  could not tell which trainstream the server imports: {e}")
        return lines, info
    hub, sqlite = hashes.split()
    info = {"package": package, "hub_sha256": hub, "sqlite_sha256": sqlite}
    different = differing_files(Path(package), TREE_PACKAGE)
    same = "the same as" if not different else f"{len(different)} file(s) differ from"
    lines.append(f"  server imports trainstream from {package} ({same} {TREE_PACKAGE})")
    lines.append(f"    plugin {plugin}; sha256[:12] hub.py {hub}, store/sqlite.py {sqlite}")
    for child in _children(server.pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainstream.store.writer" in cmdline:
            path = _environ(child).get("PYTHONPATH", "(unset)")
            first = path.split(os.pathsep)[0]
            resolved = os.path.realpath(os.path.join(first, "trainstream"))
            lines.append(f"  writer process {child}: PYTHONPATH {path} (trainstream -> {resolved})")
    return lines, info


def stats(samples: array[float] | list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "p50": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "max": max(samples),
    }


# The training process (``latency.py --child PATH``): this is what it runs.


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def child_main(argv: list[str]) -> int:
    """
    A training process: ``embedded`` starts the embedded server and prints
    its URLs; ``remote`` publishes to ``--url``. Then, per ``{"op": "go"}``
    line on stdin, it logs ``rate`` calls a second of one metric for
    ``seconds`` from its main thread, flushes, and answers with the cost of
    each ``log`` call; ``{"op": "quit"}`` ends it.
    """
    parser = argparse.ArgumentParser(prog="latency.py --child")
    parser.add_argument("path", choices=("embedded", "remote"))
    parser.add_argument("--policy", choices=("new", "old"), default="new")
    parser.add_argument("--url", help="remote: the server's REST URL")
    parser.add_argument("--db", help="embedded: a SQLite history here (else --memory)")
    args = parser.parse_args(argv)
    use_tree()
    server: Any = None
    if args.path == "embedded":
        import trainstream

        config: dict[str, Any] = {"listen": LISTEN}
        config.update({"db": args.db} if args.db else {"memory": True})
        server = trainstream.get_stream_server(config)
        if args.policy == "old":
            use_old_inbox(server.inbox)
        _reply({"urls": server.urls, "window": server.inbox.window})
    else:
        from trainstream.client import Publisher

        _reply({"urls": {}})
    step = 0  # steps keep rising from case to case: no rewinds
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "floor" and server is not None:
                _reply(floor(int(command["samples"])))
                continue
            if command["op"] == "burst" and server is not None:
                _reply(bursts(server.run(RUN), int(command["rounds"]), step))
                step += 200 * int(command["rounds"])
                continue
            if command["op"] != "go":
                break
            rate, seconds = float(command["rate"]), float(command["seconds"])
            if server is not None:
                run: Any = server.run(RUN)
                run.flush()
                wakeups, batches = server.inbox.wakeups, server.inbox.batches
            else:
                make = old_publisher if args.policy == "old" else Publisher
                run = make(args.url, RUN, report_every=0, flush_at_exit=0)
                run.flush(30)
            metrics = {"train/m0": 0.5}
            n = round(rate * seconds)
            costs = array("d")
            clock, ns = time.perf_counter, time.perf_counter_ns
            t0 = clock()
            for i in range(n):
                delay = t0 + i / rate - clock()
                if delay > 0:
                    time.sleep(delay)
                started = ns()
                run.log(metrics, step=step)
                costs.append(ns() - started)
                step += 1
            wall = clock() - t0
            if server is not None:
                run.flush()
                handed = {
                    "wakeups": server.inbox.wakeups - wakeups,
                    "batches": server.inbox.batches - batches,
                }
            else:
                stored = run.close(30)
                handed = {"stored": stored, "acked": run.sent, "dropped": run.dropped}
            _reply(
                {
                    "sent": n,
                    "wall": wall,
                    "flushed_after": clock() - t0 - wall,
                    "log_us": {k: v / 1000 for k, v in stats(costs).items() if k != "n"},
                    **handed,
                }
            )
    finally:
        if server is not None:
            import trainstream

            trainstream.release_stream_server()
    return 0


def floor(samples: int, rate: float = 20.0) -> dict[str, Any]:
    """
    What any call costs the training thread at ``rate`` on this machine,
    trainstream aside: a no-op call right after a sleep, and the reactor's
    own ``callFromThread`` of a no-op (a pipe write that wakes the reactor
    thread), which ``run.log`` does when its inbox is idle.
    """
    from twisted.internet import reactor

    def noop() -> None:
        pass

    costs: dict[str, array[float]] = {"noop_us": array("d"), "call_from_thread_us": array("d")}
    ns = time.perf_counter_ns

    def wake() -> None:
        reactor.callFromThread(noop)

    for _ in range(samples):
        for key, call in (("noop_us", noop), ("call_from_thread_us", wake)):
            time.sleep(1 / rate)
            started = ns()
            call()
            costs[key].append((ns() - started) / 1000)
    return {key: stats(values) for key, values in costs.items()}


def bursts(run: Any, rounds: int, step: int, batch: int = 200) -> dict[str, Any]:
    """
    ``run.log`` back to back, as ``log_cost.py`` times it: each sample is a
    batch of ``batch`` calls (one metric) over ``perf_counter_ns``, per call;
    a flush (not timed) between batches starts each with an idle inbox.
    """
    metrics = {"train/m0": 0.5}
    run.log(metrics, step=step)
    per_call = array("d")
    ns = time.perf_counter_ns
    for _ in range(rounds):
        run.flush()
        started = ns()
        for i in range(batch):
            run.log(metrics, step=step + i)
        per_call.append((ns() - started) / batch / 1000)
        step += batch
    run.flush()
    return {"burst_us": stats(per_call)}


class Child:
    """A training process of ``child_main``, driven line by line."""

    def __init__(self, path: str, policy: str, extra: list[str], scratch: Path) -> None:
        self.path, self.policy = path, policy
        self.log_path = scratch / f"child-{path}-{policy}.log"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", path]
        command += ["--policy", policy, *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.urls: dict[str, str] = {}
        self.hello: dict[str, Any] = {}

    async def start(self) -> None:
        self.hello = await self.receive()
        self.urls = self.hello["urls"]

    async def receive(self) -> dict[str, Any]:
        from twisted.internet.threads import deferToThread

        assert self.proc.stdout is not None
        line = await deferToThread(self.proc.stdout.readline)
        if not line:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the {self.path} training process ended; its output:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command line (``{"op": op, **fields}``); its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return await self.receive()

    async def burst(self, rounds: int) -> dict[str, Any]:
        return await self.ask("burst", rounds=rounds)

    async def floor(self, samples: int) -> dict[str, Any]:
        return await self.ask("floor", samples=samples)

    async def go(self, rate: float, seconds: float) -> dict[str, Any]:
        return await self.ask("go", rate=rate, seconds=seconds)

    def stop(self) -> int | None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass
            wait_or_kill(self.proc, 30)
        return self.proc.returncode


# The watchers (this process) and the cases


def _address(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path


async def measure(
    reactor: Any,
    path: str,
    policy: str,
    rate: float,
    seconds: float,
    child: Child | None,
    server: ServerProcess | None,
) -> dict[str, Any]:
    """One case: watchers connected, the publisher runs, the watchers drain."""
    label = path if path == "raw-ws" else f"{path}, policy {policy}"
    print(f"\n== {label}: {rate:g} calls/s of 1 metric for {seconds:g} s", flush=True)
    urls = (child.urls if child is not None else {}) or (server.urls if server else {})
    sse_ms: array[float] = array("d")
    ws_ms: array[float] = array("d")
    sse = SSEClient(Tally(sse_ms), *_address(urls["sse"]))
    ws = WSClient(Tally(ws_ms), *_address(urls["ws"]))
    clients: list[Any] = []
    result: dict[str, Any] = {"path": path, "policy": policy, "rate": rate}
    try:
        for client, role in ((sse, "sse"), (ws, "ws")):
            host, port, _ = _address(urls[role])
            await connect(client, host, port, reactor)
            clients.append(client)
        if child is not None:
            figures = await child.go(rate, seconds)
            sent = figures["sent"]
        else:
            assert server is not None
            figures = await publish_in_subprocess(reactor, server, rate, rate, seconds, 1)
            figures.pop("ack_ms", None)
            sent = figures["acked"]
        waited = await drain([sse, ws], sent, reactor, limit=15.0)
        result.update(figures)
        extra = ", ".join(
            f"{k} {v}" for k, v in figures.items() if k in ("wakeups", "batches", "messages")
        )
        print(
            f"  published {sent} in {figures['wall']:.1f} s; {extra}; drained {waited:.2f} s after"
        )
        if "log_us" in figures:
            cost = figures["log_us"]
            print(
                f"  log() on the training thread: p50 {cost['p50']:.2f} us, "
                f"p99 {cost['p99']:.2f} us, max {cost['max']:.0f} us"
            )
        print(summary_line("SSE", sse_ms))
        print(summary_line("WebSocket", ws_ms))
        for name, client in (("sse", sse), ("ws", ws)):
            for line in delivery_lines(name, [client], sent):
                print(line)
        result.update(sse=stats(sse_ms), ws=stats(ws_ms))
        result["complete"] = all(c.tally.count == sent for c in (sse, ws))
    finally:
        await close_all(clients, reactor)
    return result


def goal_ms(path: str, rate: float) -> float:
    return GOAL_MS[path] if rate <= SLOW_RATE else FAST_GOAL_MS


def summary(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "\nsummary: latency p50 / p99 (ms) per watcher, against the p99 goal; "
        "log(): the training thread's cost per call (us)",
        f"  {'store':<6} {'path':<9} {'policy':<6} {'rate/s':>6}  {'SSE p50 / p99':>15}  "
        f"{'WS p50 / p99':>15}  {'goal':>5}  {'verdict':<8} {'log() p50 / p99':>16}",
    ]
    bursts = [r for r in results if "burst_us" in r]
    floors = [r["floor_us"] for r in results if "floor_us" in r]
    results = [r for r in results if "burst_us" not in r and "floor_us" not in r]
    for r in results:
        cells = []
        worst = 0.0
        for key in ("sse", "ws"):
            s = r.get(key) or {"n": 0}
            if s["n"]:
                cells.append(f"{s['p50']:6.2f} / {s['p99']:6.2f}")
                worst = max(worst, s["p99"])
            else:
                cells.append(f"{'-':>15}")
                worst = float("inf")
        goal = goal_ms(r["path"], r["rate"])
        ok = worst <= goal and r.get("complete", False)
        verdict = "met" if ok else "NOT met" if r.get("complete", False) else "MISSING"
        cost = r.get("log_us")
        log = f"{cost['p50']:6.2f} / {cost['p99']:6.2f}" if cost else f"{'-':>16}"
        policy = r["policy"] if r["path"] != "raw-ws" else "-"
        lines.append(
            f"  {r.get('store', '?'):<6} {r['path']:<9} {policy:<6} {r['rate']:>6g}  "
            f"{cells[0]:>15}  {cells[1]:>15}  "
            f"{goal:>5g}  {verdict:<8} {log:>16}"
        )
    for r in bursts:
        p50 = sorted(f["p50"] for f in r["burst_us"])[len(r["burst_us"]) // 2]
        lines.append(
            f"  {r.get('store', '?'):<6} run.log in bursts, policy {r['policy']}: "
            f"p50 {p50:.2f} us per call "
            f"(goal <= {LOG_GOAL_US:g} us)"
        )
    for got in floors:
        lines.append(
            f"  floor at 20/s: a no-op call {got['noop_us']['p50']:.1f} us, "
            f"callFromThread(no-op) {got['call_from_thread_us']['p50']:.1f} us (p50; "
            "run.log's cost at 20/s is this wake-up)"
        )
    return lines


async def measure_all(reactor: Any, args: argparse.Namespace) -> None:
    results: list[dict[str, Any]] = []
    for store in ["memory", "sqlite"] if args.store == "both" else [args.store]:
        print(f"\n=== store: {store}")
        for result in await measure_store(reactor, args, store):
            results.append({"store": store, **result})
    for line in summary(results):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"  figures written to {args.json}")


async def measure_store(reactor: Any, args: argparse.Namespace, store: str) -> list[dict[str, Any]]:
    """Every case with one kind of history: fresh servers and training processes."""
    results: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix="trainstream-latency-"))
    children: dict[tuple[str, str], Child] = {}
    server: ServerProcess | None = None
    try:
        if {"remote", "raw-ws"} & set(args.paths):
            history = ("--db", "{scratch}/history.sqlite3") if store == "sqlite" else ("--memory",)
            server = ServerProcess(store=history, prefix="trainstream-latency-")
            print(f"twistd server: pid {server.pid}, {server.urls} ({store})")
            lines, _ = code_lines(server)
            for line in lines:
                print(line)
        for path in ("embedded", "remote"):
            if path not in args.paths:
                continue
            for policy in args.policy:
                extra = (
                    ["--db", str(scratch / f"embedded-{policy}.sqlite3")]
                    if path == "embedded" and store == "sqlite"
                    else ["--url", server.urls["rest"]]
                    if path == "remote" and server is not None
                    else []
                )
                child = Child(path, policy, extra, scratch)
                children[(path, policy)] = child
                await child.start()
                if path == "embedded":
                    print(
                        f"embedded training process ({policy}): pid {child.proc.pid}, "
                        f"{child.urls}, inbox window {child.hello['window']:g} s"
                    )
        for rate in args.rate:
            seconds = args.seconds or (args.slow_s if rate <= SLOW_RATE else args.fast_s)
            for path in args.paths:
                for policy in args.policy if path != "raw-ws" else ["-"]:
                    results.append(
                        await measure(
                            reactor,
                            path,
                            policy,
                            rate,
                            seconds,
                            children.get((path, policy)),
                            server,
                        )
                    )
        bursts_lines = []
        for _ in range(3):  # interleaved, so that both policies share the noise
            for policy in args.policy:
                child = children.get(("embedded", policy))
                if child is not None:
                    figures = (await child.burst(args.bursts // 3 or 1))["burst_us"]
                    bursts_lines.append((policy, figures))
        for policy in args.policy:
            got = [f for p, f in bursts_lines if p == policy]
            if got:
                p50s = sorted(f["p50"] for f in got)
                p99s = sorted(f["p99"] for f in got)
                print(
                    f"run.log(1 scalar) in bursts of 200 calls (as log_cost.py), policy {policy}: "
                    f"p50 {p50s[1]:.2f} us (3 sets: {', '.join(f'{x:.2f}' for x in p50s)}), "
                    f"p99 {p99s[1]:.2f} us; goal p50 <= {LOG_GOAL_US:g} us"
                )
                results.append({"path": "embedded-burst", "policy": policy, "burst_us": got})
        child = children.get(("embedded", "new"))
        if child is not None:
            got = await child.floor(100)
            print(
                "the machine's floor at 20/s in the embedded training process (100 calls each, "
                f"after a 50 ms sleep): a no-op call p50 {got['noop_us']['p50']:.1f} us; "
                f"reactor.callFromThread(no-op), the wake-up run.log makes when its inbox is idle, "
                f"p50 {got['call_from_thread_us']['p50']:.1f} us, p99 "
                f"{got['call_from_thread_us']['p99']:.1f} us"
            )
            results.append({"path": "floor", "policy": "-", "floor_us": got})
    finally:
        for child in children.values():
            code = child.stop()
            problems = [
                line
                for line in child.log_path.read_text(errors="replace").splitlines()
                if "Traceback" in line or "Error" in line
            ]
            print(
                f"  {child.path} training process ({child.policy}) exited {code}; "
                f"{len(problems)} error lines in {child.log_path}"
            )
        if server is not None:
            code = server.stop()
            problems = server.problems()
            print(f"  twistd exit code {code}; log {server.log_path}: {len(problems)} error lines")
            for line in problems[:10]:
                print(f"    {line}")
    return results


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of events/s: {text!r}") from None
    if not rates or any(not 0 < r < 1e6 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0 events/s: {text!r}")
    return rates


def run_overhead(args: argparse.Namespace) -> int:
    """``bench/overhead.py`` with the batching modes, new and old, in this invocation."""
    modes = ["none"]
    for path in ("embedded", "remote"):
        if path in args.paths:
            modes += [path] + [f"{path}-old" for p in args.policy if p == "old"]
    command = [
        sys.executable,
        str(Path(__file__).resolve().parent / "overhead.py"),
        "--modes",
        ",".join(modes),
        "--steps",
        str(args.overhead_steps),
        "--rounds",
        str(args.overhead_rounds),
        "--cycles",
        str(args.overhead_cycles),
    ]
    print(f"\n== overhead: {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=0.0,
        help="publishing time per case (default 20 s, 10 s at more than 100/s)",
    )
    parser.add_argument(
        "--rate", type=_rates, default=[20.0, 1000.0], help="log calls per second (20,1000)"
    )
    parser.add_argument(
        "--paths",
        type=lambda t: _choices(t, PATHS),
        default=PATHS,
        help=f"comma-separated ({','.join(PATHS)})",
    )
    parser.add_argument(
        "--policy",
        type=lambda t: _choices(t, ["new", "old"]),
        default=["new", "old"],
        help="adaptive batching (new), the fixed delays of before (old), or both (new,old)",
    )
    parser.add_argument(
        "--store",
        choices=("memory", "sqlite", "both"),
        default="memory",
        help="the servers' history: --memory, a SQLite file in a scratch folder, or both "
        "(each case again) (memory)",
    )
    parser.add_argument(
        "--bursts", type=int, help="run.log batches of 200 per policy (150; --quick 30)"
    )
    parser.add_argument(
        "--overhead-steps", type=int, help="steps per overhead loop (2000; --quick 500); 0: none"
    )
    parser.add_argument("--overhead-rounds", type=int, help="overhead rounds (3; --quick 1)")
    parser.add_argument(
        "--overhead-cycles",
        type=int,
        help="overhead.py --cycles: interleaved turns of 200 steps (40; --quick 3); 0: none",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    args = parser.parse_args(argv)
    # Seconds per case, unless --seconds: at 20/s, and at more than 100/s.
    args.slow_s, args.fast_s = (3.0, 1.5) if args.quick else (20.0, 10.0)
    for name, full, quick in (
        ("overhead_steps", 2000, 500),
        ("overhead_rounds", 3, 1),
        ("overhead_cycles", 40, 3),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.bursts is None:
        args.bursts = 30 if args.quick else 150
    plugin_on_path()
    _stream.START_DEADLINE_S = max(_stream.START_DEADLINE_S, START_DEADLINE_S)
    print("latency: training-side publish -> SSE / WebSocket watcher, per path")
    for line in machine_lines():
        print("  " + line)
    print(f"  bench code: {Path(__file__).resolve()}; package next to it: {TREE_PACKAGE}")
    t0 = time.monotonic()
    try:
        run_reactor(lambda reactor: measure_all(reactor, args))
    except SystemExit as e:  # task.react ends with sys.exit
        if e.code not in (0, None):
            raise
    print(f"  latency cases took {time.monotonic() - t0:.0f} s")
    if args.overhead_steps > 0:
        run_overhead(args)
    print(f"  whole run: {time.monotonic() - t0:.0f} s")
    return 0


def _choices(text: str, allowed: list[str]) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    wrong = [c for c in chosen if c not in allowed]
    if not chosen or wrong:
        raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}: {text!r}")
    return chosen


if __name__ == "__main__":
    sys.exit(main())
