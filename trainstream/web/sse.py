"""
Server-Sent Events: ``GET /events`` streams matching events live, after an
optional replay from ``Last-Event-ID``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from trainstream.hub import Hub
from trainstream.store import Record
from trainstream.store.filter import Filter
from trainstream.subscription import DEFAULT_CLIENT_BUFFER, SharedFormat, Subscription
from trainstream.web.clients import Clients
from trainstream.web.frames import render_sse, sse_notice
from trainstream.web.query import BadQueryError, bad_query, query_filter, resume_id

_log = Logger()

# A slow client needs time to read what is queued before the end; only that
# (bounded) queue is held meanwhile.
OVERFLOW_CLOSE_TIMEOUT = 30.0


@implementer(IPushProducer)
class SSEStream:
    """One open ``text/event-stream`` response: a ``Sink`` and a push producer."""

    def __init__(
        self,
        request: Request,
        hub: Hub,
        clients: Clients,
        clock: IReactorTime,
        keepalive: float,
        buffer_bytes: int = DEFAULT_CLIENT_BUFFER,
        shared: SharedFormat | None = None,
    ) -> None:
        self.request = request
        self.shared = shared if shared is not None else SharedFormat()
        self.hub = hub
        self.clients = clients
        self.clock = clock
        self.buffer_bytes = buffer_bytes
        self.closed = False
        self.subscription: Subscription | None = None
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = clock
        self._keepalive_interval = keepalive

    def start(self, flt: Filter, after: int | None, retry_ms: int) -> None:
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(f"retry: {retry_ms}\n\n".encode())
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)
        self.clients.sse.add(self)
        self._keepalive.start(self._keepalive_interval, now=False)
        self.subscription = self.hub.subscribe(
            self, flt, limit_bytes=self.buffer_bytes, clock=self.clock
        )
        self.subscription.start(after)

    # Sink

    def write(self, records: Sequence[Record], coalesced: Mapping[int, int]) -> None:
        if self.closed:
            return
        self.request.write(self.shared.get(records, coalesced, render_sse))

    def reset(self, reason: str, oldest_id: int) -> None:
        self.request.write(sse_notice("reset", {"reason": reason, "oldest_id": oldest_id}))

    def overflow(self, reason: str, last_id: int) -> None:
        """Too slow: say why after what it has, end the response, close."""
        _log.info("SSE client {peer} too slow: closing", peer=self.request.getClientAddress())
        self.request.write(sse_notice("overflow", {"reason": reason, "last_id": last_id}))
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        self.close(reason)
        if transport is not None and hasattr(transport, "close_within"):
            # It may never read what is queued: reset it if it has not in time.
            transport.close_within(OVERFLOW_CLOSE_TIMEOUT)
        elif transport is not None:
            transport.loseConnection()

    # IPushProducer: the transport says when its buffer is full or drained.

    def pauseProducing(self) -> None:
        if self.subscription is not None:
            self.subscription.pause()

    def resumeProducing(self) -> None:
        if self.subscription is not None and not self.closed:
            self.subscription.resume()

    def stopProducing(self) -> None:
        self._cleanup()

    def close(self, reason: str) -> None:
        """End the response (server stopping, or too slow); the client may resume by id."""
        if self.closed:
            return
        self._cleanup()
        self.request.unregisterProducer()
        self.request.finish()

    def _ping(self) -> None:
        if self.subscription is None or not self.subscription.paused:
            self.request.write(b": keepalive\n\n")

    def _finished(self, result: object) -> None:
        if isinstance(result, Failure):
            _log.debug("SSE client {peer} went away", peer=self.request.getClientAddress())
        self._cleanup()

    def _cleanup(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._keepalive.running:
            self._keepalive.stop()
        if self.subscription is not None:
            self.hub.unsubscribe(self.subscription)
        self.clients.sse.discard(self)


class SSEResource(Resource):
    """``GET /events``."""

    isLeaf = True

    def __init__(
        self,
        hub: Hub,
        clients: Clients,
        clock: IReactorTime,
        keepalive: float,
        retry_ms: int,
        buffer_bytes: int = DEFAULT_CLIENT_BUFFER,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.hub = hub
        self.clients = clients
        self.clock = clock
        self.keepalive = keepalive
        self.retry_ms = retry_ms
        self.buffer_bytes = buffer_bytes
        self.shared = SharedFormat()

    def render_GET(self, request: Request) -> bytes | int:
        try:
            flt = query_filter(request.args or {})
            after = resume_id(request)
        except BadQueryError as e:
            return bad_query(request, e)
        stream = SSEStream(
            request,
            self.hub,
            self.clients,
            self.clock,
            self.keepalive,
            self.buffer_bytes,
            self.shared,
        )
        stream.start(flt, after, self.retry_ms)
        return NOT_DONE_YET
