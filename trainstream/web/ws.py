"""
WebSocket sessions (``/ws``): subscribe, publish, ping, as PROTOCOL section 5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer, noLongerProvides

from trainstream._version import __version__
from trainstream.errors import DiskFullError, StoreError
from trainstream.events import MAX_BODY_BYTES, EventError, decode_json, encode_json
from trainstream.hub import Hub
from trainstream.store import Record
from trainstream.subscription import DEFAULT_CLIENT_BUFFER, SharedFormat, Subscription
from trainstream.web.clients import Clients
from trainstream.web.frames import render_events
from trainstream.web.query import BadQueryError, filter_from_lists

_log = Logger()

_SUBSCRIBE_KEYS = {"op", "runs", "names", "types", "after", "max_rate"}
_AN_OP = 'a JSON object with an "op"'


OVERFLOW_CLOSE_TIMEOUT = 30.0


class _ProtocolError(ValueError):
    """A client message we cannot act on; answered with an ``error`` op."""


@implementer(IPushProducer)
class _Flow:
    """The session's push producer: the transport says when it is full or drained."""

    def __init__(self, session: StreamSession) -> None:
        self.session = session

    def pauseProducing(self) -> None:
        session = self.session
        session.paused = True
        if session.subscription is not None:
            session.subscription.pause()
        # Stop reading too: a client that sends requests (pings, publishes)
        # without reading the answers must not make us queue them unbounded.
        transport: Any = session.transport
        transport.pauseProducing()

    def resumeProducing(self) -> None:
        session = self.session
        session.paused = False
        transport: Any = session.transport
        transport.resumeProducing()
        if session.subscription is not None:
            session.subscription.resume()

    def stopProducing(self) -> None:
        pass


