"""
Server-Sent Events: the project's one parser of ``text/event-stream``
(:class:`SSEParser`, used by the clients and by the tests), and the
resuming client of ``/events`` (:class:`SSEClient`).

The client is blocking (``http.client``, no reactor). It remembers the last
event id, reconnects with backoff (the server's ``retry:``) and
``Last-Event-ID`` after any disconnect, an ``overflow`` or a server
restart, and never hands out an event twice (ids strictly increase within
one history). A ``reset`` (the server no longer holds what came after our
id, or its history changed: a new ``epoch`` in ``/api/health``) is handed
out as a :class:`Reset`, after which ids follow the server's new history.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from trainstream.client.backoff import Backoff
from trainstream.client.clock import Pause, WallClock
from trainstream.client.http import (
    CONNECT_TIMEOUT,
    HTTP,
    TOKEN_ENV,
    ClientError,
    Connect,
    Endpoint,
    connect,
    decode,
    describe,
    error_text,
    headers,
)

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "READ_TIMEOUT",
    "ConnState",
    "Event",
    "Reset",
    "SSEClient",
    "SSEMessage",
    "SSEParser",
]

#: First reconnect delay when the server sent no ``retry:``; doubles per failure.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
#: No byte for this long (the server sends a keepalive every 15 s): reconnect.
READ_TIMEOUT = 45.0


# The parser


@dataclass(frozen=True)
class SSEMessage:
    event: str
    data: str
    id: str | None


class SSEParser:
    """
    The line protocol of ``text/event-stream`` (WHATWG), fed one line at a
    time (:meth:`feed`) or any piece of the stream (:meth:`feed_bytes`).
    Lines end with ``\\n`` or ``\\r\\n``.
    """

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0
        self._event = ""
        self._data: list[str] = []
        self._rest = b""

    def feed(self, line: str) -> SSEMessage | None:
        """A line without its end of line; returns a message at a blank line."""
        if line == "":
            if not self._data:
                self._event = ""
                return None
            message = SSEMessage(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return message
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def feed_bytes(self, data: bytes) -> list[SSEMessage]:
        """The messages completed by ``data``; a line cut short waits for the rest."""
        *lines, self._rest = (self._rest + data).split(b"\n")
        messages = []
        for raw in lines:
            message = self.feed(raw.removesuffix(b"\r").decode("utf-8", "replace"))
            if message is not None:
                messages.append(message)
        return messages


# The resuming client


@dataclass(frozen=True)
class Event:
    id: int
    data: dict[str, Any]


@dataclass(frozen=True)
class Reset:
    """Events after our id are gone, or the server's history is another one."""

    reason: str
    oldest_id: int | None

    def to_json(self) -> dict[str, Any]:
        return {"type": "reset", "reason": self.reason, "oldest_id": self.oldest_id}


@dataclass(frozen=True)
class ConnState:
    status: str  # connecting | connected | reconnecting | stopped
    detail: str = ""
    retry_at: float | None = None  # the clock's seconds() at the next attempt
    last_id: int | None = None


