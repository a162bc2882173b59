"""
WebSocket sessions (``/ws``): subscribe, publish, ping, as PROTOCOL section 5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer, noLongerProvides

from trainstream._version import __version__
from trainstream.errors import DiskFullError, StoreError
from trainstream.events import INT_MAX, MAX_BODY_BYTES, EventError, decode_json, encode_json
from trainstream.events.rules import show
from trainstream.hub import Hub
from trainstream.store import Record
from trainstream.subscription import DEFAULT_CLIENT_BUFFER, SharedFormat, Subscription
from trainstream.web.access import WRITE, Access, token_given
from trainstream.web.clients import Clients
from trainstream.web.frames import render_events
from trainstream.web.query import BadQueryError, filter_from_lists

_log = Logger()

_SUBSCRIBE_KEYS = {"op", "runs", "names", "types", "after", "max_rate"}
_AN_OP = 'a JSON object with an "op"'
_OPS = "ops are subscribe, unsubscribe, publish, ping"
#: What a session opened with a read token is told for a publish (PROTOCOL 6).
READ_ONLY_PUBLISH = (
    "publish refused: this token may read but not write; publish needs the token given with --token"
)


OVERFLOW_CLOSE_TIMEOUT = 30.0


class _ProtocolError(ValueError):
    """A client message we cannot act on; answered with an ``error`` op."""


def _name(text: str) -> str:
    """A name the client sent (an op, a field), quoted and cut short for an error."""
    return repr(text[:40] + "..." if len(text) > 40 else text)


def _list_of_strings(message: Mapping[str, object], key: str) -> Sequence[str]:
    """The ``runs``, ``names`` or ``types`` of a subscribe: absent or null is all."""
    value = message.get(key)
    if value is None:
        return ()
    problem = f"subscribe: {key!r} must be a list of strings, got"
    if not isinstance(value, list):
        raise _ProtocolError(f"{problem} {show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _ProtocolError(f"{problem} {show(item)} at position {i}")
    return value


def given_token(request: ConnectionRequest, uri: str) -> bytes:
    """
    The token a WebSocket client gave, byte for byte as the site's
    ``Access`` read it from the same upgrade: ``Authorization: Bearer``,
    else the first ``?token=`` of ``uri`` (the request line's target).
    Autobahn decoded both as Latin-1, which gives the bytes back exactly.
    """
    header: str = request.headers.get("authorization", "")
    query = uri.encode("latin-1").partition(b"?")[2]
    values: list[bytes] = parse_qs(query, keep_blank_values=True).get(b"token", [])
    return token_given(header.encode("latin-1"), values)


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
    #: What the client's token allows (``access.READ`` or ``WRITE``).
    level = WRITE
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

    def onConnect(self, request: ConnectionRequest) -> None:
        access = self.factory.access
        if access is None:
            return
        level = access.level_of(given_token(request, self.http_request_uri))
        if level is None:
            # The site refuses a wrong token before the upgrade; this is the
            # same check again, for a factory served without that site.
            raise ConnectionDeny(401, "missing or wrong token")
        self.level = level

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        """Autobahn's hook for a message over the limit: close 1009, saying what to do."""
        self._fail_connection(
            WebSocketProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
            f"message is over the limit of {max_msg_size} bytes; publish fewer events per message",
        )

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
        except Exception:
            # A bug of ours: the client gets no Python text, the log gets all.
            _log.failure("WebSocket message from {peer} failed", peer=self.peer)
            self.send_json({"op": "error", "error": "internal server error (logged by the server)"})

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        hub = self.factory.hub
        if op == "subscribe":
            unknown = sorted(set(message) - _SUBSCRIBE_KEYS)
            if unknown:
                raise _ProtocolError(f"subscribe: unknown field {_name(unknown[0])}")
            max_rate = message.get("max_rate")
            if max_rate is not None and (
                isinstance(max_rate, bool)
                or not isinstance(max_rate, int | float)
                or not 0 < max_rate <= 1000
            ):
                raise _ProtocolError(
                    f'subscribe: "max_rate" must be a number of messages/s in (0, 1000], '
                    f"got {show(max_rate)}"
                )
            flt = filter_from_lists(
                runs=_list_of_strings(message, "runs"),
                names=_list_of_strings(message, "names"),
                types=_list_of_strings(message, "types"),
            )
            after = message.get("after")
            if after is not None and (type(after) is not int or not 0 <= after <= INT_MAX):
                raise _ProtocolError(
                    f'subscribe: "after" must be an event id >= 0 (64-bit), got {show(after)}'
                )
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
            if self.level != WRITE:
                self.send_json({"op": "error", "error": READ_ONLY_PUBLISH, "status": 403})
                return
            # An ack means stored: send it once the history has committed
            # (in a cluster: once Redis holds it). If it could not be (a full
            # disk, Redis unreachable), say so; the connection stays.
            d = hub.publish(message.get("events"))
            d.addCallbacks(self._acked, self._store_failed)
        elif op == "ping":
            try:
                pong = encode_json({"op": "pong", "nonce": message.get("nonce")}).encode()
            except UnicodeEncodeError:
                raise _ProtocolError(
                    'ping: "nonce" holds a lone surrogate (\\ud800-\\udfff), '
                    "which UTF-8 cannot encode; send a nonce without one"
                ) from None
            self.sendMessage(pong)  # type: ignore[no-untyped-call]
        elif op is None:
            raise _ProtocolError(f'a message must have an "op"; {_OPS}')
        else:
            shown = _name(op) if isinstance(op, str) else show(op)
            raise _ProtocolError(f"unknown op {shown}; {_OPS}")

    def _unsubscribe(self) -> None:
        if self.subscription is not None:
            self.factory.hub.unsubscribe(self.subscription)
            self.subscription = None

    # Sink

    def write(self, records: Sequence[Record], coalesced: Mapping[int, int]) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            self._unsubscribe()  # closing: nothing more goes out
            return
        frame = self.factory.shared.get(records, coalesced, self.factory.events_frame)
        if self._perMessageCompress is None and not self.send_queue:
            # sendPreparedMessage's path without its per-call debug line, whose
            # arguments Autobahn formats even when debug is off (2.8 us a call:
            # a quarter of a core at 1,000 clients and 100 batches/s).
            self.transport.write(frame)  # type: ignore[union-attr]
            self.trafficStats.outgoingOctetsWireLevel += len(frame)
        else:
            self.sendData(frame)  # type: ignore[no-untyped-call]

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

    def _acked(self, answer: tuple[int, int, int]) -> None:
        accepted, first, last = answer
        self._send_if_open({"op": "ack", "accepted": accepted, "first_id": first, "last_id": last})

    def _store_failed(self, failure: Failure) -> None:
        failure.trap(StoreError)
        self._send_if_open(
            {
                "op": "error",
                "error": str(failure.value),
                "disk_full": isinstance(failure.value, DiskFullError),
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
    #: The site's token check (``build_site`` sets it): what a session may do.
    access: Access | None = None

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
        self.shared = SharedFormat()  # of events_frame
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            closeHandshakeTimeout=close_timeout,
            openHandshakeTimeout=10,
            # A publish follows the rules of POST /api/events, body size too.
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            # A message over the limit (1009) or a text frame that is not
            # UTF-8 (1007) gets a close frame with its code and a reason the
            # client can read, not a dropped connection (Autobahn's default).
            failByDrop=False,
        )

    def events_frame(self, records: Sequence[Record], coalesced: Mapping[int, int]) -> bytes:
        """
        The whole WebSocket frame of an ``events`` message, header included:
        the same bytes for every client (the server masks nothing and
        compresses nothing), so a batch is framed once, not once per client.
        """
        prepared = self.prepareMessage(render_events(records, coalesced))  # type: ignore[no-untyped-call]
        frame: bytes = prepared.payloadHybi
        return frame