class StreamSession(WebSocketServerProtocol):
    """One WebSocket client: a ``Sink`` for its subscription."""

    factory: StreamFactory
    subscription: Subscription | None = None
    paused = False
    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # Our connection tracker wraps the transport and claims its
        # interfaces; on TLS Autobahn then asks it for a TLS channel id it
        # cannot give. The session needs no channel binding: say it is plain.
        transport = self.transport
        if ISSLTransport.providedBy(transport):
            # Imported only here: TLS needs pyOpenSSL (the ``tls`` extra),
            # which a plain install does not have.
            from twisted.protocols.tls import TLSMemoryBIOProtocol

            if not isinstance(transport, TLSMemoryBIOProtocol):
                noLongerProvides(transport, ISSLTransport)
        super().connectionMade()  # type: ignore[no-untyped-call]

    def onOpen(self) -> None:
        self.factory.clients.ws.add(self)
        # The HTTP channel that carried the upgrade is still the transport's
        # producer; the session takes its place for flow control.
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(_Flow(self), True)
        self.send_json({"op": "hello", "version": __version__, "last_id": self.factory.hub.last_id})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            if isBinary:
                raise _ProtocolError("binary frames are not part of the protocol: send JSON text")
            # The decoder of REST bodies: the same rules, the same words.
            message = decode_json(payload, "message", _AN_OP)
            if not isinstance(message, dict):
                raise _ProtocolError(f"a message must be {_AN_OP}")
            self._dispatch(message)
        except _ProtocolError as e:
            self.send_json({"op": "error", "error": str(e)})
        except BadQueryError as e:
            self.send_json({"op": "error", "error": f"subscribe: {e}"})
        except EventError as e:
            self.send_json({"op": "error", **e.to_json()})

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        hub = self.factory.hub
        if op == "subscribe":
            unknown = sorted(set(message) - _SUBSCRIBE_KEYS)
            if unknown:
                raise _ProtocolError(f"subscribe: unknown field {unknown[0]!r}")
            max_rate = message.get("max_rate")
            if max_rate is not None and (
                isinstance(max_rate, bool)
                or not isinstance(max_rate, int | float)
                or not 0 < max_rate <= 1000
            ):
                raise _ProtocolError(
                    f'subscribe: "max_rate" must be a number of messages/s in (0, 1000], '
                    f"got {max_rate!r}"
                )
            flt = filter_from_lists(
                runs=message.get("runs") or (),
                names=message.get("names") or (),
                types=message.get("types") or (),
            )
            after = message.get("after")
            if after is not None and (type(after) is not int or after < 0):
                raise _ProtocolError(f'subscribe: "after" must be an event id >= 0, got {after!r}')
            self._unsubscribe()
            factory = self.factory
            self.subscription = hub.subscribe(
                self,
                flt,
                limit_bytes=factory.buffer_bytes,
                clock=factory.clock,
                min_interval=1.0 / max_rate if max_rate else 0.0,
            )
            if self.paused:
                self.subscription.pause()
            self.subscription.start(after)
        elif op == "unsubscribe":
            self._unsubscribe()
        elif op == "publish":
            accepted, first, last = hub.accept(message.get("events"))
            ack = {"op": "ack", "accepted": accepted, "first_id": first, "last_id": last}
            # An ack means stored: send it once the history has committed.
            # If it could not be (a full disk), say so; the connection stays.
            d = hub.store.sync().addCallback(lambda _: self._send_if_open(ack))
            d.addErrback(self._store_failed, first, last)
        elif op == "ping":
            self.send_json({"op": "pong", "nonce": message.get("nonce")})
        else:
            raise _ProtocolError(
                f"unknown op {op!r}; ops are subscribe, unsubscribe, publish, ping"
            )

    def _unsubscribe(self) -> None:
        if self.subscription is not None:
            self.factory.hub.unsubscribe(self.subscription)
            self.subscription = None

    # Sink

    def write(self, records: Sequence[Record], coalesced: Mapping[int, int]) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            self._unsubscribe()  # closing: nothing more goes out
            return
        frame = self.factory.shared.get(records, coalesced, render_events)
        self.sendMessage(frame)  # type: ignore[no-untyped-call]

    def overflow(self, reason: str, last_id: int) -> None:
        """Too slow: say why and where to resume, then close (1013, try again later)."""
        self.subscription = None  # the hub has dropped it already
        self.send_json({"op": "error", "error": reason, "last_id": last_id})
        # A slow client needs time to read what is queued before the close;
        # only that (bounded) queue is held meanwhile. Our own timer: it is
        # cancelled with the connection, unlike Autobahn's batched one.
        self.closeHandshakeTimeout = 0
        self.sendCloseFrame(code=1013, reasonUtf8=b"too slow: resume by id", isReply=False)
        self._deadline = self.factory.clock.callLater(
            OVERFLOW_CLOSE_TIMEOUT, self.dropConnection, True
        )

    def reset(self, reason: str, oldest_id: int) -> None:
        self.send_json({"op": "reset", "reason": reason, "oldest_id": oldest_id})

    def close(self, reason: str) -> None:
        """Send a 1001 close frame; the stop sequence waits for the answer."""
        self._unsubscribe()
        # sendClose() admits only application codes (1000, 3000-4999); 1001
        # "going away" is the protocol's own code for a server shutting down.
        self.sendCloseFrame(code=1001, reasonUtf8=reason.encode()[:120], isReply=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._unsubscribe()
        self.factory.clients.ws.discard(self)

    def _store_failed(self, failure: Failure, first: int, last: int) -> None:
        failure.trap(StoreError)
        self._send_if_open(
            {
                "op": "error",
                "error": str(failure.value),
                "disk_full": isinstance(failure.value, DiskFullError),
                "first_id": first,
                "last_id": last,
            }
        )

    def _send_if_open(self, obj: dict[str, object]) -> None:
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.send_json(obj)

    def send_json(self, obj: dict[str, object]) -> None:
        self.sendMessage(encode_json(obj).encode())  # type: ignore[no-untyped-call]


class StreamFactory(WebSocketServerFactory):
    """Builds ``StreamSession``s sharing one Hub."""

    protocol = StreamSession  # type: ignore[assignment]

    def __init__(
        self,
        hub: Hub,
        clients: Clients,
        clock: IReactorTime,
        close_timeout: float,
        buffer_bytes: int = DEFAULT_CLIENT_BUFFER,
        max_message_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        super().__init__(reactor=clock)  # type: ignore[no-untyped-call]
        self.hub = hub
        self.clients = clients
        self.clock = clock
        self.buffer_bytes = buffer_bytes
        self.shared = SharedFormat()
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            closeHandshakeTimeout=close_timeout,
            openHandshakeTimeout=10,
            # A publish follows the rules of POST /api/events, body size too.
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
        )
