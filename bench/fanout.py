"""
Benchmark: one server holds many subscribers while some of them get a
fast run (issue 5/8, item 4): 10,000 subscribers, SSE and WebSocket
mixed, 1,000 of them receiving 1,000 events/s: none lost, p99 <= 100 ms,
<= 10 KB of server RSS per idle subscriber.

On a fresh ``twistd -n trainstream`` (``--memory``, or SQLite with
``--store sqlite``), in this order:

1. a warm-up (20 subscribers of each kind, then gone), server RSS "before";
2. ``--idle`` subscribers, half SSE and half WebSocket, subscribed to the
   run ``idle`` that nobody publishes to: connected and subscribed,
   receiving nothing but SSE keepalives. They share one filter (the hub
   filters each batch once for them); ``--idle-filter distinct`` gives each
   a run of its own, the hub's worst case. Server RSS "with them";
   RSS per idle subscriber = (with - before) / idle;
3. ``--active`` subscribers of the run ``bench`` (every type), half SSE and
   half WebSocket;
4. a publisher process sends ``--rate`` metric events/s to ``bench`` over a
   WebSocket for ``--seconds``, in ``--hz`` batches a second; each event's
   ``time`` is its send time. Server RSS is sampled throughout.

Every client is a raw socket on an epoll loop (``_stream.RawStreams``), no
Twisted: the idle ones in one process that only reads and discards, the
active ones split over ``--active-procs`` processes that count events per
complete read, check that ids go on one by one (none lost, none doubled),
and take one latency sample per read: arrival minus the send time of the
*oldest* event in it. CPU of the server, of each client process, of the
publisher and of the rest of the machine is printed, so a client-side
bottleneck or another job on the machine shows. It prints figures and
never fails on speed::

    PYTHONPATH=bench .venv/bin/python bench/fanout.py [--quick] [--store sqlite]
        [--idle N] [--active N] [--seconds S] [--idle-filter shared|distinct]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, machine_lines, percentile, summary_line, wait_or_kill
from _stream import (
    RUN,
    RawConn,
    RawStreams,
    ServerProcess,
    busy_seconds,
    cpu_seconds,
    nofile_of,
    raise_nofile,
    raw_sse_request,
    raw_ws_request,
    rss_kb,
)

IDLE_RUN = "idle"
WANT_NOFILE = 25_000
LATENCY_TARGET_MS = 100.0
IDLE_TARGET_KB = 10.0
WORKER_READY_S = 600.0  # bounded: connecting 9,000 clients takes well under a minute


# Worker processes: ``fanout.py _worker JSON``


def _worker(spec: dict[str, Any]) -> None:
    """Hold ``spec["n"]`` raw subscribers; talk to the parent over stdin/stdout lines."""
    raise_nofile()
    host = spec["host"]
    address = {"sse": (host, spec["sse_port"]), "ws": (host, spec["ws_port"])}
    active = spec["active"]
    conns = []
    for i in range(spec["n"]):
        k = spec["first"] + i
        run = spec["run"] if spec["filter"] == "shared" else f"{spec['run']}-{k}"
        kind = spec.get("kind", "mixed")
        if kind == "sse" or (kind == "mixed" and k % 2 == 0):
            request = raw_sse_request(host, spec["sse_port"], spec["sse_path"], f"?run={run}")
            conns.append(RawConn("sse", request))
        else:
            request = raw_ws_request(host, spec["ws_port"], spec["ws_path"])
            subscribe = json.dumps({"op": "subscribe", "runs": [run]}).encode()
            conns.append(RawConn("ws", request, subscribe))
    streams = RawStreams(conns, address, b"", active=active)
    cpu0 = cpu_seconds(os.getpid())
    took = streams.connect_all(WORKER_READY_S)
    errors = sorted({c.error for c in conns if c.error})[:5]
    _say(
        {
            "ready": streams.ready,
            "failed": streams.failed,
            "connect_s": took,
            "errors": errors,
            "cpu": cpu_seconds(os.getpid()) - cpu0,
        }
    )

    state: dict[str, Any] = {"expect": None, "since": 0.0, "stop": False}
    stdin = sys.stdin.buffer
    os.set_blocking(stdin.fileno(), False)
    pending = [b""]

    def on_stdin() -> None:
        data = stdin.read() or b""
        if not data:
            state["stop"] = True
            raise StopIteration
        pending[0] += data
        while b"\n" in pending[0]:
            line, pending[0] = pending[0].split(b"\n", 1)
            words = line.decode().split()
            if words[:1] == ["expect"]:
                state["expect"], state["since"] = int(words[1]), time.monotonic()
            elif words[:1] == ["stop"]:
                state["stop"] = True
                raise StopIteration

    streams.watch(stdin.fileno(), on_stdin)
    cpu1 = cpu_seconds(os.getpid())
    drain_limit = float(spec.get("drain_limit", 15.0))
    waited = None
    deadline = time.monotonic() + float(spec.get("life_limit", 3600.0))
    while not state["stop"] and time.monotonic() < deadline:
        streams.pump(0.05)
        if active and state["expect"] is not None:
            live = [c for c in conns if c.state == "ready"]
            since = time.monotonic() - state["since"]
            if all(c.metrics >= state["expect"] for c in live) or since > drain_limit:
                waited = since
                break
    cpu_load = cpu_seconds(os.getpid()) - cpu1
    out: dict[str, Any] = {
        "ready": streams.ready,
        "lost_after_ready": streams.closed_after_ready,
        "lost_errors": sorted({c.error for c in conns if c.lost})[:5],
        "bytes": sum(c.bytes for c in conns),
        "cpu_load": cpu_load,
        "drain_s": waited,
    }
    if active:
        for kind in ("sse", "ws"):
            path = Path(spec["lat_prefix"] + f".{kind}")
            with open(path, "wb") as f:
                streams.lat[kind].tofile(f)
        out["clients"] = [
            [c.kind, c.metrics, c.events, c.first_id, c.last_id, c.gaps, c.disorder, c.lost]
            for c in conns
            if c.state == "ready" or c.lost
        ]
    streams.close_all()
    _say(out)


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# The parent: the server, the workers, the publisher


class Worker:
    """A ``_worker`` subprocess and its line protocol."""

    def __init__(self, spec: dict[str, Any], log_dir: Path, name: str) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=str(Path(__file__).resolve().parent),
        )
        self._buf = b""

    def read(self, limit: float) -> dict[str, Any]:
        """The next JSON line, waiting at most ``limit`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + limit
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise SystemExit(f"{self.name}: no answer in {limit:g} s; {self.stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise SystemExit(f"{self.name} exited: {self.stderr_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def cpu(self) -> float:
        try:
            return cpu_seconds(self.proc.pid)
        except OSError:
            return 0.0

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-1500:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.tell("stop")
            except (BrokenPipeError, OSError):
                pass
            wait_or_kill(self.proc, 30)
        self._stderr.close()


class Sampler(threading.Thread):
    """RSS of the server every ``interval`` s while the load runs."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(rss_kb(self.pid))
            except OSError:
                return
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def publish(server: ServerProcess, rate: float, hz: float, seconds: float) -> dict[str, Any]:
    """``_stream.py publish`` in a process of its own; its figures."""
    host, port, path = server.address("ws")
    command = [
        sys.executable,
        str(Path(__file__).resolve().with_name("_stream.py")),
        "publish",
        f"{host}:{port}{path}",
        str(rate),
        str(hz),
        str(seconds),
        "10",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        timeout=seconds + 90,
        check=False,
        cwd=str(Path(__file__).resolve().parent),
    )
    try:
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(
            f"publisher failed ({done.returncode}): {done.stderr.decode()[-2000:]}"
        ) from None
    return result


def settle_rss(pid: int, seconds: float = 1.5) -> int:
    """RSS once it stops moving (at most ``seconds``)."""
    last = rss_kb(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.25)
        now = rss_kb(pid)
        if now == last:
            break
        last = now
    return last


def split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` even whole numbers, each even (so SSE/WS stay half and half)."""
    pairs = n // 2
    base, extra = divmod(pairs, parts)
    return [2 * (base + (1 if i < extra else 0)) for i in range(parts)]


def run(args: argparse.Namespace) -> None:
    store = ("--memory",) if args.store == "memory" else ("--db", "{scratch}/h.db")
    server = ServerProcess(store=store, prefix="trainstream-fanout-")
    print(f"  server pid {server.pid}: {' '.join(server.command)}")
    s_soft, s_hard = nofile_of(server.pid)
    print(f"  server RLIMIT_NOFILE {s_soft}/{s_hard} (inherited from this process)")
    need = args.idle + args.active + 100
    if s_soft < need:
        print(f"  WARNING: the server may open {need} files, its limit is {s_soft}")
    scratch = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    workers: list[Worker] = []
    host, sse_port, sse_path = server.address("sse")
    _, ws_port, ws_path = server.address("ws")
    base = {
        "host": host,
        "sse_port": sse_port,
        "sse_path": sse_path,
        "ws_port": ws_port,
        "ws_path": ws_path,
        "drain_limit": max(15.0, args.seconds),
    }
    try:
        warm = Worker(
            {**base, "n": 40, "first": 0, "run": IDLE_RUN, "filter": "shared", "active": False},
            scratch,
            "warm-up",
        )
        workers.append(warm)
        r = warm.read(120)
        warm.stop()
        workers.remove(warm)
        time.sleep(1.0)
        rss0 = settle_rss(server.pid)
        print(
            f"  warm-up: {r['ready']} subscribers connected and gone; "
            f"server RSS {rss0 / 1024:.1f} MiB"
        )

        # Idle subscribers
        cpu_s0 = cpu_seconds(server.pid)
        idle_counts = split(args.idle, args.idle_procs)
        idle_workers = []
        first = 0
        for i, n in enumerate(idle_counts):
            w = Worker(
                {
                    **base,
                    "n": n,
                    "first": first,
                    "run": IDLE_RUN,
                    "kind": args.idle_kind,
                    "filter": args.idle_filter,
                    "active": False,
                },
                scratch,
                f"idle-{i}",
            )
            first += n
            idle_workers.append(w)
            workers.append(w)
        t0 = time.monotonic()
        idle_ready = [w.read(WORKER_READY_S) for w in idle_workers]
        connect_s = time.monotonic() - t0
        cpu_s1 = cpu_seconds(server.pid)
        ready = sum(r["ready"] for r in idle_ready)
        failed = sum(r["failed"] for r in idle_ready)
        time.sleep(2.0)
        rss1 = settle_rss(server.pid, 3.0)
        per_idle = (rss1 - rss0) / max(1, ready)
        print(
            f"  idle: {ready} subscribers ({args.idle_kind}: half SSE, half WS, if mixed; "
            f"filter {args.idle_filter} on run {IDLE_RUN!r}) connected in {connect_s:.1f} s "
            f"over {args.idle_procs} process(es), {failed} failed"
            + (f" ({idle_ready[0]['errors']})" if failed else "")
            + f"; server CPU while connecting {cpu_s1 - cpu_s0:.1f} s"
        )
        print(
            f"  server RSS {rss0 / 1024:.1f} MiB before, {rss1 / 1024:.1f} MiB with them: "
            f"{per_idle:.2f} KiB per idle subscriber (target <= {IDLE_TARGET_KB:g} KB = "
            f"{IDLE_TARGET_KB * 1000 / 1024:.2f} KiB: "
            f"{'met' if per_idle * 1024 <= IDLE_TARGET_KB * 1000 else 'NOT met'})"
        )
        print(f"  server open fds: {len(os.listdir(f'/proc/{server.pid}/fd'))}")

        # Active subscribers
        active_workers = []
        first = 0
        for i, n in enumerate(split(args.active, args.active_procs)):
            w = Worker(
                {
                    **base,
                    "n": n,
                    "first": first,
                    "run": RUN,
                    "filter": "shared",
                    "active": True,
                    "lat_prefix": str(scratch / f"lat-{i}"),
                },
                scratch,
                f"active-{i}",
            )
            first += n
            active_workers.append(w)
            workers.append(w)
        act_ready = [w.read(WORKER_READY_S) for w in active_workers]
        a_ready = sum(r["ready"] for r in act_ready)
        a_failed = sum(r["failed"] for r in act_ready)
        time.sleep(1.0)
        rss2 = settle_rss(server.pid)
        print(
            f"  active: {a_ready} subscribers of run {RUN!r} (every type) over "
            f"{args.active_procs} process(es), {a_failed} failed; server RSS {rss2 / 1024:.1f} MiB"
        )

        # Load
        sampler = Sampler(server.pid)
        sampler.start()
        busy0, total0 = busy_seconds()
        cpu_server0 = cpu_seconds(server.pid)
        cpu_workers0 = [w.cpu() for w in workers]
        t_load = time.monotonic()
        spy = start_py_spy(server.pid, args.py_spy, scratch) if args.py_spy else None
        pub = publish(server, args.rate, args.hz, args.seconds)
        for w in active_workers:
            w.tell(f"expect {pub['acked']}")
        results = [w.read(max(60.0, args.seconds + 30)) for w in active_workers]
        wall = time.monotonic() - t_load
        busy1, total1 = busy_seconds()
        cpu_server = cpu_seconds(server.pid) - cpu_server0
        cpu_workers = [w.cpu() - c0 for w, c0 in zip(workers, cpu_workers0, strict=True)]
        sampler.stop()
        machine = busy1 - busy0
        ours = cpu_server + sum(cpu_workers) + (pub["cpu"] or 0.0)
        rest = max(0.0, machine - ours)  # other jobs, this process, Python start-ups
        print(
            f"  published {pub['sent']} events in {pub['messages']} messages over "
            f"{pub['wall']:.1f} s ({pub['sent'] / pub['wall']:.0f}/s), acked {pub['acked']}"
            + (f"; errors {pub['errors'][:2]}" if pub["errors"] else "")
        )
        drains = [r["drain_s"] for r in results]
        print(
            f"  every active client had them all {max(d or 0 for d in drains):.2f} s after "
            f"the publisher ended (limit {base['drain_limit']:g} s)"
        )
        print_delivery(results, pub["acked"])
        sse = array("d")
        ws = array("d")
        for i in range(len(active_workers)):
            for kind, into in (("sse", sse), ("ws", ws)):
                path = scratch / f"lat-{i}.{kind}"
                if path.exists():
                    into.frombytes(path.read_bytes())
        both = array("d", sse)
        both.extend(ws)
        print(
            "  latency, send -> arrival (ms), one sample per client per complete read, "
            "of the oldest event in it:"
        )
        print(summary_line("SSE", sse))
        print(summary_line("WebSocket", ws))
        print(summary_line("all", both))
        print(summary_line("publish -> ack", pub["ack_ms"]))
        p99 = percentile(both, 99)
        print(
            f"  p99 {p99:.1f} ms vs target {LATENCY_TARGET_MS:g} ms: "
            f"{'met' if p99 <= LATENCY_TARGET_MS else 'NOT met'}"
        )
        cores = (total1 - total0) / wall if wall else 0
        print(
            f"  CPU over {wall:.1f} s of load ({cores:.1f} cores): server {cpu_server:.1f} s "
            f"({100 * cpu_server / wall:.0f}% of a core), "
            + ", ".join(
                f"{w.name} {c:.1f} s ({100 * c / wall:.0f}%)"
                for w, c in zip(workers, cpu_workers, strict=True)
            )
            + f", publisher {pub['cpu'] or 0:.1f} s; the rest of the machine "
            f"{rest:.1f} s ({100 * rest / wall:.0f}% of a core)"
        )
        if spy is not None:
            print_py_spy(*spy)
        idle_lost = 0
        for w in idle_workers:
            w.tell("stop")
            r = w.read(60)
            idle_lost += r["lost_after_ready"]
            if r["lost_after_ready"]:
                print(f"  {w.name}: {r['lost_after_ready']} idle lost: {r['lost_errors']}")
        print(f"  idle subscribers still connected at the end: {ready - idle_lost} of {ready}")
        peak = max(sampler.samples, default=0)
        print(
            f"  server RSS during the load: peak {peak / 1024:.1f} MiB, "
            f"end {sampler.samples[-1] / 1024 if sampler.samples else 0:.1f} MiB "
            f"({len(sampler.samples)} samples)"
        )
    finally:
        for w in workers:
            w.stop()
        code = server.stop()
        problems = server.problems()
        print(f"  server exit code {code}; log {server.log_path}: {len(problems)} error lines")
        for line in problems[:5]:
            print(f"    {line[:300]}")


def start_py_spy(pid: int, seconds: float, scratch: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``py-spy record`` of the server (raw collapsed stacks) for ``seconds`` of the load."""
    spy = Path(sys.executable).with_name("py-spy")
    out = scratch / "server.folded"
    proc = subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, out


