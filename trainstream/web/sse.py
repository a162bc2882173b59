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

from trainstream.events import EVENT_TYPES, encode_json
from trainstream.hub import DEFAULT_CLIENT_BUFFER, Filter, Hub, SharedFormat, Subscription
from trainstream.store import Record
from trainstream.web.clients import Clients

_log = Logger()


class BadQueryError(ValueError):
    """A query parameter a client got wrong; answered with 400."""


def _values(args: dict[bytes, list[bytes]], key: bytes) -> tuple[str, ...]:
    out: list[str] = []
    for raw in args.get(key, []):
        for part in raw.decode("utf-8", "replace").split(","):
            if part.strip():
                out.append(part.strip())
    return tuple(out)


def filter_from_lists(
    runs: Sequence[str] = (), names: Sequence[str] = (), types: Sequence[str] = ()
) -> Filter:
    """The one way SSE and WebSocket turn client input into a ``Filter``."""
    for kind, values in (("runs", runs), ("names", names), ("types", types)):
        if isinstance(values, str | bytes) or not all(isinstance(v, str) for v in values):
            raise BadQueryError(f"{kind!r} must be a list of strings")
    unknown = [t for t in types if t != "*" and t not in EVENT_TYPES]
    if unknown:
        raise BadQueryError(
            f"unknown event type {unknown[0]!r}; types are {', '.join(sorted(EVENT_TYPES))}"
        )
    return Filter(runs=tuple(runs), names=tuple(names), types=tuple(types))


def parse_event_id(raw: str, what: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadQueryError(f"{what} must be an integer event id, got {raw!r}") from None
    if value < 0:
        raise BadQueryError(f"{what} must be >= 0, got {value}")
    return value


def query_filter(request: Request) -> tuple[Filter, int | None]:
    """The filter and resume id of an SSE request."""
    args = request.args or {}
    flt = filter_from_lists(
        runs=_values(args, b"run"), names=_values(args, b"name"), types=_values(args, b"type")
    )
    header = request.getHeader(b"last-event-id")
    if header:
        return flt, parse_event_id(header.decode("ascii", "replace").strip(), "Last-Event-ID")
    param = args.get(b"last_event_id")
    if param:
        return flt, parse_event_id(param[0].decode("ascii", "replace"), "last_event_id")
    return flt, None


# A slow client needs time to read what is queued before the end; only that
# (bounded) queue is held meanwhile.
OVERFLOW_CLOSE_TIMEOUT = 30.0


def annotated(record: Record, coalesced: Mapping[int, int]) -> str:
    """The event's JSON, with ``"coalesced": n`` when values were folded into it."""
    n = coalesced.get(record.id)
    return record.json if not n else f'{record.json[:-1]},"coalesced":{n}}}'


def render_sse(records: Sequence[Record], coalesced: Mapping[int, int]) -> bytes:
    return "".join(
        f"id: {r.id}\nevent: {r.type}\ndata: {annotated(r, coalesced)}\n\n" for r in records
    ).encode()


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
        close_timeout: float = 2.0,
        shared: SharedFormat | None = None,
    ) -> None:
        self.request = request
        self.shared = shared if shared is not None else SharedFormat()
        self.hub = hub
        self.clients = clients
        self.clock = clock
        self.buffer_bytes = buffer_bytes
        self.close_timeout = close_timeout
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
        data = encode_json({"reason": reason, "oldest_id": oldest_id})
        self.request.write(f"event: reset\ndata: {data}\n\n".encode())

    def overflow(self, reason: str, last_id: int) -> None:
        """Too slow: say why after what it has, end the response, close."""
        data = encode_json({"reason": reason, "last_id": last_id})
        _log.info("SSE client {peer} too slow: closing", peer=self.request.getClientAddress())
        self.request.write(f"event: overflow\ndata: {data}\n\n".encode())
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
        close_timeout: float = 2.0,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.hub = hub
        self.clients = clients
        self.clock = clock
        self.keepalive = keepalive
        self.retry_ms = retry_ms
        self.buffer_bytes = buffer_bytes
        self.close_timeout = close_timeout
        self.shared = SharedFormat()

    def render_GET(self, request: Request) -> bytes | int:
        try:
            flt, after = query_filter(request)
        except BadQueryError as e:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return encode_json({"error": str(e)}).encode()
        stream = SSEStream(
            request,
            self.hub,
            self.clients,
            self.clock,
            self.keepalive,
            self.buffer_bytes,
            self.close_timeout,
            self.shared,
        )
        stream.start(flt, after, self.retry_ms)
        return NOT_DONE_YET
