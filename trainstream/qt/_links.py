"""
The monitor's three connections to a server, all on Qt's own networking in
the GUI thread's event loop (nothing here blocks, nothing needs a reactor):

- :class:`RestLink` polls ``GET /api/health`` (``QNetworkAccessManager``);
- :class:`SSELink` reads ``GET /events`` as it arrives (``readyRead``),
  parsed by the project's one parser, and resumes by id;
- :class:`WSLink` keeps a ``QWebSocket`` open on ``/ws`` and pings it.

Each has a :class:`LinkStatus`: ``connecting`` (the first attempt),
``connected``, ``down`` (the last attempt failed or the connection was
lost; the next one is due at ``retry_at``) and ``reconnecting`` (a later
attempt under way). Waits between attempts follow the project's one retry
policy (:class:`~trainstream.client.backoff.Backoff`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define
from PySide6.QtCore import QByteArray, QObject, QTimer, QUrl, Signal
from PySide6.QtNetwork import QNetworkAccessManager, QNetworkReply, QNetworkRequest

from trainstream.client.backoff import Backoff
from trainstream.client.sse import BACKOFF_INITIAL, SSEParser

try:
    from PySide6.QtWebSockets import QWebSocket
except ImportError:  # PySide6-Essentials alone: no WebSocket link, said in its status
    QWebSocket = None  # type: ignore[assignment,misc]

__all__ = ["Http", "LinkStatus", "RestLink", "SSELink", "WSLink"]

#: The longest wait between two attempts (seconds): a desktop app wants its
#: monitor back soon after the server is.
BACKOFF_MAX = 5.0
#: Seconds between two health polls.
POLL_S = 1.0
#: A REST answer that takes longer is a failure (ms).
REQUEST_TIMEOUT_MS = 5000
#: No byte on the stream for this long (the server's keepalive comes every
#: 15 s): it is dead, reconnect (ms).
STREAM_TIMEOUT_MS = 45_000
#: The stream is read in slices of this many bytes, one per turn of the
#: event loop, and Qt holds at most a few of them: a fast stream never
#: stalls the GUI, and a slow GUI is a slow reader the server coalesces for.
SLICE = 64 * 1024
#: Seconds between WebSocket pings; no message for 4 of them: reconnect.
PING_S = 5.0


@define
class LinkStatus:
    """What the monitor shows of one transport."""

    state: str = "connecting"  # connecting | connected | down | reconnecting
    detail: str = ""
    url: str = ""
    clients: int | None = None
    last_at: float | None = None  # time.monotonic() of the last byte or message
    retry_at: float | None = None  # time.monotonic() of the next attempt, while down
    connections: int = 0  # how many times it connected


class Http(QObject):
    """
    One-shot GETs of JSON, with the token, answered in the event loop. The
    answers come to this object's slot: once it is gone (its widget
    deleted), no callback runs any more.
    """

    def __init__(self, token: Callable[[], str | None], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.nam = QNetworkAccessManager(self)
        self.token = token
        self._pending: dict[QNetworkReply, Callable[[int | None, Any, str], None]] = {}

    def request(self, url: str, timeout_ms: int = REQUEST_TIMEOUT_MS) -> QNetworkRequest:
        request = QNetworkRequest(QUrl(url))
        request.setTransferTimeout(timeout_ms)
        request.setRawHeader(QByteArray(b"Accept"), QByteArray(b"application/json"))
        token = self.token()
        if token:
            request.setRawHeader(
                QByteArray(b"Authorization"), QByteArray(f"Bearer {token}".encode())
            )
        return request

    def get_json(self, url: str, done: Callable[[int | None, Any, str], None]) -> QNetworkReply:
        """
        ``done(status, body, error)``: the HTTP status (``None`` when no
        answer came), the decoded JSON (``None`` if none) and why it failed.
        """
        reply = self.nam.get(self.request(url))
        self._pending[reply] = done
        reply.finished.connect(self._finished)
        return reply

    def _finished(self) -> None:
        reply = self.sender()
        if not isinstance(reply, QNetworkReply):
            return
        done = self._pending.pop(reply, None)
        status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
        data = bytes(reply.readAll().data())
        error = ""
        if reply.error() != QNetworkReply.NetworkError.NoError and status is None:
            error = reply.errorString()
        reply.deleteLater()
        try:
            body = json.loads(data) if data else None
        except ValueError:
            body = None
        if isinstance(status, int) and status >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            error = f"HTTP {status}" + (f": {message}" if message else "")
        if done is not None:
            done(status if isinstance(status, int) else None, body, error)


class _Link(QObject):
    """A transport's state, and the timer of its next attempt."""

    changed = Signal(str)

    def __init__(self, role: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.role = role
        self.status = LinkStatus()
        self.backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        self.stopped = True
        self._retry = QTimer(self)
        self._retry.setSingleShot(True)
        self._retry.timeout.connect(self._attempt)

    def start(self) -> None:
        self.stopped = False
        self._attempt()

    def stop(self) -> None:
        self.stopped = True
        self._retry.stop()

    def set_state(self, state: str, detail: str | None = None) -> None:
        status = self.status
        changed = state != status.state or (detail is not None and detail != status.detail)
        status.state = state
        if detail is not None:
            status.detail = detail
        if state != "down":
            status.retry_at = None
        if changed:
            self.changed.emit(self.role)

    def connected(self, detail: str = "") -> None:
        self.backoff.reset()
        self.status.connections += 1
        self.seen()
        self.set_state("connected", detail)

    def seen(self) -> None:
        self.status.last_at = time.monotonic()

    def attempting(self) -> None:
        self.set_state("connecting" if self.status.state == "connecting" else "reconnecting")

    def fail(self, detail: str, first: float | None = None, delay: float | None = None) -> None:
        """Down: try again after the backoff's next delay (or ``delay``)."""
        if self.stopped:
            return
        if delay is None:
            delay = self.backoff.next(first)
        self.status.retry_at = time.monotonic() + delay
        self.set_state("down", detail)
        self._retry.start(int(delay * 1000))

    def _attempt(self) -> None:
        raise NotImplementedError


class RestLink(_Link):
    """Polls health; says what it answered (``health``) and when it failed."""

    health = Signal(object)

    def __init__(self, http: Http, url: Callable[[], str | None], parent: QObject | None = None):
        super().__init__("rest", parent)
        self.http = http
        self.url = url
        self.last: dict[str, Any] | None = None
        self._reply: QNetworkReply | None = None

    def stop(self) -> None:
        super().stop()
        reply, self._reply = self._reply, None
        if reply is not None:
            reply.abort()

    def _attempt(self) -> None:
        if self.stopped or self._reply is not None:
            return
        url = self.url()
        if url is None:
            self.fail("no server is running in this process")
            return
        self.status.url = url
        if self.status.state != "connected":
            self.attempting()
        self._reply = self.http.get_json(url + "/health", self._answered)

    def _answered(self, status: int | None, body: Any, error: str) -> None:
        self._reply = None
        if self.stopped:
            return
        if status in (200, 503) and isinstance(body, dict):
            self.last = body
            detail = (
                ""
                if body.get("status") == "ok"
                else ("degraded: " + "; ".join(str(r) for r in body.get("reasons") or ()))
            )
            rest = (body.get("listeners") or {}).get("rest") or (body.get("listeners") or {}).get(
                "listen"
            )
            if isinstance(rest, dict) and isinstance(rest.get("connections"), int):
                self.status.clients = rest["connections"]
            if self.status.state != "connected":
                self.connected(detail)
            else:
                self.seen()
                self.set_state("connected", detail)
            self.health.emit(body)
            self._retry.start(int(POLL_S * 1000))
        else:
            self.fail(error or f"unexpected answer (HTTP {status}) from {self.status.url}/health")


class SSELink(_Link):
    """
    The event stream. Before each connection it reads health, so a new
    history (another ``epoch``) is noticed before resuming by id
    (``on_epoch(health)``: the owner may reset its position); then it sends
    ``Last-Event-ID: position()`` and hands out each event (``on_event``)
    and ``reset`` notice (``on_reset(reason, oldest_id)``).
    """

    def __init__(
        self,
        http: Http,
        url: Callable[[], tuple[str, str] | None],
        position: Callable[[], int | None],
        on_epoch: Callable[[dict[str, Any]], None],
        on_event: Callable[[dict[str, Any]], object],
        on_reset: Callable[[str, int | None], None],
        parent: QObject | None = None,
    ) -> None:
        super().__init__("sse", parent)
        self.http = http
        self.url = url
        self.position = position
        # Plain calls, not Qt signals: one per event, and cheaper so.
        self.on_epoch = on_epoch
        self.on_event = on_event
        self.on_reset = on_reset
        self.retry_s: float | None = None
        self._reply: QNetworkReply | None = None
        self._health: QNetworkReply | None = None
        self._parser = SSEParser()
        self._live = False
        self._overflow = False
        self._stream = ""

    def stop(self) -> None:
        super().stop()
        for reply in (self._reply, self._health):
            if reply is not None:
                reply.abort()
        self._reply = self._health = None

    def _attempt(self) -> None:
        if self.stopped or self._reply is not None or self._health is not None:
            return
        urls = self.url()
        if urls is None:
            self.fail("no server is running in this process")
            return
        api, stream = urls
        self.status.url = stream
        self.attempting()
        self._stream = stream
        self._health = self.http.get_json(api + "/health", self._health_answered)

    def _health_answered(self, status: int | None, body: Any, error: str) -> None:
        self._health = None
        stream = self._stream
        if self.stopped:
            return
        if status not in (200, 503) or not isinstance(body, dict):
            self.fail(error or f"no health from the server (HTTP {status})", self.retry_s)
            return
        self.on_epoch(body)
        request = self.http.request(stream, STREAM_TIMEOUT_MS)
        request.setRawHeader(QByteArray(b"Accept"), QByteArray(b"text/event-stream"))
        request.setRawHeader(QByteArray(b"Cache-Control"), QByteArray(b"no-cache"))
        after = self.position()
        if after is not None:
            request.setRawHeader(QByteArray(b"Last-Event-ID"), QByteArray(str(after).encode()))
        self._parser = SSEParser()
        self._live = self._overflow = False
        reply = self._reply = self.http.nam.get(request)
        reply.setReadBufferSize(4 * SLICE)
        reply.readyRead.connect(self._read)
        reply.finished.connect(self._finished)

    def _read(self) -> None:
        reply = self.sender()
        if isinstance(reply, QNetworkReply):
            self._read_slice(reply)

    def _read_slice(self, reply: QNetworkReply) -> None:
        if reply is not self._reply or not reply.isOpen():
            return
        if not self._live:
            status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
            ctype = str(reply.header(QNetworkRequest.KnownHeaders.ContentTypeHeader) or "")
            if status != 200 or not ctype.startswith("text/event-stream"):
                return  # said by _finished, from the whole answer
            self._live = True
            self.connected()
        data = bytes(reply.read(SLICE).data())
        if reply.bytesAvailable() > 0:  # the rest on the next turn: readyRead will not say
            QTimer.singleShot(0, self, lambda: self._read_slice(reply))
        self.seen()
        for message in self._parser.feed_bytes(data):
            if message.event == "overflow":
                self._overflow = True
                reply.abort()
                return
            try:
                data_obj = json.loads(message.data)
            except ValueError:
                continue
            if message.event == "reset":
                if isinstance(data_obj, dict):
                    oldest = data_obj.get("oldest_id")
                    self.on_reset(
                        str(data_obj.get("reason", "")), oldest if isinstance(oldest, int) else None
                    )
            elif isinstance(data_obj, dict):
                self.on_event(data_obj)
        if self._parser.retry_ms is not None:
            self.retry_s = min(BACKOFF_MAX, max(0.05, self._parser.retry_ms / 1000))

    def _finished(self) -> None:
        reply = self.sender()
        if not isinstance(reply, QNetworkReply):
            return
        if reply is not self._reply:
            reply.deleteLater()
            return
        while self._live and not self._overflow and reply.isOpen() and reply.bytesAvailable():
            self._read_slice(reply)  # what came before the end is not lost
        self._reply = None
        status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
        live = self._live
        body = b"" if live else bytes(reply.readAll().data())
        error = reply.errorString() if reply.error() != QNetworkReply.NetworkError.NoError else ""
        reply.deleteLater()
        if self.stopped:
            return
        if self._overflow:
            self.fail("the server closed the stream (too slow); resuming", delay=0.0)
        elif live:
            self.backoff.reset()
            self.fail("the stream ended" + (f" ({error})" if error else ""), self.retry_s)
        elif status is not None:
            self.fail(_error_text(status, body), self.retry_s)
        else:
            self.fail(error or "no answer", self.retry_s)


class WSLink(_Link):
    """
    A WebSocket on ``/ws``, subscribed to the runs' status events (what
    the monitor needs of it is whether it works: hello, pongs, events).
    """

    message = Signal(object)

    def __init__(
        self,
        url: Callable[[], str | None],
        token: Callable[[], str | None],
        runs: list[str],
        parent: QObject | None = None,
    ) -> None:
        super().__init__("ws", parent)
        self.url = url
        self.token = token
        self.runs = runs
        self.received = 0
        self._socket: Any = None
        self._failed = False
        self._ping = QTimer(self)
        self._ping.timeout.connect(self._send_ping)

    def stop(self) -> None:
        super().stop()
        self._ping.stop()
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.abort()
            sock.deleteLater()

    def _attempt(self) -> None:
        if self.stopped or self._socket is not None:
            return
        if QWebSocket is None:
            self.status.retry_at = None
            self.set_state("down", "not checked: no QtWebSockets (pip install PySide6-Addons)")
            return
        url = self.url()
        if url is None:
            self.fail("no server is running in this process")
            return
        self.status.url = url
        self.attempting()
        sock = self._socket = QWebSocket("", parent=self)
        self._failed = False
        sock.connected.connect(self._connected)
        sock.disconnected.connect(self._disconnected)
        sock.errorOccurred.connect(self._error)
        sock.textMessageReceived.connect(self._received)
        request = QNetworkRequest(QUrl(url))
        token = self.token()
        if token:
            request.setRawHeader(
                QByteArray(b"Authorization"), QByteArray(f"Bearer {token}".encode())
            )
        sock.open(request)

    def _connected(self) -> None:
        sock = self.sender()
        if sock is not self._socket:
            return
        self.connected()
        sock.sendTextMessage(
            json.dumps({"op": "subscribe", "runs": self.runs, "types": ["status", "alert"]})
        )
        self._ping.start(int(PING_S * 1000))

    def _received(self, text: str) -> None:
        if self.sender() is not self._socket:
            return
        self.seen()
        self.received += 1
        try:
            message = json.loads(text)
        except ValueError:
            return
        if isinstance(message, dict):
            if message.get("op") == "hello":
                self.set_state("connected", f"server {message.get('version', '?')}")
            elif message.get("op") == "error":
                self.set_state("connected", f"server said: {message.get('error')}")
            self.message.emit(message)

    def _send_ping(self) -> None:
        sock = self._socket
        if sock is None:
            return
        last = self.status.last_at
        if last is not None and time.monotonic() - last > 4 * PING_S:
            sock.abort()  # no answer for four pings: the connection is dead
            return
        sock.sendTextMessage(json.dumps({"op": "ping", "nonce": str(self.received)}))

    def _error(self, _error: object) -> None:
        sock = self.sender()
        if sock is self._socket:
            self._lost(sock, sock.errorString())

    def _disconnected(self) -> None:
        self._lost(self.sender())

    def _lost(self, sock: Any, error: str = "") -> None:
        if sock is not self._socket or self._failed:
            return
        self._failed = True
        self._ping.stop()
        self._socket = None
        close_code = sock.closeCode()
        code = int(getattr(close_code, "value", close_code))
        reason = str(sock.closeReason())
        sock.abort()
        sock.deleteLater()
        if self.status.state == "connected":
            self.backoff.reset()
            why = f"closed ({code}{': ' + reason if reason else ''})"
        else:
            why = error or (f"refused ({code}: {reason})" if reason else "could not connect")
        self.fail(why)


def _error_text(status: int, body: bytes) -> str:
    try:
        data: Mapping[str, Any] | Any = json.loads(body)
    except ValueError:
        data = None
    message = data.get("error") if isinstance(data, dict) else None
    text = f"HTTP {status}" + (f": {message}" if message else "")
    if status == 401:
        text += " (give StreamMonitor a token)"
    return text