def print_py_spy(proc: subprocess.Popen[bytes], out: Path, top: int = 18) -> None:
    """The server's hottest functions: own samples and samples anywhere on the stack."""
    wait_or_kill(proc, 60)
    if not out.exists():
        print("  py-spy: no profile written (is ptrace allowed?)")
        return
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in out.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
            if " (" in f
            else f
            for f in stack.split(";")
        ]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    print(f"  server profile (py-spy, {samples} samples at 200 Hz; {out}):")
    print("    own time:")
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"      {100 * n / samples:5.1f}%  {name}")
    print("    anywhere on the stack:")
    for name, n in sorted(total.items(), key=lambda kv: -kv[1])[: top + 6]:
        print(f"      {100 * n / samples:5.1f}%  {name}")


def print_delivery(results: list[dict[str, Any]], expected: int) -> None:
    """None lost: metric count, contiguous ids, lost connections, per kind."""
    for kind in ("sse", "ws"):
        rows = [c for r in results for c in r["clients"] if c[0] == kind]
        if not rows:
            continue
        metrics = [c[1] for c in rows]
        short = [c for c in rows if c[1] < expected]
        gaps = sum(c[5] for c in rows)
        disorder = sum(c[6] for c in rows)
        lost = sum(1 for c in rows if c[7])
        firsts = {c[3] for c in rows}
        print(
            f"  {kind:<4} {len(rows)} clients: metric events per client min={min(metrics)} "
            f"max={max(metrics)} expected={expected}; short={len(short)} "
            f"(missing {sum(expected - c[1] for c in short)}), ids skipped={gaps}, "
            f"ids repeated/out of order={disorder}, connections lost={lost}, "
            f"first ids seen {sorted(firsts)[:3]}"
        )
    errors = sorted({e for r in results for e in r["lost_errors"]})
    if errors:
        print(f"       lost connections said: {errors[:3]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        _worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=9000, help="idle subscribers (9000)")
    parser.add_argument("--active", type=int, default=1000, help="active subscribers (1000)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s published (1000)")
    parser.add_argument("--hz", type=float, default=20.0, help="publish batches a second (20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="publishing time (30)")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument(
        "--idle-filter",
        choices=("shared", "distinct"),
        default="shared",
        help="idle subscribers share one run (shared) or each has its own",
    )
    parser.add_argument(
        "--idle-kind",
        choices=("mixed", "sse", "ws"),
        default="mixed",
        help="idle subscribers: half and half (mixed), or all of one kind",
    )
    parser.add_argument("--idle-procs", type=int, default=1, help="idle client processes (1)")
    parser.add_argument("--active-procs", type=int, default=2, help="active client processes (2)")
    parser.add_argument(
        "--py-spy",
        type=float,
        metavar="S",
        default=0.0,
        help="profile the server with py-spy for S s of the load",
    )
    parser.add_argument("--quick", action="store_true", help="1,000 idle + 100 active, 5 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.idle, args.active, args.seconds = 1000, 100, 5.0
    # twistd finds the trainstream plugin in the tree's twisted/plugins (the
    # editable install's finder is not walked by twisted.plugin).
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    soft0, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = raise_nofile()
    print(
        f"fanout: {args.idle} idle + {args.active} active subscribers, {args.rate:g} events/s "
        f"in {args.hz:g} batches/s for {args.seconds:g} s, store {args.store}"
    )
    for line in machine_lines():
        print("  " + line)
    with open("/proc/loadavg", encoding="ascii") as f:
        print(f"  load average before: {' '.join(f.read().split()[:3])}")
    print(
        f"  RLIMIT_NOFILE raised {soft0} -> {soft} (hard {hard})"
        + (f"; WARNING: hard limit < {WANT_NOFILE}" if hard < WANT_NOFILE else "")
    )
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
