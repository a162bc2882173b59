"""
Benchmark: publish-to-client latency (target: p99 <= 2 ms over SSE and over
WebSocket at 20 Hz), with the SQLite history and with ``--memory``.

The server is ``twistd -n trainstream`` in a subprocess (its own GIL), one
fresh server per case: ``--store sqlite`` (the default history, on a file in
the server's scratch folder), ``--store memory`` (``--memory``), or both.
Each ``--rate`` is events/s published in ``--hz`` messages/s: the default 20
is one metric per message at 20 Hz; ``--rate 20,1000`` adds a burst case,
1,000 events/s in batches of 50, where the SQLite writer's group commit
matters. This process runs one epoll reactor with a WebSocket publisher
(each event's ``time`` field = ``time.time()`` at send), one SSE client and
one WebSocket subscriber; latency = ``time.time()`` when the bytes arrive -
the event's ``time`` (one sample per distinct send time in each chunk read).
``publish -> ack`` is when the server said the batch is stored. It prints
figures (one block per store and rate, then a summary) and never fails on
speed::

    PYTHONPATH=. .venv/bin/python bench/latency.py [--quick] [--seconds S] [--hz HZ]
        [--store sqlite|memory|both] [--rate R[,R...]] [--json PATH]

Each block also says which ``trainstream`` the server (and its SQLite writer
process) imported, and a hash of its ``hub.py`` and ``store/sqlite.py``, so
runs of two checkouts can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import _stream
from _common import TREE_PACKAGE, differing_files, machine_lines, percentile, summary_line
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

#: ``ServerProcess(store=...)`` per ``--store`` choice; ``{scratch}`` is the server's folder.
STORES: dict[str, tuple[str, ...]] = {
    "sqlite": ("--db", "{scratch}/history.sqlite3"),
    "memory": ("--memory",),
}

#: Seconds a server gets to write its ports file. ``ServerProcess`` compiles
#: everything afresh (its own ``PYTHONPYCACHEPREFIX``), which takes far longer
#: than its 20 s on a loaded machine; a start that fails anyway is retried.
START_DEADLINE_S = 90.0


class StartFailedError(Exception):
    """A server did not start (its output says why)."""


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


def verdict(samples: array[float], target_ms: float) -> str:
    p99 = percentile(samples, 99)
    return f"p99 {p99:.2f} ms vs target {target_ms} ms: {'met' if p99 <= target_ms else 'NOT met'}"


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


async def measure(
    reactor: Any, args: argparse.Namespace, store: str, rate: float
) -> dict[str, Any]:
    """One fresh server, one store, one rate: its figures."""
    per_message = rate / args.hz
    print(
        f"\n== store {store}: {rate:g} events/s in {args.hz:g} messages/s "
        f"({per_message:g} per message) for {args.seconds:g} s"
    )
    try:
        server = ServerProcess(store=STORES[store], prefix=f"trainstream-latency-{store}-")
    except SystemExit as e:  # how ServerProcess says it did not start
        raise StartFailedError(str(e)[-1500:]) from None
    print(f"  server: pid {server.pid}, {server.urls}")
    print(f"  server command: {' '.join(server.command)}")
    clients: list[Any] = []
    result: dict[str, Any] = {"store": store, "rate": rate, "hz": args.hz}
    try:
        lines, result["code"] = code_lines(server)
        for line in lines:
            print(line)
        sse_ms: array[float] = array("d")
        ws_ms: array[float] = array("d")
        sse = SSEClient(Tally(sse_ms), *server.address("sse"))
        ws = WSClient(Tally(ws_ms), *server.address("ws"))
        pub_ws = WSClient(Tally(array("d")), *server.address("ws"), subscribe=False)
        for client, role in ((sse, "sse"), (ws, "ws"), (pub_ws, "ws")):
            host, port, _ = server.address(role)
            await connect(client, host, port, reactor)
            clients.append(client)
        publisher = Publisher(pub_ws, rate=rate, hz=args.hz, names=1, reactor=reactor)
        rss0 = server.rss()
        cpu = CpuWatch(server.pid)
        wall = await publisher.run(args.seconds)
        waited = await drain([sse, ws], publisher.sent, reactor, limit=10.0)
        print(
            f"published {publisher.sent} events in {publisher.messages} messages over "
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
        result.update(
            sent=publisher.sent,
            acked=publisher.acked,
            sse=stats(sse_ms),
            ws=stats(ws_ms),
            ack=stats(publisher.ack_ms),
            samples_ms={"sse": list(sse_ms), "ws": list(ws_ms), "ack": list(publisher.ack_ms)},
        )
    finally:
        await close_all(clients, reactor)
        code = server.stop()
        problems = server.problems()
        print(f"  server exit code {code}; log {server.log_path}: {len(problems)} error lines")
        for line in problems[:10]:
            print(f"    {line}")
    return result


def summary(results: list[dict[str, Any]]) -> list[str]:
    lines = ["\nsummary, p50 / p90 / p99 (ms):"]
    for r in results:
        if r.get("failed"):
            lines.append(f"  {r['store']:<6} {r['rate']:>6g}/s  (the server did not start)")
            continue
        cells = []
        for key, label in (("sse", "SSE"), ("ws", "WS"), ("ack", "ack")):
            s = r.get(key) or {"n": 0}
            if s["n"]:
                cells.append(f"{label} {s['p50']:.2f} / {s['p90']:.2f} / {s['p99']:.2f}")
            else:
                cells.append(f"{label} -")
        lines.append(f"  {r['store']:<6} {r['rate']:>6g}/s  " + "   ".join(cells))
    return lines


async def measure_all(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.task import deferLater

    stores = ["sqlite", "memory"] if args.store == "both" else [args.store]
    results: list[dict[str, Any]] = []
    for rate in args.rate:
        for store in stores:
            for attempt in range(args.start_retries + 1):
                try:
                    results.append(await measure(reactor, args, store, rate))
                    break
                except StartFailedError as e:
                    print(f"  the server did not start: {e}")
                    if attempt < args.start_retries:
                        print(f"  trying again in {args.retry_wait:g} s")
                        await deferLater(reactor, args.retry_wait, lambda: None)
            else:
                results.append({"store": store, "rate": rate, "hz": args.hz, "failed": True})
    for line in summary(results):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"  figures written to {args.json}")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of events/s: {text!r}") from None
    if not rates or any(not 0 < r < 1e6 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0 events/s: {text!r}")
    return rates


def absolute_pythonpath() -> None:
    """
    The servers run in their own folder: a relative ``PYTHONPATH`` entry
    (``PYTHONPATH=.``, how the twistd plugin of this checkout is found) is
    made absolute, so it names the same folder for them.
    """
    path = os.environ.get("PYTHONPATH")
    if path:
        entries = [os.path.abspath(p) for p in path.split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join(entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="publishing time per case (30)")
    parser.add_argument("--hz", type=float, default=20.0, help="publish messages per second (20)")
    parser.add_argument(
        "--rate",
        type=_rates,
        default=None,
        help="events per second, comma-separated, one case each (default: --hz, one "
        "event per message); e.g. 20,1000 adds 1,000/s in batches of 50",
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "memory", "both"),
        default="both",
        help="history: SQLite file in a scratch folder, --memory, or both (both)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures (and samples) here")
    parser.add_argument(
        "--start-retries", type=int, default=2, help="starts tried again per case (2)"
    )
    parser.add_argument(
        "--retry-wait", type=float, default=60.0, help="seconds before trying again (60)"
    )
    parser.add_argument("--quick", action="store_true", help="5 s per case smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 5.0
    if args.rate is None:
        args.rate = [args.hz]
    absolute_pythonpath()
    _stream.START_DEADLINE_S = max(_stream.START_DEADLINE_S, START_DEADLINE_S)
    print("latency: publish -> SSE / WebSocket client")
    for line in machine_lines():
        print("  " + line)
    print(f"  bench code: {Path(__file__).resolve()}; package next to it: {TREE_PACKAGE}")
    run_reactor(lambda reactor: measure_all(reactor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
