"""
Benchmark: milliseconds from ``release_stream_server()`` to the three ports
rebound by a plain ``bind`` without SO_REUSEADDR, with clients attached.

Each cycle, as a training script would: ``get_stream_server(config)`` on
fixed loopback ports; attach SSE and WebSocket clients on blocking sockets;
``release_stream_server()``; bind the three ports. One selector thread per
cycle answers each WebSocket close frame at once, as a well-behaved client
does, and drains every stream until EOF or reset.

It prints figures and never fails on speed::

    .venv/bin/python bench/lifecycle.py [--cycles N] [--clients N] [--quick] [--tree]
"""

from __future__ import annotations

import argparse
import base64
import errno
import gc
import hashlib
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, NamedTuple

from _common import machine_lines, source_lines, summary_line, use_tree

HOST = "127.0.0.1"
TIMEOUT = 5.0  # every blocking socket operation
ATTACH_DEADLINE = 10.0  # one client's whole handshake
DRAIN_LIMIT = 15.0  # the reader thread's life after it starts
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ROLES = ("sse", "ws", "rest")
DIAGNOSED_FAILURES = 20  # failures for which we also time how long the port stays busy
SLOW_RELEASE_MS = 1000.0


class ProtocolError(Exception):
    """The server answered something a client did not expect."""


# Sockets and frames


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, found by binding port 0 without SO_REUSEADDR."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def read_until(sock: socket.socket, buffer: bytes, marker: bytes, deadline: float) -> bytes:
    """Receive until ``marker`` is in the buffer; bounded in time and size."""
    while marker not in buffer:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} before the deadline")
        if len(buffer) > 1 << 20:
            raise ProtocolError(f"1 MiB without {marker!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server before {marker!r}")
        buffer += chunk
    return buffer


