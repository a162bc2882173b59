"""
The HTTP channel of every listener: twisted.web's ``HTTPChannel`` with
timeouts a slow client cannot stretch, and a ``100 Continue`` that comes only
after the request may go on (PROTOCOL 6).

Twisted's own timeout is an idle timer that every byte resets, so a client
sending one byte a second holds a connection for as long as it likes. Here
each phase of a connection has its own deadline, counted from the phase's
start and never reset by the bytes that arrive:

    head   the request line and headers, from the connection's start (a
           client that sends nothing is a head that never completes) or from
           the first byte after the previous request: ``header_timeout``
    whole  the head and the body: ``request_timeout``, from the same start
    busy   the server answers: no deadline (an SSE stream may run for days,
           an upgraded WebSocket belongs to Autobahn)
    idle   a keep-alive connection between requests: ``idle_timeout``

A head or body late is answered ``408`` (JSON, ``Connection: close``), then
closed; an idle connection is closed without an answer.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from attrs import frozen
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request

_log = Logger()
_DONE = Failure(ConnectionDone())

#: The phases of a connection (``TimedChannel.phase``).
HEAD, BODY, BUSY, IDLE, CLOSED = "head", "body", "busy", "idle", "closed"


@frozen
class Timeouts:
    """
    The deadlines of every connection of a site, in seconds (``Config``'s
    ``header_timeout``, ``request_timeout`` and ``idle_timeout``).

    Set ``site.protocol = timeouts.channel``: the site then builds its
    channels with these deadlines.
    """

    header: float = 10.0
    request: float = 60.0
    idle: float = 60.0

    def channel(self) -> TimedChannel:
        """A channel with these deadlines (a ``Factory.protocol``)."""
        channel = TimedChannel()  # type: ignore[no-untyped-call]
        channel.timeouts = self
        return channel


class TimedChannel(HTTPChannel):
    """
    An ``HTTPChannel`` whose head, whole-request and idle deadlines do not
    move when a byte arrives (see the module), and which checks
    ``site.access`` before it tells a client ``100 Continue``: a refused
    request is answered at once and closed, its body never read.

    :ivar phase: ``HEAD``, ``BODY``, ``BUSY``, ``IDLE`` or ``CLOSED``.
    """

    timeouts = Timeouts()
    phase = HEAD
    _head_call: Any = None
    _request_call: Any = None
    _idle_call: Any = None

    # The connection's phases

    def connectionMade(self) -> None:
        # Twisted's idle timer (every byte resets it) is replaced by ours.
        self.timeOut = None
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._start_request()

    def dataReceived(self, data: bytes) -> None:
        if self.phase == CLOSED:
            return  # a closing connection reads nothing more
        if self.phase == IDLE and data:
            self._start_request()
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        if self.phase == CLOSED:
            return
        if self.phase == IDLE:
            # A pipelined request parsed from what was buffered.
            self._start_request()
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def rawDataReceived(self, data: bytes) -> None:
        if self.phase != CLOSED:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel("_head_call")
        self.phase = BODY
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        if self.phase == CLOSED:
            return  # refused before its body: never handled
        self._cancel_all()
        self.phase = BUSY
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Any) -> None:
        if self.persistent and self.phase == BUSY:
            self.phase = IDLE
            self._idle_call = self._later(self.timeouts.idle, IDLE)
        else:
            self._cancel_all()
            self.phase = CLOSED
        # Replays what was pipelined meanwhile (through dataReceived: a new head).
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header over ``MAX_LENGTH``: 431, not a silent close."""
        self._refuse_unparsed(
            431,
            b"Request Header Fields Too Large",
            f"the request line or a header is over {self.MAX_LENGTH} bytes",
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        A request Twisted cannot parse (its line, a header, the framing):
        a JSON 400 with ``Connection: close``, closed as a timeout is
        (Twisted's own is a bare 400 and our FIN).
        """
        self._refuse_unparsed(
            400, b"Bad Request", "malformed HTTP request: its line, a header or framing"
        )

    def _refuse_unparsed(self, code: int, reason: bytes, message: str) -> None:
        """Answer a request that could not be parsed, read no more, close."""
        self._cancel_all()
        already = self.phase == CLOSED
        self.phase = CLOSED
        transport = self.transport
        if already or transport is None or getattr(transport, "disconnecting", False):
            return
        self.dataReceived = self.lineReceived = lambda *args: None  # type: ignore[method-assign,assignment]
        self._answer(code, reason, message)
        self._close(answered=True)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._cancel_all()
        self.phase = CLOSED
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    # Deadlines

    def _start_request(self) -> None:
        self._cancel_all()
        self.phase = HEAD
        self._head_call = self._later(self.timeouts.header, HEAD)
        self._request_call = self._later(self.timeouts.request, BODY)

    def _later(self, seconds: float, which: str) -> Any:
        # The site's reactor (``HTTPFactory.buildProtocol`` sets ``callLater``).
        return self.callLater(seconds, lambda: self._expired(which))  # type: ignore[no-untyped-call]

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        setattr(self, name, None)
        if call is not None and call.active():
            call.cancel()

    def _cancel_all(self) -> None:
        for name in ("_head_call", "_request_call", "_idle_call"):
            self._cancel(name)

    def _expired(self, which: str) -> None:
        """A deadline passed: answer 408 if a request was coming in, then close."""
        phase = self.phase
        self._cancel_all()
        transport = self.transport
        if phase in (BUSY, CLOSED) or transport is None:
            return  # answering, or no longer ours (an upgraded WebSocket)
        self.phase = CLOSED
        if getattr(transport, "disconnecting", False):
            return  # closing already
        peer = _peer(transport)
        if which == IDLE:
            _log.debug("client {peer} idle for {s} s: closing", peer=peer, s=self.timeouts.idle)
            self._close(answered=False)
            return
        if which == HEAD:
            message = f"request line and headers not received within {self.timeouts.header:g} s"
        else:
            message = f"request not received within {self.timeouts.request:g} s"
        _log.info("client {peer}: {message}: closing", peer=peer, message=message)
        self._answer(408, b"Request Timeout", message)
        self._close(answered=True)

    def _answer(self, code: int, reason: bytes, message: str) -> None:
        """Write a whole JSON error answer straight to the transport (no request needed)."""
        body = json.dumps({"error": message}).encode()
        head = (
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (code, reason, len(body))
        )
        transport: Any = self.transport
        transport.write(head + body)

    def _close(self, answered: bool) -> None:
        """
        Close without reading more. On a listener's tracked connection: a
        client that got an answer with ``Connection: close`` closes first
        (its TIME_WAIT, not ours) or is reset after the listener's grace; any
        other is reset once our data reached it. Elsewhere: close, and abort
        after ``abortTimeout`` a peer that does not go.
        """
        producer: Any = self._networkProducer
        producer.unregisterProducer()
        transport: Any = self.transport
        if hasattr(transport, "reset_when_flushed"):
            if answered:
                transport.peer_closes_first = True
                transport.loseConnection()
            else:
                transport.reset_when_flushed(transport.factory.close_grace)
            return
        transport.loseConnection()
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(  # type: ignore[no-untyped-call]
                self.abortTimeout, self.forceAbortClient
            )

    # 100 Continue

    def _send100Continue(self) -> None:
        """``100 Continue`` only for a request ``site.access`` lets go on."""
        request = self.requests[-1]
        refused = self._refusal(request)
        if refused is None:
            super()._send100Continue()  # type: ignore[no-untyped-call]
            return
        self._refuse(request, refused)

    def _refusal(self, request: Request) -> IResource | None:
        access = getattr(getattr(self, "site", None), "access", None)
        if access is None:
            return None
        _give_target(request, self._command, self._path, self._version)
        refused: IResource | None = access.refuse(request)
        return refused

    def _refuse(self, request: Request, refused: IResource) -> None:
        """Answer ``refused`` now, with ``Connection: close``, and close unread."""
        self._cancel_all()
        self.phase = CLOSED
        self.persistent = False
        body = refused.render(request)
        if not isinstance(body, bytes):  # pragma: no cover - access answers at once
            body = b'{"error": "refused"}'
        request.setHeader(b"connection", b"close")
        request.setHeader(b"content-length", b"%d" % len(body))
        transport: Any = self.transport
        if hasattr(transport, "peer_closes_first"):
            transport.peer_closes_first = True  # it was told Connection: close
        request.write(body)
        request.finish()  # logged; requestDone closes the connection


def _give_target(request: Request, method: bytes, uri: bytes, version: bytes) -> None:
    """
    What ``requestReceived`` gives a request, given before its body so the
    token (``?token=``) and path can be checked: method, URI, path, args.
    """
    request.method, request.uri, request.clientproto = method, uri, version
    path, _, query = uri.partition(b"?")
    request.path = path
    request.args = parse_qs(query, keep_blank_values=True) if query else {}


def _peer(transport: Any) -> str:
    try:
        return str(transport.getPeer())
    except Exception:  # pragma: no cover - a transport without a peer
        return "?"


__all__ = ["BODY", "BUSY", "CLOSED", "HEAD", "IDLE", "TimedChannel", "Timeouts"]
