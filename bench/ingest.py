"""
Benchmark: ingest of metric events into the durable SQLite history with SSE
fan-out on (issue target: >= 100,000 metric events/s on this 2-core machine,
issue 5/8; it was 50,000).

One ``twistd -n trainstream --db TMP/history.sqlite3`` subprocess (the
working tree's code, as ``_stream.ServerProcess`` runs it), ``--sse-clients``
SSE clients in this process (one epoll reactor, ``GET /events?type=metric``)
that count the metric events they receive and check that ids only increase,
and ``--publishers`` publisher processes, each sending JSON arrays of
``--batch`` metric events as fast as the server acknowledges them: one
request in flight per publisher, over a keep-alive HTTP connection
(``POST /api/events``, 200 only once the batch is committed) or, with
``--via ws``, WebSocket ``publish`` messages (``ack`` once committed; frames
masked with a zero key so the publisher spends no CPU on masking). Each
publisher has its own run (``ingest-<p>``) with 10 series ``m0``..``m9`` whose
steps only increase; payloads are pre-encoded templates (steps and the send
time are filled in per batch), so the publishers' own CPU stays small. Every
event's ``time`` is its batch's send time, so SSE latency (send -> bytes at
the client) is printed too.

Reported per store: acked events/s (from the acks, over the publishing
window), events/s the SSE client(s) received in that window and whether they
all arrived, events in the SQLite file after SIGTERM (read-only ``COUNT(*)``),
POST (or publish -> ack) latency, server CPU (per thread, and its SQLite
writer process's) and RSS, publisher and client CPU, the DB file size. With
``--compare-memory`` (on by default) the same run follows with ``--memory``
in place of ``--db``, and the ratio shows the cost of durability.
``--baseline DIR`` (a folder holding another copy of the ``trainstream/``
package, e.g. the code before a change) runs that copy and the working
tree's in turn, ``--rounds`` times, the order alternating, and prints
medians and the after/before ratio: on a shared machine only figures of
one run compare (CPU per event varies less than events/s there). Everything
is loopback (127.0.0.1); it prints figures and never fails on speed::

    .venv/bin/python bench/ingest.py [--quick] [--seconds 20] [--publishers 2]
        [--batch 2000] [--sse-clients 1] [--via http|ws] [--no-compare-memory]
        [--profile-server] [--baseline DIR [--rounds 3]]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import _stream
from _common import machine_lines, percentile, summary_line
from _stream import (
    CLK_TCK,
    Client,
    RssWatch,
    ServerProcess,
    SSEClient,
    Tally,
    close_all,
    connect,
    cpu_seconds,
    raise_nofile,
    run_reactor,
)

TARGET = 100_000.0
NAMES = 10
_ID = re.compile(rb'"id":(\d+)')
_TIME = re.compile(rb'"time":([0-9.eE+-]+)')
_METRIC = b'"type":"metric"'


# The server


class IngestServer(ServerProcess):
    """``twistd -n trainstream`` with ``--db SCRATCH/history.sqlite3`` or ``--memory``."""

    def __init__(
        self,
        store: str,
        profile: bool = False,
        extra: tuple[str, ...] = (),
        tree: Path | None = None,
    ) -> None:
        store_args = ("--db", "{scratch}/history.sqlite3") if store == "db" else ("--memory",)
        with _package_from(tree):
            super().__init__(extra, profile, store_args, prefix="trainstream-ingest-")
        self.db_path = self.scratch / "history.sqlite3" if store == "db" else None

    def children_cpu(self) -> float:
        """CPU seconds so far of the server's child processes (its SQLite writer)."""
        total = 0.0
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return total
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/children", encoding="ascii") as f:
                    pids = f.read().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    total += cpu_seconds(int(pid))
                except (OSError, ValueError):
                    pass
        return total

    def threads_cpu(self) -> dict[int, float]:
        """CPU seconds per thread (tid -> user + system) so far."""
        out: dict[int, float] = {}
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return out
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        return out

    def metrics_text(self) -> str:
        """``GET /metrics`` (the server's own counters), or why not."""
        host, port, _ = self.address("rest")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode("utf-8", "replace")
            conn.close()
            return text
        except OSError as e:
            return f"# /metrics failed: {e}"

    def db_files_bytes(self) -> dict[str, int]:
        if self.db_path is None:
            return {}
        out = {}
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.db_path) + suffix)
            if p.exists():
                out[p.name] = p.stat().st_size
        return out

    def db_count(self) -> tuple[int | None, int | None, str]:
        """After ``stop``: COUNT(*) and MAX(id) of events, opened read-only."""
        if self.db_path is None:
            return None, None, "no file (--memory)"
        try:
            db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
            try:
                count, high = db.execute("SELECT COUNT(*), MAX(id) FROM events").fetchone()
            finally:
                db.close()
            return int(count), high, "ok"
        except sqlite3.Error as e:
            return None, None, f"cannot read: {e}"

    def remove_data(self) -> None:
        """Delete the history files (keep the log and any profile)."""
        if self.db_path is not None:
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(str(self.db_path) + suffix).unlink(missing_ok=True)
        shutil.rmtree(self.scratch / "src", ignore_errors=True)