def parse_frame(buffer: bytes) -> tuple[int, bytes, int] | None:
    """One WebSocket frame from the buffer: (opcode, payload, bytes used), or None if partial."""
    if len(buffer) < 2:
        return None
    opcode = buffer[0] & 0x0F
    masked = bool(buffer[1] & 0x80)
    length = buffer[1] & 0x7F
    pos = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        (length,) = struct.unpack_from("!H", buffer, 2)
        pos = 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        (length,) = struct.unpack_from("!Q", buffer, 2)
        pos = 10
    mask = b""
    if masked:
        if len(buffer) < pos + 4:
            return None
        mask = buffer[pos : pos + 4]
        pos += 4
    if len(buffer) < pos + length:
        return None
    payload = buffer[pos : pos + length]
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + length


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame: clients must mask (RFC 6455 5.3)."""
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# Clients


class Client:
    """One attached client socket, and how its stream ended."""

    kind = "client"

    def __init__(self, sock: socket.socket, buffer: bytes) -> None:
        self.sock = sock
        self.buffer = buffer
        self.end: str | None = None  # "eof", "reset", "error ...", or None: still open
        self.ended_at: float | None = None

    def feed(self, data: bytes) -> None:
        """Bytes received after the handshake."""

    def finish(self, how: str) -> None:
        self.end = how
        self.ended_at = perf_counter()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SSEClient(Client):
    """A raw ``GET /events`` reader."""

    kind = "sse"

    def __init__(self, sock: socket.socket, buffer: bytes) -> None:
        super().__init__(sock, buffer)
        self.tail = buffer[-16:]

    def feed(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-16:]

    @property
    def finished_cleanly(self) -> bool:
        """The chunked response ended with its terminating chunk."""
        return self.tail.endswith(b"0\r\n\r\n")

    @classmethod
    def attach(cls, port: int) -> SSEClient:
        deadline = time.monotonic() + ATTACH_DEADLINE
        sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        try:
            sock.sendall(
                b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
            )
            buffer = read_until(sock, b"", b"retry:", deadline)
            status = buffer.split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1.1 200"):
                raise ProtocolError(f"SSE answer {status!r}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, buffer)


class WSClient(Client):
    """An RFC 6455 client that answers the server's close frame with its own."""

    kind = "ws"
    answer_close = True  # --silent-ws: a client that never answers the close frame

    def __init__(self, sock: socket.socket, buffer: bytes) -> None:
        super().__init__(sock, buffer)
        self.close_code: int | None = None
        self.close_seen_at: float | None = None
        self.answered = False
        self.answer_error: str | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            frame = parse_frame(self.buffer)
            if frame is None:
                return
            opcode, payload, used = frame
            self.buffer = self.buffer[used:]
            if opcode == 0x8 and self.close_seen_at is None:
                self.close_seen_at = perf_counter()
                if len(payload) >= 2:
                    (self.close_code,) = struct.unpack("!H", payload[:2])
                if not self.answer_close:
                    continue
                try:
                    self.sock.sendall(masked_frame(0x8, payload[:2]))
                    self.answered = True
                except OSError as e:
                    self.answer_error = errno.errorcode.get(e.errno or 0, str(e))
            elif opcode == 0x9:  # ping: a polite client pongs
                try:
                    self.sock.sendall(masked_frame(0xA, payload))
                except OSError:
                    pass

    @classmethod
    def attach(cls, port: int) -> WSClient:
        deadline = time.monotonic() + ATTACH_DEADLINE
        key = base64.b64encode(os.urandom(16))
        expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        try:
            sock.sendall(
                b"GET /ws HTTP/1.1\r\n"
                + f"Host: 127.0.0.1:{port}\r\n".encode()
                + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                + b"Sec-WebSocket-Key: "
                + key
                + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            buffer = read_until(sock, b"", b"\r\n\r\n", deadline)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            if not lines[0].startswith(b"HTTP/1.1 101"):
                raise ProtocolError(f"WebSocket upgrade answered {lines[0]!r}")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(b":") for line in lines[1:])
            }
            if headers.get(b"sec-websocket-accept") != expected:
                raise ProtocolError("wrong Sec-WebSocket-Accept")
            while (frame := parse_frame(buffer)) is None:
                buffer = _read_some(sock, buffer, deadline)
            opcode, payload, used = frame
            hello: Any = json.loads(payload) if opcode == 0x1 else None
            if not isinstance(hello, dict) or hello.get("op") != "hello":
                raise ProtocolError(f"first frame opcode {opcode}: {payload[:80]!r}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, buffer[used:])


def _read_some(sock: socket.socket, buffer: bytes, deadline: float) -> bytes:
    """One more ``recv`` into ``buffer``, bounded by the deadline and the socket timeout."""
    if time.monotonic() > deadline:
        raise TimeoutError("no complete frame before the deadline")
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("closed by the server during the handshake")
    return buffer + chunk


class Responder(threading.Thread):
    """
    One selector thread for every client of a cycle: it answers each
    WebSocket close frame at once and drains every stream until EOF or reset.
    """

    def __init__(self, clients: list[Client]) -> None:
        super().__init__(name="bench-responder", daemon=True)
        self.clients = clients
        self.stopping = threading.Event()

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            for each in self.clients:
                if each.buffer and isinstance(each, WSClient):
                    pending, each.buffer = each.buffer, b""
                    each.feed(pending)  # frames that came with the handshake
                selector.register(each.sock, selectors.EVENT_READ, each)
            deadline = time.monotonic() + DRAIN_LIMIT
            open_clients = len(self.clients)
            while open_clients and not self.stopping.is_set() and time.monotonic() < deadline:
                for key, _ in selector.select(0.05):
                    client: Client = key.data
                    try:
                        data = client.sock.recv(65536)
                    except (BlockingIOError, InterruptedError, TimeoutError):
                        continue
                    except ConnectionResetError:
                        client.finish("reset")
                    except OSError as e:
                        client.finish("error " + errno.errorcode.get(e.errno or 0, str(e)))
                    else:
                        if data:
                            client.feed(data)
                            continue
                        client.finish("eof")
                    selector.unregister(client.sock)
                    open_clients -= 1
        finally:
            selector.close()


class GCMonitor:
    """Records every garbage collection's (start, end) to explain outliers."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = perf_counter()
        else:
            self.pauses.append((self._started, perf_counter(), info["generation"]))

    def overlap_ms(self, t0: float, t1: float) -> float:
        """Milliseconds of collection inside [t0, t1]."""
        return 1000.0 * sum(
            max(0.0, min(end, t1) - max(start, t0)) for start, end, _ in self.pauses[-50:]
        )


GC = GCMonitor()


# Cycles


class Outcome(NamedTuple):
    """How one client's stream ended: atoms only, so the collector can ignore it."""

    kind: str
    end: str
    close_code: int | None = None
    close_seen: bool = False
    answered: bool = False
    answer_error: str | None = None
    clean_end: bool = False

    @classmethod
    def of(cls, client: Client) -> Outcome:
        end = client.end or "still open"
        if isinstance(client, WSClient):
            seen = client.close_seen_at is not None
            return cls("ws", end, client.close_code, seen, client.answered, client.answer_error)
        if isinstance(client, SSEClient):
            return cls("sse", end, clean_end=client.finished_cleanly)
        return cls(client.kind, end)


@dataclass
class Cycle:
    """What one get/attach/release/rebind cycle measured."""

    index: int
    release_ms: float | None = None
    total_ms: float | None = None
    failure: str | None = None  # why the cycle counts as failed
    bind_errors: list[str] = field(default_factory=list)
    busy_for_ms: float | None = None  # diagnosis: how long a failed port stayed busy
    gc_ms: float = 0.0  # garbage collection (any thread) during release+rebind
    clients: list[Client] = field(default_factory=list)  # during the cycle only
    outcomes: list[Outcome] = field(default_factory=list)


def rebind(ports: dict[str, int]) -> tuple[list[str], float]:
    """Bind every port without SO_REUSEADDR; the errors and the time all were bound."""
    socks: list[socket.socket] = []
    errors: list[str] = []
    try:
        for role, port in ports.items():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            try:
                s.bind((HOST, port))
                s.listen(1)
            except OSError as e:
                errors.append(f"{role}:{port} {errno.errorcode.get(e.errno or 0, str(e))}")
        done = perf_counter()
    finally:
        for s in socks:
            s.close()
    return errors, done


def time_until_free(ports: dict[str, int], limit_s: float = 3.0) -> float | None:
    """Diagnosis after a failed rebind: ms until every port binds again, or None."""
    start = perf_counter()
    while perf_counter() - start < limit_s:
        errors, done = rebind(ports)
        if not errors:
            return (done - start) * 1000.0
        time.sleep(0.001)
    return None


def run_cycle(
    index: int, trainstream: Any, config: dict[str, Any], ports: dict[str, int], n_clients: int
) -> Cycle:
    """get, attach, release, rebind; never raises for a server-side problem."""
    cycle = Cycle(index)
    try:
        trainstream.get_stream_server(config)
    except Exception as e:
        cycle.failure = f"get_stream_server: {e!r}"
        return cycle
    held = True
    responder: Responder | None = None
    try:
        n_sse = n_clients // 2
        try:
            for _ in range(n_sse):
                cycle.clients.append(SSEClient.attach(ports["sse"]))
            for _ in range(n_clients - n_sse):
                cycle.clients.append(WSClient.attach(ports["ws"]))
        except (OSError, ProtocolError, ValueError) as e:
            cycle.failure = f"attach: {e!r}"
            return cycle
        responder = Responder(cycle.clients)
        responder.start()
        t0 = perf_counter()
        try:
            trainstream.release_stream_server()
        except Exception as e:
            held = False  # whatever happened, do not release twice
            cycle.failure = f"release_stream_server: {e!r}"
            return cycle
        held = False
        t_released = perf_counter()
        errors, t1 = rebind(ports)
        cycle.release_ms = (t_released - t0) * 1000.0
        cycle.total_ms = (t1 - t0) * 1000.0
        cycle.gc_ms = GC.overlap_ms(t0, t1)
        if errors:
            cycle.bind_errors = errors
            cycle.failure = "rebind: " + ", ".join(errors)
        responder.join(timeout=DRAIN_LIMIT)
        return cycle
    finally:
        if responder is not None:
            responder.stopping.set()
            responder.join(timeout=1.0)
        if held:
            try:
                trainstream.release_stream_server()
            except Exception as e:
                cycle.failure = (cycle.failure or "") + f"; cleanup release: {e!r}"
        for client in cycle.clients:
            client.close()
        # Keep only atoms: a heap of client objects would lengthen our own GC pauses.
        cycle.outcomes = [Outcome.of(client) for client in cycle.clients]
        cycle.clients = []


# Report


def report(cycles: list[Cycle], wanted: int, n_clients: int, interrupted: bool) -> None:
    """The final figures, whatever happened."""
    measured = [c for c in cycles if c.release_ms is not None]
    failed = [c for c in cycles if c.failure]
    kinds = Counter((c.failure or "").split(":", 1)[0] for c in failed)
    errnos = Counter(e.rsplit(" ", 1)[-1] for c in failed for e in c.bind_errors)
    n_sse = n_clients // 2
    print()
    print(f"cycles:    {len(cycles)} of {wanted} run" + (" (interrupted)" if interrupted else ""))
    print(f"clients:   {n_clients} per cycle ({n_sse} SSE + {n_clients - n_sse} WebSocket)")
    print(
        f"failures:  {len(failed)}"
        + (f"  by kind {dict(kinds)}" if kinds else "")
        + (f"  bind errnos {dict(errnos)}" if errnos else "")
    )
    print("milliseconds from release_stream_server() start:")
    print(summary_line("release only", [c.release_ms for c in measured if c.release_ms]))
    print(summary_line("release+rebind", [c.total_ms for c in measured if c.total_ms]))
    with_gc = [c for c in measured if c.gc_ms >= 0.05]
    print(
        f"garbage collection ran during {len(with_gc)} measured cycles "
        f"(full collections in the run: {sum(1 for p in GC.pauses if p[2] == 2)})"
    )
    slow = [c for c in measured if (c.release_ms or 0) >= SLOW_RELEASE_MS]
    print(f"releases >= {SLOW_RELEASE_MS:.0f} ms: {len(slow)}")

    outcomes = [o for c in measured for o in c.outcomes]
    ws = [o for o in outcomes if o.kind == "ws"]
    sse = [o for o in outcomes if o.kind == "sse"]
    codes = Counter(o.close_code for o in ws if o.close_seen)
    print(
        f"WebSocket: {len(ws)} clients; close frame seen by {sum(o.close_seen for o in ws)} "
        f"(codes {dict(codes)}), answered by {sum(o.answered for o in ws)}; "
        f"ends {dict(Counter(o.end for o in ws))}"
    )
    answer_errors = Counter(o.answer_error for o in ws if o.answer_error)
    if answer_errors:
        print(f"           close answer failed: {dict(answer_errors)}")
    print(
        f"SSE:       {len(sse)} clients; terminating chunk seen by "
        f"{sum(o.clean_end for o in sse)}; ends {dict(Counter(o.end for o in sse))}"
    )
    if measured:
        print("slowest cycles (release+rebind):")
        for c in sorted(measured, key=lambda c: c.total_ms or 0.0, reverse=True)[:5]:
            print(
                f"  #{c.index:<5} release {c.release_ms:8.2f} ms  total {c.total_ms:8.2f} ms"
                + (f"  (GC {c.gc_ms:.1f} ms during it)" if c.gc_ms >= 0.05 else "")
                + (f"  {c.failure}" if c.failure else "")
            )
    if failed:
        print("first failures:")
        for c in failed[:10]:
            busy = (
                ""
                if not c.bind_errors
                else (
                    f" (ports free again after {c.busy_for_ms:.1f} ms)"
                    if c.busy_for_ms is not None
                    else " (still busy after 3 s, or not diagnosed)"
                )
            )
            print(f"  #{c.index}: {c.failure}{busy}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000, help="cycles to run (default 1000)")
    parser.add_argument("--clients", type=int, default=10, help="clients per cycle (default 10)")
    parser.add_argument("--quick", action="store_true", help="a 50-cycle smoke run")
    parser.add_argument(
        "--tree", action="store_true", help="import trainstream from the working tree"
    )
    parser.add_argument(
        "--silent-ws",
        action="store_true",
        help="control run: WebSocket clients never answer the close frame",
    )
    args = parser.parse_args(argv)
    WSClient.answer_close = not args.silent_ws
    cycles_wanted = 50 if args.quick else max(1, args.cycles)
    n_clients = max(0, args.clients)

    if args.tree:
        use_tree()
    import trainstream

    ports = dict(zip(ROLES, free_ports(len(ROLES)), strict=True))
    config: dict[str, Any] = {
        role: f"tcp:{port}:interface={HOST}" for role, port in ports.items()
    } | {"memory": True}

    print("trainstream lifecycle benchmark: release_stream_server() -> ports rebound")
    for line in [*machine_lines(), *source_lines(trainstream.__file__)]:
        print(line)
    print(f"version:   {trainstream.__version__}")
    print(f"ports:     {ports} on {HOST}, fixed for every cycle")
    if args.silent_ws:
        print("control:   WebSocket clients do NOT answer the close frame (--silent-ws)")
    sys.stdout.flush()

    gc.callbacks.append(GC)
    cycles: list[Cycle] = []
    interrupted = False
    diagnosed = 0
    started = perf_counter()
    try:
        for i in range(cycles_wanted):
            cycle = run_cycle(i, trainstream, config, ports, n_clients)
            if cycle.bind_errors and diagnosed < DIAGNOSED_FAILURES:
                diagnosed += 1
                cycle.busy_for_ms = time_until_free(ports)
            cycles.append(cycle)
            if (i + 1) % max(1, cycles_wanted // 10) == 0:
                fails = sum(1 for c in cycles if c.failure)
                print(
                    f"  {i + 1}/{cycles_wanted} cycles, {fails} failures, "
                    f"{perf_counter() - started:.1f} s",
                    flush=True,
                )
    except KeyboardInterrupt:
        interrupted = True
    report(cycles, cycles_wanted, n_clients, interrupted)
    manager = trainstream.get_stream_server_manager()
    print(
        f"after the run: refcount={manager.refcount}, "
        f"server running={manager.is_server_running()}, wall {perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
