"""
Checks the nginx and haproxy configurations of docs/deploy.md for real:
reads them out of that file, starts trainstream servers on free loopback
ports (a cluster of three on a ``redis-server`` of its own; with
``--single``, two servers without Redis), renders each configuration with
those ports (only its ``listen`` / ``bind`` line and its ``server`` lines
change), starts the proxy in the foreground and checks through it:

- ``GET /api/health`` answers 200; without the token another call gets 401;
- a POST with the proxy's Origin passes, one from another Origin gets 403;
- SSE clients (one per server, ``?token=``) get each live event within
  100 ms of its POST (no buffering), with the same ids on every stream in a
  cluster (on exactly one stream without one: the servers are independent);
- a WebSocket (``Origin``, ``Authorization``) subscribes, publishes, gets its
  ack and its event; one from another Origin is refused;
- the SSE streams and the WebSocket stay open through ``--idle`` seconds of
  silence (past the server's 15 s keepalive) and still get the next event;
- cluster only: the server of one SSE client is killed (SIGKILL); events are
  published meanwhile; the client reconnects through the proxy with its
  ``Last-Event-ID`` and gets exactly what it missed, in order, then live ones.

Everything it starts is stopped by pid. It prints what it measured and
exits 1 when a check fails::

    apt-get install -y nginx haproxy redis-server
    .venv/bin/python bench/proxy_check.py [--single] [--proxy nginx|haproxy] [--idle 20]

``--drop TEXT`` leaves out the configuration lines that contain TEXT, to
see what a setting is for (``--proxy haproxy --drop http-no-delay``: every
SSE event about 200 ms late).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    REPO_ROOT,
    RedisServer,
    free_port,
    machine_lines,
    plugin_on_path,
    wait_or_kill,
)
from _stream import ServerProcess, frame_head, wait_healthy, ws_frame

DOC = REPO_ROOT / "docs" / "deploy.md"
HOST = "127.0.0.1"
PUBLIC_HOST = "trainstream.example.org"  # the name browsers use; sent as Host
TOKEN = "proxy-check-token"
RUN = "proxy-check"
LIVE_MS = 100.0  # an SSE event must arrive within this of its POST
EVENTS = 10
WAIT_S = 10.0  # any single wait in a check


class CheckFailedError(Exception):
    pass


class Report:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


# The configurations, from the doc


def doc_block(lang: str) -> str:
    """The one fenced block of docs/deploy.md tagged ``lang``."""
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.M | re.S)
    if len(blocks) != 1:
        raise SystemExit(f"{DOC}: expected one ```{lang} block, found {len(blocks)}")
    return str(blocks[0])


def render(lang: str, listen_port: int, backends: Sequence[int], drop: Sequence[str] = ()) -> str:
    """
    The doc's block with our listen port and our servers (extra ``server``
    lines dropped), and without the lines that contain one of ``drop``.
    """
    text = "".join(
        line for line in doc_block(lang).splitlines(True) if not any(d in line for d in drop)
    )
    if lang == "nginx":
        listen = re.compile(r"^(\s*)listen 80;$", re.M)
        text, n = listen.subn(rf"\1listen {HOST}:{listen_port};", text)
        server = re.compile(r"^(\s*)server ts-(\d+)\.internal:8080( [^;\n]*)?;\n", re.M)
    else:
        listen = re.compile(r"^(\s*)bind :80$", re.M)
        text, n = listen.subn(rf"\1bind {HOST}:{listen_port}", text)
        server = re.compile(r"^(\s*)server ts-(\d+) ts-\d+\.internal:8080( [^\n]*)?\n", re.M)
    if n != 1:
        raise SystemExit(f"{DOC}: the {lang} block has no single listen/bind line to render")

    def one(m: re.Match[str]) -> str:
        i = int(m.group(2)) - 1
        if i >= len(backends):
            return ""
        rest = m.group(3) or ""
        if lang == "nginx":
            return f"{m.group(1)}server {HOST}:{backends[i]}{rest};\n"
        return f"{m.group(1)}server ts-{i + 1} {HOST}:{backends[i]}{rest}\n"

    text, n = server.subn(one, text)
    if n < len(backends):
        raise SystemExit(f"{DOC}: the {lang} block has {n} server lines, {len(backends)} needed")
    return text


class Proxy:
    """nginx or haproxy in the foreground on ``port``, with the doc's configuration."""

    def __init__(
        self, kind: str, port: int, backends: Sequence[int], drop: Sequence[str] = ()
    ) -> None:
        self.kind = kind
        self.port = port
        self.scratch = Path(tempfile.mkdtemp(prefix=f"trainstream-{kind}-"))
        self.log_path = self.scratch / "proxy.log"
        binary = shutil.which(kind) or f"/usr/sbin/{kind}"
        if not Path(binary).exists():
            raise SystemExit(f"{kind} is not installed: apt-get install -y {kind}")
        block = render(kind, port, backends, drop)
        if kind == "nginx":
            (self.scratch / "trainstream.conf").write_text(block, encoding="utf-8")
            s = self.scratch
            temps = " ".join(
                f"{name}_temp_path {s}/{name};"
                for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            conf = self.scratch / "nginx.conf"
            conf.write_text(
                f"worker_processes 1;\npid {s}/nginx.pid;\nerror_log {s}/error.log info;\n"
                f"events {{ worker_connections 1024; }}\n"
                f"http {{\n    access_log {s}/access.log;\n    {temps}\n"
                f"    include {s}/trainstream.conf;\n}}\n",
                encoding="utf-8",
            )
            base = [binary, "-p", str(s), "-c", str(conf)]
            test = [*base, "-t", "-q"]
            command = [*base, "-g", "daemon off;"]
        else:
            conf = self.scratch / "haproxy.cfg"
            conf.write_text(block, encoding="utf-8")
            test = [binary, "-c", "-q", "-f", str(conf)]
            command = [binary, "-db", "-f", str(conf)]
        checked = subprocess.run(test, capture_output=True, check=False)
        if checked.returncode != 0:
            err = (checked.stderr or checked.stdout).decode(errors="replace")
            raise SystemExit(f"{kind} refuses the configuration of {DOC}:\n{err}")
        self.config_text = conf.read_text(encoding="utf-8")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"{kind} did not start:\n{self.log_text()}") from None
                time.sleep(0.02)

    def log_text(self) -> str:
        text = self.log_path.read_text(errors="replace")
        err = self.scratch / "error.log"
        if err.exists():
            text += err.read_text(errors="replace")
        return text[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        wait_or_kill(self.proc, 10)


# Clients, plain blocking sockets


def origin(port: int) -> str:
    return f"http://{PUBLIC_HOST}:{port}"


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
    origin_header: str | None = None,
) -> tuple[int, Any]:
    """One HTTP request on a new connection; (status, decoded JSON or text)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=WAIT_S)
    headers = {"Host": f"{PUBLIC_HOST}:{port}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if origin_header is not None:
        headers["Origin"] = origin_header
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def metric(name: str, step: int) -> dict[str, Any]:
    return {"type": "metric", "run": RUN, "name": name, "step": step, "value": 0.5}


def post(port: int, events: list[dict[str, Any]]) -> tuple[int, Any]:
    return request(port, "POST", "/api/events", events, origin_header=origin(port))


class SSEStream(threading.Thread):
    """One ``GET /events`` through the proxy, read in a thread: (arrival, id, event) lists."""

    def __init__(self, port: int, last_event_id: int | None = None) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.last_event_id = last_event_id
        self.events: list[tuple[float, int, dict[str, Any]]] = []
        self.resets: list[dict[str, Any]] = []
        self.keepalives = 0
        self.status = 0
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.error = ""
        self.sock = socket.create_connection((HOST, port), timeout=WAIT_S)
        self.sock.settimeout(None)
        self.start()

    def run(self) -> None:
        head = (
            f"GET /events?run={RUN}&type=metric&token={TOKEN} HTTP/1.1\r\n"
            f"Host: {PUBLIC_HOST}:{self.port}\r\nAccept: text/event-stream\r\n"
        )
        if self.last_event_id is not None:
            head += f"Last-Event-ID: {self.last_event_id}\r\n"
        try:
            self.sock.sendall((head + "\r\n").encode())
            self._read()
        except OSError as e:
            self.error = str(e)
        finally:
            self.ended.set()
            self.ready.set()

    def _read(self) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.sock.recv(65536)
            if not data:
                self.error = "closed before the response head"
                return
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        raw, text = buf, b""
        while True:
            if chunked:
                while True:
                    eol = raw.find(b"\r\n")
                    if eol < 0:
                        break
                    size = int(raw[:eol].split(b";")[0] or b"0", 16)
                    if size == 0:
                        self.error = "the stream ended"
                        return
                    if len(raw) < eol + 2 + size + 2:
                        break
                    text += raw[eol + 2 : eol + 2 + size]
                    raw = raw[eol + 4 + size :]
            else:
                text, raw = text + raw, b""
            while b"\n\n" in text:
                block, text = text.split(b"\n\n", 1)
                self._block(block.decode(), time.monotonic())
            data = self.sock.recv(65536)
            if not data:
                self.error = "closed by the proxy"
                return
            raw += data

    def _block(self, block: str, now: float) -> None:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                self.keepalives += "keepalive" in line
            elif line.startswith("retry:"):
                self.ready.set()  # the first bytes came through at once
            else:
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
        if "data" not in fields:
            return
        data = json.loads(fields["data"])
        if fields.get("event") == "reset":
            self.resets.append(data)
        elif "id" in fields:
            self.events.append((now, int(fields["id"]), data))

    def ids(self) -> list[int]:
        return [i for _, i, _ in self.events]

    def wait_events(self, n: int, limit: float = WAIT_S) -> bool:
        deadline = time.monotonic() + limit
        while len(self.events) < n and not self.ended.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return len(self.events) >= n

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.join(5)


class WS:
    """A WebSocket through the proxy, blocking, one message at a time."""

    def __init__(self, port: int, origin_header: str) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=WAIT_S)
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {PUBLIC_HOST}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: {origin_header}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.sock.recv(65536)
            if not data:
                break
            buf += data
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(ws_frame(json.dumps(message).encode()))

    def receive(self, limit: float = WAIT_S) -> dict[str, Any]:
        self.sock.settimeout(limit)
        while True:
            head = frame_head(self.buf, 0)
            if head is not None and len(self.buf) - head[2] >= head[3]:
                b0, _, at, length = head
                payload, self.buf = self.buf[at : at + length], self.buf[at + length :]
                if b0 & 0x0F == 1:
                    message: dict[str, Any] = json.loads(payload)
                    return message
                if b0 & 0x0F == 8:
                    raise CheckFailedError(f"WebSocket closed: {payload[2:]!r}")
                continue
            data = self.sock.recv(65536)
            if not data:
                raise CheckFailedError("WebSocket connection closed")
            self.buf += data

    def until(self, op: str, limit: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while True:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if message.get("op") == op:
                return message

    def close(self) -> None:
        self.sock.close()


# One proxy, its servers, the checks


def start_servers(n: int, proxy_port: int, redis: RedisServer | None) -> list[ServerProcess]:
    scratch = Path(tempfile.mkdtemp(prefix="trainstream-proxy-check-"))
    token_file = scratch / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    extra = ["--allow-origin", origin(proxy_port), "--token-file", str(token_file)]
    if redis is not None:
        extra += ["--redis", redis.url]
    servers: list[ServerProcess] = []
    try:
        for _ in range(n):
            servers.append(ServerProcess(extra=extra, roles=("--listen",)))
        for s in servers:
            wait_healthy(s)  # a cluster server listens before it has reached Redis
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def server_port(server: ServerProcess) -> int:
    return server.address("rest")[1]


def sse_clients(server: ServerProcess) -> int:
    _, body = request(server_port(server), "GET", "/api/health", token=None)
    return int(body.get("clients", {}).get("sse", 0)) if isinstance(body, dict) else -1


def run_checks(
    kind: str, cluster: bool, idle: float, report: Report, drop: Sequence[str] = ()
) -> dict[str, Any]:
    port = free_port()
    redis = RedisServer(appendonly="yes") if cluster else None
    figures: dict[str, Any] = {"proxy": kind, "cluster": cluster}
    servers: list[ServerProcess] = []
    proxy: Proxy | None = None
    streams: list[SSEStream] = []
    try:
        servers = start_servers(3 if cluster else 2, port, redis)
        proxy = Proxy(kind, port, [server_port(s) for s in servers], drop)
        print(
            f"{kind} on port {port} in front of {len(servers)} servers "
            f"{[server_port(s) for s in servers]}"
            + (f", Redis on {redis.port}" if redis else ", no Redis")
        )
        checks(port, servers, cluster, idle, report, figures, streams)
    finally:
        for st in streams:
            st.close()
        if proxy is not None:
            proxy.stop()
        for s in servers:
            s.stop()
            problems = s.problems()
            if problems:
                print(f"  note: server {s.pid} logged: {problems[:3]}")
        if redis is not None:
            redis.stop()
    return figures


def checks(
    port: int,
    servers: list[ServerProcess],
    cluster: bool,
    idle: float,
    report: Report,
    figures: dict[str, Any],
    streams: list[SSEStream],
) -> None:
    status, body = request(port, "GET", "/api/health", token=None)
    report.check(
        status == 200 and isinstance(body, dict) and body.get("status") == "ok",
        "GET /api/health through the proxy",
        f"{status} {body.get('status') if isinstance(body, dict) else body!r}",
    )
    status, _ = request(port, "GET", "/api/runs", token=None)
    report.check(status == 401, "no token: 401 through the proxy", str(status))
    status, page = request(port, "GET", f"/?token={TOKEN}", token=None)
    report.check(
        status == 200 and "<html" in str(page).lower(),
        "the dashboard page through the proxy",
        f"{status}, {len(str(page))} characters",
    )
    status, body = request(
        port, "POST", "/api/events", [metric("check/x", 0)], origin_header="http://evil.example"
    )
    report.check(status == 403, "POST from another Origin: 403", f"{status} {body}")
    status, body = post(port, [metric("check/first", 0)])
    report.check(status == 200, f"POST with Origin {origin(port)}: 200", f"{status} {body}")

    # Live SSE, one stream per server (least connections spreads them).
    for _ in servers:
        streams.append(SSEStream(port))
        if not streams[-1].ready.wait(WAIT_S):
            raise CheckFailedError("an SSE stream through the proxy sent no first bytes")
        time.sleep(0.05)  # the proxy counts the new connection before the next one
    report.check(
        all(st.status == 200 for st in streams),
        f"{len(streams)} SSE streams open through the proxy",
        f"statuses {[st.status for st in streams]}, per server {[sse_clients(s) for s in servers]}",
    )
    lat_ms: list[float] = []
    ids: list[int] = []
    for k in range(EVENTS):
        counts = [len(st.events) for st in streams]
        t0 = time.monotonic()
        status, body = post(port, [metric(f"check/live{k}", k)])
        if status != 200:
            report.check(False, "live POST", f"{status} {body}")
            return
        ids.append(int(body["first_id"]))
        deadline = t0 + 2.0
        while time.monotonic() < deadline:
            got = [st for st, c in zip(streams, counts, strict=True) if len(st.events) > c]
            if (cluster and len(got) == len(streams)) or (not cluster and got):
                break
            time.sleep(0.001)
        for st, c in zip(streams, counts, strict=True):
            if len(st.events) > c:
                lat_ms.append((st.events[c][0] - t0) * 1000)
        time.sleep(0.05)
    time.sleep(0.2)  # a stream that got an event twice, or late, shows it now
    per_stream = [st.ids() for st in streams]
    if cluster:
        same = all(p == per_stream[0] for p in per_stream)
        report.check(
            same and per_stream[0][-EVENTS:] == ids,
            "cluster: every stream got every event, same ids, same order, once",
            f"POSTs got ids {ids[0]}..{ids[-1]}; streams got {[len(p) for p in per_stream]} events",
        )
    else:
        got = sorted(i for p in per_stream for i in p)
        report.check(
            got[-EVENTS:] == sorted(ids) and len(got) <= EVENTS + 1,
            "single servers: each event on exactly one stream (the servers are independent)",
            f"streams got {[len(p) for p in per_stream]} events",
        )
    figures["live_ms"] = lat_ms
    report.check(
        len(lat_ms) >= EVENTS and max(lat_ms) < LIVE_MS,
        f"SSE: each live event within {LIVE_MS:.0f} ms of its POST (no buffering)",
        f"n={len(lat_ms)} median={statistics.median(lat_ms):.1f} ms max={max(lat_ms):.1f} ms"
        if lat_ms
        else "none arrived",
    )

    # WebSocket: refused from elsewhere; subscribe, publish, ack, event.
    evil = WS(port, "http://evil.example")
    report.check(evil.status == 403, "WebSocket upgrade from another Origin: 403", str(evil.status))
    evil.close()
    ws = WS(port, origin(port))
    try:
        ok = ws.status == 101
        hello = ws.until("hello") if ok else {}
        ws.send({"op": "subscribe", "runs": [RUN], "types": ["metric"]})
        ws.send({"op": "ping", "nonce": "ready"})
        ws.until("pong")
        t0 = time.monotonic()
        ws.send({"op": "publish", "events": [metric("check/ws", 0)]})
        ack: dict[str, Any] = {}
        seen: list[int] = []
        while not ack or ack["first_id"] not in seen:  # the event may come before its ack
            message = ws.receive()
            if message.get("op") == "ack":
                ack = message
            elif message.get("op") == "events":
                seen += [e["id"] for e in message["events"]]
        ws_ms = (time.monotonic() - t0) * 1000
        report.check(
            ok,
            "WebSocket through the proxy: hello, subscribe, publish, ack, its event",
            f"101, hello last_id={hello.get('last_id')}, ack id {ack['first_id']}, "
            f"event back in {ws_ms:.1f} ms",
        )

        # Silence past the keepalive: streams and the WebSocket still open.
        before = [len(st.events) for st in streams]
        time.sleep(idle)
        alive = [not st.ended.is_set() for st in streams]
        ws.send({"op": "publish", "events": [metric("check/after-idle", 0)]})
        arrived = [st.wait_events(b + 1, 2.0) for st, b in zip(streams, before, strict=True)]
        frame = ws.until("events", 5.0)
        report.check(
            all(alive) and (all(arrived) if cluster else any(arrived)) and bool(frame["events"]),
            f"after {idle:.0f} s of silence: SSE streams and WebSocket still deliver",
            f"SSE keepalive comments seen {[st.keepalives for st in streams]}, "
            f"streams open {alive}",
        )
    except (CheckFailedError, OSError, KeyError) as e:
        report.check(False, "WebSocket through the proxy", repr(e))
    finally:
        ws.close()

    if cluster:
        resume_after_kill(port, servers, streams, report, figures)


def resume_after_kill(
    port: int,
    servers: list[ServerProcess],
    streams: list[SSEStream],
    report: Report,
    figures: dict[str, Any],
) -> None:
    """Kill the server of one SSE stream; it resumes through the proxy with no gap."""
    keep = streams[0]
    for st in streams[1:]:
        st.close()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        counts = [sse_clients(s) for s in servers]
        if sorted(counts) == [0] * (len(servers) - 1) + [1]:
            break
        time.sleep(0.05)
    else:
        report.check(False, "find the server of the SSE stream", f"sse clients {counts}")
        return
    victim = servers[counts.index(1)]
    last_seen = keep.ids()[-1]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    ended = keep.ended.wait(WAIT_S)
    missed: list[int] = []
    for k in range(5):
        status, body = post(port, [metric(f"check/gap{k}", k)])
        if status != 200:
            report.check(False, "POST while a server is down", f"{status} {body}")
            return
        missed.append(int(body["first_id"]))
    t0 = time.monotonic()
    again = SSEStream(port, last_event_id=last_seen)
    streams.append(again)
    got_missed = again.wait_events(len(missed))
    resume_ms = (time.monotonic() - t0) * 1000
    live: list[int] = []
    for k in range(3):
        status, body = post(port, [metric(f"check/resumed{k}", k)])
        live.append(int(body["first_id"]))
    again.wait_events(len(missed) + len(live))
    time.sleep(0.2)
    figures["resume_ms"] = resume_ms
    report.check(
        ended and got_missed and again.ids() == missed + live and not again.resets,
        "kill -9 of a stream's server: it resumes through the proxy by Last-Event-ID, "
        "no gap, no duplicate",
        f"last seen {last_seen}, missed {missed}, got {again.ids()}, "
        f"replay done {resume_ms:.0f} ms after reconnecting, resets {again.resets}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--single", action="store_true", help="two servers without Redis")
    parser.add_argument("--proxy", choices=("nginx", "haproxy"), action="append")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of silence to survive")
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="TEXT",
        help="a control run: leave out the config lines containing TEXT (repeatable)",
    )
    args = parser.parse_args()
    plugin_on_path()
    for line in machine_lines():
        print(line)
    if args.drop:
        print(f"CONTROL RUN: the doc's config without the lines containing {args.drop}")
    for tool in ("nginx", "haproxy"):
        found = shutil.which(tool) or f"/usr/sbin/{tool}"
        if Path(found).exists():
            out = subprocess.run([found, "-v"], capture_output=True, check=False)
            print(f"{tool}: {(out.stderr or out.stdout).decode().splitlines()[0]}")
    report = Report()
    results = []
    for kind in args.proxy or ("nginx", "haproxy"):
        try:
            results.append(run_checks(kind, not args.single, args.idle, report, args.drop))
        except CheckFailedError as e:
            report.check(False, f"{kind}: checks could not go on", str(e))
        print()
    for r in results:
        live = r.get("live_ms", [])
        print(
            f"{r['proxy']:<8} {'cluster of 3' if r['cluster'] else '2 single servers'}: "
            f"POST -> SSE median {statistics.median(live) if live else float('nan'):.1f} ms, "
            f"max {max(live, default=float('nan')):.1f} ms"
            + (f", resume after kill {r['resume_ms']:.0f} ms" if "resume_ms" in r else "")
        )
    if report.failed:
        print(f"{len(report.failed)} check(s) failed: {report.failed}")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