class _package_from:  # noqa: N801 (a context manager, used as a statement)
    """
    While in it, servers started run ``tree/trainstream`` (a copy of the
    package, for before/after figures in one run) instead of the working
    tree's: ``child_env`` links the package into the server's scratch folder.
    """

    def __init__(self, tree: Path | None) -> None:
        self.tree = tree
        self.saved = _stream.child_env

    def __enter__(self) -> None:
        if self.tree is None:
            return
        package = (self.tree / "trainstream").resolve()
        original = self.saved

        def child_env(tree: bool, scratch: Path) -> dict[str, str]:
            link = scratch / "src" / "trainstream"
            link.parent.mkdir(exist_ok=True)
            if not link.exists():
                link.symlink_to(package, target_is_directory=True)
            return original(tree, scratch)

        _stream.child_env = child_env

    def __exit__(self, *exc: object) -> None:
        _stream.child_env = self.saved


# What the SSE clients receive


class IdTally(Tally):
    """Counts metric events, checks every id is above the one before, latency per batch."""

    def __init__(self) -> None:
        super().__init__(array("d"))
        self.not_increasing = 0
        self.skipped_ids = 0  # ids between received events (other types, or coalesced)
        self.first_id = 0

    def feed(self, blob: bytes, now: float) -> None:
        n = blob.count(_METRIC)
        if not n:
            return
        ids = [int(x) for x in _ID.findall(blob)]
        if len(ids) != n:
            self.errors.append(f"sse: {n} metric events but {len(ids)} ids in one read")
        if ids:
            if not self.first_id:
                self.first_id = ids[0]
            prev = self.last_id
            for i in ids:
                if i <= prev:
                    self.not_increasing += 1
                prev = i
            if self.last_id:
                self.skipped_ids += ids[-1] - self.last_id - len(ids)
            else:
                self.skipped_ids += ids[-1] - ids[0] + 1 - len(ids)
            self.last_id = ids[-1]
        self.count += n
        for sent in set(_TIME.findall(blob)):
            self.samples.append((now - float(sent)) * 1000.0)