class SSEClient:
    """
    A resuming stream of events: iterate :meth:`items` for :class:`Event`
    and :class:`Reset` objects, forever (until :meth:`close`, from any thread).

    :param after: resume after this id (``None``: live events only).
    :param on_state: called (in the iterating thread) at each change of
        connection state.
    :param connect: opens a connection (:data:`~trainstream.client.http.Connect`):
        tests give a fake that answers from a script.
    :param clock: what the waits between attempts use
        (:class:`~trainstream.client.clock.Pause`): real time by default; a
        test gives a ``twisted.internet.task.Clock``, so a wait only moves it.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        token: str | None = None,
        runs: Sequence[str] = (),
        names: Sequence[str] = (),
        types: Sequence[str] = (),
        after: int | None = None,
        on_state: Callable[[ConnState], None] | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        read_timeout: float = READ_TIMEOUT,
        *,
        connect: Connect = connect,
        clock: Pause | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.token = token
        self.connect = connect
        self.http = HTTP(endpoint, token, connect=connect)
        self.runs, self.names, self.types = tuple(runs), tuple(names), tuple(types)
        self.last_id = after
        self.epoch: object = None
        #: The server's ``retry:`` (seconds), the first delay after a failure.
        self.retry_s: float | None = None
        self.backoff = Backoff(backoff_initial, backoff_max)
        self.read_timeout = read_timeout
        self.on_state = on_state
        self.state = ConnState("connecting", last_id=after)
        self.connections = 0
        self._closed = threading.Event()
        self.clock: Pause = WallClock(self._closed) if clock is None else clock
        self._sock: socket.socket | None = None

    # Control

    def close(self) -> None:
        """From any thread: stop iterating as soon as possible."""
        self._closed.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _set_state(self, status: str, detail: str = "", retry_at: float | None = None) -> None:
        self.state = ConnState(status, detail, retry_at, self.last_id)
        if self.on_state is not None:
            self.on_state(self.state)

    def _path(self) -> str:
        query: list[tuple[str, str]] = [("run", r) for r in self.runs]
        query += [("name", n) for n in self.names]
        if self.types:
            query.append(("type", ",".join(self.types)))
        path = self.endpoint.prefix + "/events"
        return path + ("?" + urlencode(query) if query else "")

    # The stream

    def items(self) -> Iterator[Event | Reset]:
        while not self.closed:
            delay: float | None = None
            try:
                reset = self._check_epoch()
                if reset is not None:
                    yield reset
                ended = yield from self._one_connection()
                self.backoff.reset()
                if ended == "overflow":
                    delay = 0.0
                    why = "server closed the stream (too slow); resuming"
                else:
                    why = "server ended the stream"
            except ClientError:
                self._set_state("stopped")
                raise
            except (OSError, http.client.HTTPException, ValueError) as e:
                why = describe(e)
            if self.closed:
                break
            if delay is None:
                delay = self.backoff.next(self.retry_s)
            self._set_state("reconnecting", why, self.clock.seconds() + delay)
            if delay:
                self.clock.advance(delay)
        self._set_state("stopped")

    def _check_epoch(self) -> Reset | None:
        """A new ``epoch`` in health: ids restarted, resume from the start."""
        status, body = self.http.get_json("/api/health")
        if status != 200 or not isinstance(body, dict) or "epoch" not in body:
            return None
        epoch = body["epoch"]
        if self.epoch is None:
            self.epoch = epoch
            return None
        if epoch == self.epoch:
            return None
        self.epoch = epoch
        self.last_id = 0
        return Reset("the server's history changed (new epoch): its ids started again", None)

    def _one_connection(self) -> Generator[Event | Reset, None, str]:
        """Events of one response; returns how it ended (``"eof"``/``"overflow"``)."""
        self._set_state("connecting")
        extra = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_id is not None:
            extra["Last-Event-ID"] = str(self.last_id)
        conn = self.connect(self.endpoint, CONNECT_TIMEOUT)
        try:
            conn.request("GET", self._path(), headers=headers(self.token, **extra))
            response = conn.getresponse()
            if response.status != 200:
                text = error_text(response.status, decode(response.read()))
                if response.status == 401:
                    raise ClientError(text + " (--token or $" + TOKEN_ENV + ")")
                if 400 <= response.status < 500:
                    raise ClientError(text)
                raise http.client.HTTPException(text)
            ctype = response.getheader("content-type") or ""
            if not ctype.startswith("text/event-stream"):
                raise ClientError(f"{self.endpoint.base}/events is not an event stream ({ctype})")
            self._sock = conn.sock
            if conn.sock is not None:
                conn.sock.settimeout(self.read_timeout)
            self.connections += 1
            self._set_state("connected")
            parser = SSEParser()
            while not self.closed:
                raw_line = response.readline()
                if not raw_line:
                    return "eof"
                for message in parser.feed_bytes(raw_line):
                    if message.event == "overflow":
                        return "overflow"
                    if message.event == "reset":
                        info = json.loads(message.data)
                        oldest = info.get("oldest_id")
                        self.last_id = oldest - 1 if isinstance(oldest, int) else None
                        yield Reset(str(info.get("reason", "")), oldest)
                        continue
                    item = self._event(message)
                    if item is not None:
                        yield item
                if parser.retry_ms is not None:
                    self.retry_s = min(self.backoff.maximum, max(0.05, parser.retry_ms / 1000))
            return "closed"
        finally:
            self._sock = None
            conn.close()

    def _event(self, message: SSEMessage) -> Event | None:
        data = json.loads(message.data)
        if not isinstance(data, dict):
            return None
        raw_id: Any = data.get("id", message.id)
        try:
            event_id = int(raw_id)
        except (TypeError, ValueError):
            return None
        if self.last_id is not None and event_id <= self.last_id:
            return None  # already handed out: never twice
        self.last_id = event_id
        return Event(event_id, data)