class MetricSSEClient(SSEClient):
    """``GET /events?type=metric`` (every run)."""

    def __init__(self, tally: Tally, host: str, port: int, path: str) -> None:
        super().__init__(tally, host, port, path, filtered=False)
        self.request = (
            f"GET {path}?type=metric HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()


# The publishers (processes of their own: ``ingest.py publish ...``)


def payload_template(publisher: int, batch: int) -> tuple[bytes, list[int], int]:
    """
    A JSON array of ``batch`` metric events with ``%d`` for each step and
    ``@T@`` for the send time; the per-event step offsets; steps per batch.
    """
    per_batch = -(-batch // NAMES)
    run = f"ingest-{publisher}"
    items = []
    offsets = []
    for i in range(batch):
        value = repr(round(((i * 7919) % 1000) / 997.0, 6))
        items.append(
            f'{{"type":"metric","run":"{run}","name":"m{i % NAMES}",'
            f'"step":%d,"value":{value},"time":@T@}}'
        )
        offsets.append(i // NAMES)
    return ("[" + ",".join(items) + "]").encode(), offsets, per_batch


class HTTPSender:
    """``POST /api/events`` over one keep-alive connection."""

    via = "http"

    def __init__(self, host: str, port: int, path: str) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.conn.connect()
        assert self.conn.sock is not None
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.path = path
        self.headers = {"Content-Type": "application/json"}

    def send(self, body: bytes) -> dict[str, Any]:
        self.conn.request("POST", self.path, body, self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {data[:300]!r}"}
        answer: dict[str, Any] = json.loads(data)
        return answer

    def close(self) -> None:
        self.conn.close()


class WSSender:
    """WebSocket ``publish`` messages; waits for each ``ack`` (blocking socket)."""

    via = "ws"

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("ws: closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise ConnectionError(f"ws: {head[:200]!r}")

    def _frame(self, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        return head + b"\0\0\0\0" + payload  # a zero mask: the payload as it is

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("ws: closed by the server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _message(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8))
        return b0 & 0x0F, self._read(length)

    def send(self, body: bytes) -> dict[str, Any]:
        self.sock.sendall(self._frame(b'{"op":"publish","events":' + body + b"}"))
        for _ in range(100):  # bounded: the ack is the next text message
            opcode, payload = self._message()
            if opcode == 8:
                return {"error": f"ws: closed {payload[:120]!r}"}
            if opcode != 1:
                continue
            obj: dict[str, Any] = json.loads(payload)
            if obj.get("op") == "ack":
                return obj
            if obj.get("op") == "error":
                return {"error": f"ws: {obj}"}
        return {"error": "ws: no ack"}

    def close(self) -> None:
        try:
            self.sock.sendall(b"\x88\x82\0\0\0\0" + struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


def publisher_main(argv: list[str]) -> int:
    """``publish VIA HOST PORT PATH INDEX BATCH START_WALL SECONDS OUT``: one publisher."""
    via, host, port, path, index, batch, start_wall, seconds, out = argv
    template, offsets, per_batch = payload_template(int(index), int(batch))
    sender: HTTPSender | WSSender = (
        HTTPSender(host, int(port), path) if via == "http" else WSSender(host, int(port), path)
    )
    time.sleep(max(0.0, float(start_wall) - time.time()))
    cpu0 = time.process_time()
    t0 = time.monotonic()
    end = t0 + float(seconds)
    latency_ms = array("d")
    acked = requests = 0
    first_id = last_id = None
    errors: list[str] = []
    k = 0
    while time.monotonic() < end and len(errors) < 5:
        base = k * per_batch
        body = (template % tuple([base + o for o in offsets])).replace(
            b"@T@", repr(time.time()).encode()
        )
        sent = time.perf_counter()
        try:
            answer = sender.send(body)
        except (OSError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
            break
        latency_ms.append((time.perf_counter() - sent) * 1000.0)
        requests += 1
        k += 1
        if "error" in answer:
            errors.append(str(answer["error"]))
            continue
        acked += int(answer["accepted"])
        if first_id is None:
            first_id = answer["first_id"]
        last_id = answer["last_id"]
    wall = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    sender.close()
    result = {
        "via": via,
        "acked": acked,
        "requests": requests,
        "wall": wall,
        "cpu": cpu,
        "latency_ms": list(latency_ms),
        "errors": errors,
        "first_id": first_id,
        "last_id": last_id,
        "bytes_per_request": len(body) if k else 0,
    }
    Path(out).write_text(json.dumps(result), encoding="utf-8")
    return 0


# One scenario


async def sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, max(0.0, seconds), lambda: None)


def _metric_lines(text: str) -> list[str]:
    keep = ("trainstream_coalesced", "trainstream_client_overflows", "trainstream_events_accepted")
    return [
        line
        for line in text.splitlines()
        if line.startswith(keep) and not line.startswith("#") and "_created" not in line
    ]


async def scenario(
    reactor: Any, args: argparse.Namespace, store: str, tree: Path | None = None, label: str = ""
) -> dict[str, Any]:
    """Start a server with ``store`` (``db`` or ``memory``), publish, report; the figures."""
    print(
        f"\n[{store}{' ' + label if label else ''}] {args.publishers} publisher(s) "
        f"x batches of {args.batch} metric events "
        f"via {args.via}, {args.sse_clients} SSE client(s), {args.seconds:g} s"
        + (
            " (server under cProfile: slower, figures not comparable)"
            if args.profile_server
            else ""
        )
    )
    extra: tuple[str, ...] = ()
    if args.client_buffer is not None:
        extra = ("--client-buffer", str(args.client_buffer))
    server = IngestServer(store, profile=args.profile_server, extra=extra, tree=tree)
    print(f"  server pid {server.pid}: {' '.join(server.command)}")
    clients: list[Client] = []
    tallies: list[IdTally] = []
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"store": store}
    rss: RssWatch | None = None
    try:
        host, port, path = server.address("sse")
        for _ in range(args.sse_clients):
            tally = IdTally()
            client = MetricSSEClient(tally, host, port, path)
            await connect(client, host, port, reactor)
            clients.append(client)
            tallies.append(tally)
        role = "rest" if args.via == "http" else "ws"
        phost, pport, ppath = server.address(role)
        ppath = "/api/events" if args.via == "http" else ppath
        start_wall = time.time() + 1.5
        outs = [server.scratch / f"publisher-{p}.json" for p in range(args.publishers)]
        for p in range(args.publishers):
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "publish",
                args.via,
                phost,
                str(pport),
                ppath,
                str(p),
                str(args.batch),
                repr(start_wall),
                repr(args.seconds),
                str(outs[p]),
            ]
            errlog = open(server.scratch / f"publisher-{p}.err", "wb")
            procs.append(
                subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog)
            )
            errlog.close()
        await sleep(reactor, start_wall - time.time())
        rss = RssWatch(reactor, server.pid, 0.25)
        t0 = time.monotonic()
        server_cpu0 = server.cpu()
        writer_cpu0 = server.children_cpu()
        threads0 = server.threads_cpu()
        own_cpu0 = cpu_seconds(os.getpid())
        counts0 = [t.count for t in tallies]
        await sleep(reactor, args.seconds)
        window = time.monotonic() - t0
        server_cpu = server.cpu() - server_cpu0
        writer_cpu = server.children_cpu() - writer_cpu0
        threads1 = server.threads_cpu()
        own_cpu = cpu_seconds(os.getpid()) - own_cpu0
        counts1 = [t.count for t in tallies]
        deadline = time.monotonic() + 60.0
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await sleep(reactor, 0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        pubs = []
        for p, out in enumerate(outs):
            try:
                pubs.append(json.loads(out.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                err = (server.scratch / f"publisher-{p}.err").read_text(errors="replace")
                print(f"  publisher {p} wrote no result (exit {procs[p].returncode}): {err[-800:]}")
        acked = sum(p["acked"] for p in pubs)
        # Until every client has them all, or nothing arrived for 2 s (the server
        # may have coalesced some), at most 20 s.
        t_drain = progress_at = time.monotonic()
        seen = sum(t.count for t in tallies)
        while time.monotonic() - t_drain < 20.0 and time.monotonic() - progress_at < 2.0:
            if all(t.count >= acked or c.lost for t, c in zip(tallies, clients, strict=True)):
                break
            await sleep(reactor, 0.05)
            if sum(t.count for t in tallies) != seen:
                seen, progress_at = sum(t.count for t in tallies), time.monotonic()
        drained = time.monotonic() - t_drain
        rss.stop()
        metrics = _metric_lines(server.metrics_text())
        files_running = server.db_files_bytes()

        pub_wall = max((p["wall"] for p in pubs), default=window)
        rate = acked / pub_wall if pub_wall else 0.0
        latency = array("d")
        for p in pubs:
            latency.extend(p["latency_ms"])
        requests = sum(p["requests"] for p in pubs)
        pub_cpu = sum(p["cpu"] for p in pubs)
        received_rates = [(b - a) / window for a, b in zip(counts0, counts1, strict=True)]
        result.update(acked=acked, rate=rate, server_cpu=server_cpu / window, rss_peak=rss.peak_kb)
        result.update(writer_cpu=writer_cpu / window, label=label)
        print(
            f"  published: {acked} events acked in {requests} requests over {pub_wall:.2f} s: "
            f"{rate:,.0f} events/s acked "
            f"({'>=' if rate >= TARGET else 'BELOW'} the {TARGET:,.0f}/s target); "
            f"{acked / requests if requests else 0:.0f} events, "
            f"{pubs[0]['bytes_per_request'] if pubs else 0} bytes per request"
        )
        for i, p in enumerate(pubs):
            print(
                f"    publisher {i}: {p['acked']} acked ({p['acked'] / p['wall']:,.0f}/s), "
                f"{p['requests']} requests, ids {p['first_id']}..{p['last_id']}, "
                f"CPU {p['cpu']:.2f} s ({100 * p['cpu'] / p['wall']:.0f}% of a core)"
                + (f", errors: {p['errors'][:3]}" if p["errors"] else "")
            )
        label = "POST -> 200" if args.via == "http" else "publish -> ack"
        print(summary_line(f"{label} (commit)", latency))
        for i, t in enumerate(tallies):
            print(
                f"  SSE client {i}: {received_rates[i]:,.0f} events/s received in the window; "
                f"{t.count} in all (acked {acked}: "
                + ("all arrived" if t.count == acked else f"{t.count - acked:+d}")
                + f", waited {drained:.2f} s after the window); ids {t.first_id}..{t.last_id}, "
                f"not increasing {t.not_increasing}, ids skipped {t.skipped_ids}"
                + (", lost connection" if clients[i].lost else "")
                + (f", errors {t.errors[:3]}" if t.errors else "")
            )
        sse_ms = array("d")
        for t in tallies:
            sse_ms.extend(t.samples)
        print(summary_line("send -> SSE bytes", sse_ms))
        print(
            f"  server CPU over the {window:.1f} s window: {server_cpu:.2f} s "
            f"({100 * server_cpu / window:.0f}% of a core); per thread: "
            + ", ".join(
                f"{'main' if tid == server.pid else tid} "
                f"{100 * (c - threads0.get(tid, 0.0)) / window:.0f}%"
                for tid, c in sorted(threads1.items())
                if c - threads0.get(tid, 0.0) > 0.005 * window
            )
            + (f"; writer process {100 * writer_cpu / window:.0f}%" if store == "db" else "")
        )
        print(
            f"  publishers' CPU: {pub_cpu:.2f} s ({100 * pub_cpu / pub_wall:.0f}% of a core, all "
            f"{len(pubs)}); this process (SSE clients): {own_cpu:.2f} s "
            f"({100 * own_cpu / window:.0f}%)"
        )
        print(
            f"  server RSS: peak {rss.peak_kb / 1024:.1f} MiB, "
            f"at the end {rss.last_kb / 1024:.1f} MiB"
        )
        if metrics:
            print("  server /metrics: " + "; ".join(metrics))
        if files_running:
            print(
                "  history files before the stop: "
                + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in files_running.items())
            )
        result.update(sse_rates=received_rates, latency_p50=percentile(latency, 50))
        result.update(latency_p99=percentile(latency, 99), pub_cpu=pub_cpu / pub_wall)
    finally:
        if rss is not None:
            rss.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        left = await close_all(clients, reactor, limit=10.0)
        t_stop = time.monotonic()
        code = server.stop()
        stop_s = time.monotonic() - t_stop
        problems = server.problems()
        print(
            f"  stop (SIGTERM) took {stop_s:.2f} s, exit code {code}; {left} clients aborted; "
            f"log {server.log_path}: {len(problems)} Traceback/Unhandled/error lines"
        )
        for line in problems[:10]:
            print(f"    {line[:300]}")
        result["problems"] = len(problems)
        if store == "db":
            files = server.db_files_bytes()
            count, high, how = server.db_count()
            acked_total = result.get("acked")
            print(
                f"  SQLite after the stop: {count} events (max id {high}; {how})"
                + (
                    f" vs {acked_total} acked: "
                    + ("every acked event is there" if count == acked_total else "MISMATCH")
                    if count is not None and acked_total is not None
                    else ""
                )
                + "; files "
                + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in files.items())
                + (f" ({sum(files.values()) / count:.0f} bytes/event)" if count else "")
            )
            result.update(db_count=count, db_bytes=sum(files.values()))
        if args.profile_server:
            print("  server profile (cProfile, the reactor thread only; whole life), by tottime:")
            print(server.profile_top(15))
        if not args.keep_db:
            server.remove_data()
    return result


async def compare(reactor: Any, args: argparse.Namespace) -> None:
    """
    ``--baseline DIR``: each round runs every store with the baseline's
    package and the working tree's, alternating which goes first; medians
    and ratios at the end (the machine may be busy: only same-run figures
    compare).
    """
    stores = ["db", "memory"] if args.compare_memory else ["db"]
    trees: list[tuple[str, Path | None]] = [("before", args.baseline), ("after", None)]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for store in stores:
            for label, tree in order:
                result = await scenario(reactor, args, store, tree, f"{label}, round {r + 1}")
                runs.setdefault((store, label), []).append(result)

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        n = len(ordered)
        return 0.0 if not n else (ordered[n // 2] + ordered[(n - 1) // 2]) / 2

    print(
        f"\nbefore/after ({args.via}, {args.publishers} publishers x {args.batch}/batch, "
        f"{args.seconds:g} s each, {args.rounds} rounds interleaved; medians):"
    )
    for store in stores:
        rates = {}
        for label, _ in trees:
            results = [x for x in runs.get((store, label), []) if "rate" in x]
            rate = median([x["rate"] for x in results])
            rates[label] = rate
            shown = ", ".join(f"{x['rate']:,.0f}" for x in results)
            print(
                f"  {store:<6} {label:<6}: {rate:>9,.0f} events/s acked "
                f"(runs: {shown}), "
                f"server CPU {100 * median([x['server_cpu'] for x in results]):.0f}%"
                + (
                    f", writer process {100 * median([x['writer_cpu'] for x in results]):.0f}%"
                    if store == "db"
                    else ""
                )
                + f", POST p50 {median([x['latency_p50'] for x in results]):.1f} ms"
            )
            per_event = median([1e6 * x["server_cpu"] / x["rate"] for x in results if x["rate"]])
            writer = median([1e6 * x["writer_cpu"] / x["rate"] for x in results if x["rate"]])
            print(
                f"  {store:<6} {label:<6}: server CPU {per_event:.1f} us/event"
                + (f", writer process {writer:.1f} us/event" if store == "db" else "")
            )
        if rates.get("before"):
            print(f"  {store:<6} after/before: {rates['after'] / rates['before']:.2f}x")


async def measure(reactor: Any, args: argparse.Namespace) -> None:
    if args.baseline is not None:
        await compare(reactor, args)
        return
    results = [await scenario(reactor, args, "db")]
    if args.compare_memory:
        results.append(await scenario(reactor, args, "memory"))
    if len(results) == 2 and "rate" in results[0] and "rate" in results[1]:
        db, mem = results
        print(
            f"\nsummary ({args.via}, {args.publishers} publishers x {args.batch}/batch, "
            f"{args.seconds:g} s each):"
        )
        for r in results:
            print(
                f"  {r['store']:<6}: {r['rate']:>9,.0f} events/s acked, SSE "
                f"{min(r['sse_rates'], default=0):>9,.0f}/s, POST p50 {r['latency_p50']:.1f} ms "
                f"p99 {r['latency_p99']:.1f} ms, server CPU {100 * r['server_cpu']:.0f}%, "
                f"RSS peak {r['rss_peak'] / 1024:.0f} MiB"
            )
        if mem["rate"]:
            print(
                f"  durability: SQLite ingest is {db['rate'] / mem['rate']:.2f}x the --memory "
                f"rate ({db['rate']:,.0f} vs {mem['rate']:,.0f} events/s)"
            )


def plugin_path() -> None:
    """
    Let the servers' ``twistd`` find the ``trainstream`` plugin: an editable
    install maps ``twisted.plugins`` through an import hook that Twisted's
    plugin scan does not follow, and the servers run from a scratch folder,
    so a folder holding only a link to the tree's plugin goes on
    ``PYTHONPATH`` (Twisted writes its ``dropin.cache`` there, not in the tree).
    """
    plugin = Path(__file__).resolve().parent.parent / "twisted" / "plugins"
    plugin = plugin / "trainstream_plugin.py"
    if not plugin.exists():
        return
    folder = Path(tempfile.mkdtemp(prefix="trainstream-ingest-plugin-")) / "twisted" / "plugins"
    folder.mkdir(parents=True)
    (folder / plugin.name).symlink_to(plugin)
    root = str(folder.parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["publish"]:
        return publisher_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="publishing time (20)")
    parser.add_argument("--quick", action="store_true", help="5 s per store")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (2)")
    parser.add_argument("--batch", type=int, default=2000, help="events per request (2000)")
    parser.add_argument("--sse-clients", type=int, default=1, help="SSE clients (1)")
    parser.add_argument(
        "--via", choices=("http", "ws"), default="http", help="POST /api/events or WS publish"
    )
    parser.add_argument(
        "--compare-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run with --memory instead of --db (on)",
    )
    parser.add_argument(
        "--client-buffer", type=int, default=None, help="pass --client-buffer BYTES to the server"
    )
    parser.add_argument(
        "--profile-server",
        action="store_true",
        help="run the server under twistd --profile (cProfile; slower, not comparable)",
    )
    parser.add_argument("--keep-db", action="store_true", help="keep the history file")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a folder holding another trainstream/ package: run it and the working tree's "
        "in turn (--rounds), for before/after figures in one run",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds with --baseline (3)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 5.0
    args.seconds = max(0.5, min(args.seconds, 600.0))
    args.batch = max(1, args.batch)
    args.publishers = max(1, min(args.publishers, 32))
    args.sse_clients = max(0, min(args.sse_clients, 200))
    args.rounds = max(1, min(args.rounds, 20))
    raise_nofile()
    plugin_path()
    print("ingest: metric events into the history with SSE fan-out on")
    for line in machine_lines():
        print("  " + line)
    run_reactor(lambda reactor: measure(reactor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
