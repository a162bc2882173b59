"""
The listeners: one per role (or one for everything), each a Twisted service
that binds its endpoint, tracks every connection on it, and on stop frees
its port for real.

Stopping is the heart of the original bug: a port is only free for a plain
``bind`` (no ``SO_REUSEADDR``) once the listening socket is closed *and* no
connection of ours is left on it, not even in TIME_WAIT. A connection whose
close our side starts goes to TIME_WAIT for a minute, so a stop ends every
stream politely (SSE response finished, WebSocket close 1001 answered), then
resets the connection (``SO_LINGER`` 0) instead of sending a FIN of its own.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ConnectionDone, VerifyError
from twisted.internet.interfaces import IListeningPort, IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from trainstream.config import fallback_endpoints
from trainstream.errors import ConfigError, ListenError, PortInUseError
from trainstream.web.backend import ListenerStatus
from trainstream.web.clients import Clients

_log = Logger()

_DONE = Failure(ConnectionDone())


class TrackedConnection(ProtocolWrapper):
    """
    One connection on a listener: the transport the HTTP channel (and later
    the WebSocket session) writes to.

    A close never puts our FIN behind data the peer has not taken: once
    closed, the socket of a peer that does not read stays in FIN-WAIT-1, out
    of our reach, holding the port long after ``stop``. So a closing
    connection stays open, and tracked, until everything we wrote has
    reached the peer. Then the client of a non-persistent HTTP/1.1 response
    (``Connection: close``), which knows where the answer ends, closes
    first, so the TIME_WAIT is the client's; it gets ``close_grace``
    seconds. Any other answer (HTTP/1.0) ends with our FIN, a half-close that
    keeps the socket ours; that peer gets ``stall_timeout`` seconds. Then,
    or when a peer takes nothing of ours for ``stall_timeout`` seconds, the
    connection is reset (RST: nothing left on our port); ``stop`` resets
    whatever is left at once (``reset_when_flushed``).

    On TLS, Twisted's TLS layer closes the TCP connection itself, with a FIN
    of ours, when a handshake fails (plain http on the TLS port, a scanner)
    and as soon as both close_notify alerts are out, which would leave a
    TIME_WAIT on our port. Those closes come here instead
    (``_tls_closes_tcp``): a failed handshake is reset once its alert is
    out; after a close_notify exchange the peer closes first or is reset
    after ``close_grace`` seconds.
    """

    factory: TrackingFactory
    peer_closes_first = False  # set per request by web.site.TrackingSite
    stall_timeout = 60.0  # as Twisted's HTTP idle timeout
    _close_call: Any = None
    _deadline = float("inf")
    _resetting = False
    _unsent = -1  # at the last look
    _progress_at = 0.0  # when the peer last took some of it

    _tls_closed = False  # the TLS layer is done with the TCP connection

    def makeConnection(self, transport: Any) -> None:
        below = _socket_below(transport)
        if below is not transport and hasattr(transport, "_tlsConnection"):
            # Twisted's TLS layer: its own closes of the TCP connection are ours to make.
            below.loseConnection = self._tls_closes_tcp
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def _tls_closes_tcp(self) -> None:
        """What the TLS layer asks of the TCP connection instead of a FIN of ours."""
        if self._tls_closed:
            return
        self._tls_closed = True
        self.disconnecting = 1
        if not getattr(self.transport, "_handshakeDone", True):
            self.reset_when_flushed(self.factory.close_grace)  # the alert, then RST
            return
        self.peer_closes_first = True
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        # Not from within this call: it may come from our own ``_watch``.
        self._close_call = self.factory.reactor.callLater(0, self._watch, 0.001)

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = 1
        self._watch(0.001)

    def reset_when_flushed(self, within: float) -> None:
        """
        Reset the connection (RST: no FIN from us, so no TIME_WAIT on our
        port) once everything we wrote has reached the peer, or after
        ``within`` seconds for a peer that does not read. A peer that closes
        first meanwhile just closes.
        """
        self.disconnecting = 1
        self._resetting = True
        self._deadline = min(self._deadline, self.factory.reactor.seconds() + within)
        transport = self._transport()
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # nothing more is produced
        self._watch(0.001)

    def _watch(self, wait: float) -> None:
        """Close, or reset, as soon as the peer has taken everything we wrote."""
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()  # e.g. a wait for the peer to close first
        self._close_call = None
        transport = self._transport()
        if not getattr(transport, "connected", False):
            return
        reactor = self.factory.reactor
        now = reactor.seconds()
        unsent = _unsent(transport)
        if unsent != self._unsent:
            self._unsent, self._progress_at = unsent, now
        if unsent == 0 and self._resetting:
            transport.abortConnection()
        elif unsent == 0:
            wait_for_peer = self.factory.close_grace
            if not self.peer_closes_first and not self._tls_closed:
                # The end of an answer only our close delimits (HTTP/1.0).
                if isinstance(transport, ProtocolWrapper):
                    # TLS: its close_notify; the TCP close comes to _tls_closes_tcp.
                    transport.loseConnection()
                else:
                    transport.loseWriteConnection()
                wait_for_peer = self.stall_timeout
            self._close_call = reactor.callLater(
                wait_for_peer, self.reset_when_flushed, self.factory.close_grace
            )
        elif now >= self._deadline or now - self._progress_at >= self.stall_timeout:
            transport.abortConnection()
        else:
            # Look again soon, then less often: a peer that does not read
            # should cost next to nothing while it is given its time.
            self._close_call = reactor.callLater(wait, self._watch, min(wait * 2, 0.25))

    def close_within(self, seconds: float) -> None:
        """Close once our data has reached the peer, or reset after ``seconds``."""
        self.reset_when_flushed(seconds)

    def _transport(self) -> Any:
        return self.transport

    def dataReceived(self, data: bytes) -> None:
        if not self.disconnecting:  # nothing more is read from a closing channel
            super().dataReceived(data)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


@implementer(IProtocolNegotiationFactory)
class TrackingFactory(WrappingFactory):
    """
    Wraps the one ``Site`` for one listener: it knows the listener's role and
    every connection open on it, and says when none is left.

    On a TLS listener it is what Twisted asks for the ALPN protocols (the
    ``Site`` is behind it): without an answer every client that offers ALPN
    (browsers, curl) is refused with a TLS internal-error alert.
    """

    noisy = False
    protocol = TrackedConnection

    def __init__(self, site: Site, role: str, reactor: Any, close_grace: float) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.role = role
        self.reactor = reactor
        self.close_grace = close_grace
        self._empty_waiters: list[Deferred[None]] = []

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: WebSocket upgrades and SSE streams need it (no h2)."""
        return [b"http/1.1"]

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        if not self.protocols:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)

    def when_empty(self) -> Deferred[None]:
        """Fires once no connection is open on this listener."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._empty_waiters.append(d)
        return d


def _layers(transport: Any) -> list[Any]:
    """``transport`` and those under it (TLS over TCP), down to the one that owns the socket."""
    layers = [transport]
    while isinstance(transport, ProtocolWrapper) and len(layers) < 8:
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
        layers.append(transport)
    return layers


def _socket_below(transport: Any) -> Any:
    """The transport under any wrappers (TLS): the one that owns the socket."""
    return _layers(transport)[-1]


def _unsent(transport: Any) -> int:
    """
    Bytes written that have not reached the peer: in Twisted's buffers (a TLS
    layer's small writes it aggregates until the next reactor turn and its
    cleartext waiting for the handshake, then the TCP transport's) and, where
    the system tells (Linux ``TIOCOUTQ``: sent but not acknowledged, a FIN
    counting one), in the kernel's send queue. 0: all flushed.
    """
    *wrappers, transport = _layers(transport)
    unsent = 0
    for tls in wrappers:
        aggregated = getattr(getattr(tls, "_aggregator", None), "_buffer", ())
        unsent += sum(len(b) for b in aggregated)
        unsent += sum(len(b) for b in getattr(tls, "_appSendBuffer", ()))
    unsent += int(
        len(getattr(transport, "dataBuffer", b""))
        - getattr(transport, "offset", 0)
        + getattr(transport, "_tempDataLen", 0)
    )
    sock = getattr(transport, "socket", None)
    if (
        isinstance(sock, socket.socket)
        and sock.family in (socket.AF_INET, socket.AF_INET6)  # on UNIX sockets it means unread
        and _SEND_QUEUE is not None
    ):
        try:
            unsent += _SEND_QUEUE(sock)
        except OSError:
            return unsent
    return unsent


def _kernel_send_queue() -> Callable[[socket.socket], int] | None:
    """
    Where the system tells how many bytes a socket's send queue holds (Linux
    ``TIOCOUTQ``), the way to ask; None elsewhere (Windows has no
    ``fcntl``/``termios``): there a connection is reset once Twisted's
    buffers are flushed.
    """
    try:
        import fcntl
        import termios
    except ImportError:
        return None
    request = getattr(termios, "TIOCOUTQ", None)
    if request is None:
        return None

    def queued(sock: socket.socket) -> int:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])

    return queued


_SEND_QUEUE = _kernel_send_queue()


@define
class Listener:
    """One bound endpoint and its role."""

    role: str
    description: str
    factory: TrackingFactory
    port: IListeningPort

    @property
    def secure(self) -> bool:
        """Served over TLS: its URLs say https and wss."""
        return _is_tls(self.description)

    def base(self, scheme: str) -> str:
        """``scheme://host:port`` of this listener, as a client reaches it."""
        address: Any = self.port.getHost()
        s = "s" if self.secure else ""
        if getattr(address, "type", None) in ("TCP", "TCP6") or hasattr(address, "port"):
            host = str(address.host)
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            if ":" in host:
                host = f"[{host}]"
            return f"{scheme}{s}://{host}:{address.port}"
        name = getattr(address, "name", b"")
        path = name.decode() if isinstance(name, bytes) else str(name)
        return f"{scheme}{s}+unix://{path.replace('/', '%2F')}"

    @property
    def loopback(self) -> bool:
        """Bound to a loopback address (where a Host check stops DNS rebinding)."""
        from trainstream.web.access import is_loopback_host

        host = getattr(self.port.getHost(), "host", None)
        return isinstance(host, str) and is_loopback_host(host)

    @property
    def port_number(self) -> int | None:
        return getattr(self.port.getHost(), "port", None)


#: The endpoint string of a TLS listener, as errors tell it.
_TLS_FORM = "ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem:interface=127.0.0.1"

#: ``ssl:`` arguments: a ``tls:`` string that uses them means ``ssl:``.
_SSL_KEYWORDS = frozenset(
    ("privateKey", "certKey", "extraCertChain", "sslmethod", "dhParameters", "backlog")
)


def _is_tls(description: str) -> bool:
    return description.split(":", 1)[0].strip().lower() in ("ssl", "tls")


def endpoint_string(description: str) -> str:
    """
    The string given to ``serverFromString``. ``tls:`` is accepted for
    ``ssl:`` (``tls:8443:privateKey=KEY.pem:certKey=CERT.pem``): a ``tls:``
    string whose first argument is a port number, or that names an ``ssl:``
    argument, becomes ``ssl:``. Any other ``tls:`` string is Twisted's own
    (``tls:PEM_DIRECTORY:port=8443``, one PEM per host name, chosen by SNI)
    and is passed on unchanged.
    """
    prefix, sep, rest = description.partition(":")
    if prefix.strip().lower() != "tls" or not sep:
        return description
    args = rest.split(":")
    keywords = {a.split("=", 1)[0] for a in args if "=" in a}
    if args[0].strip().isdigit() or keywords & _SSL_KEYWORDS:
        return "ssl:" + rest
    return description


_PORT_IN_DESCRIPTION = re.compile(r"^(?:tcp6?|ssl|tls):(?:port=)?(\d+)", re.IGNORECASE)


def _listen_error(role: str, description: str, error: BaseException) -> ListenError:
    """Turn a failed ``listen`` into an error that names the role, port and endpoint."""
    socket_error = getattr(error, "socketError", error)
    port: int | None = getattr(error, "port", None)
    if not isinstance(port, int):
        m = _PORT_IN_DESCRIPTION.match(description)
        port = int(m.group(1)) if m else None
    code = getattr(socket_error, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) else str(socket_error)
    if code == errno.EADDRINUSE:
        return PortInUseError(role, description, port, reason.lower())
    return ListenError(role, description, port, reason.lower())


class ListenerService(Service):
    """
    One role's endpoint. ``privilegedStartService`` binds it (synchronously
    for TCP, SSL and UNIX endpoints; a failure raises ``PortInUseError`` or
    ``ListenError`` naming the role, port and endpoint); the group's stop
    closes it and its connections (see ``Listeners``).
    """

    #: ``--port-fallback``: a busy port is followed by the next this many.
    fallback = 0

    def __init__(
        self, role: str, description: str, site: Site, reactor: Any, close_timeout: float
    ) -> None:
        self.setName(role)  # type: ignore[no-untyped-call]
        self.role = role
        self.description = description
        self.site = site
        self.reactor = reactor
        self.close_timeout = close_timeout
        self.bound: Listener | None = None

    def privilegedStartService(self) -> None:
        """Bind; a busy port is followed by the next ``fallback`` (``--port-fallback``)."""
        candidates = fallback_endpoints(self.description, self.fallback)
        tried: list[int | None] = []
        for description in candidates:
            try:
                self.bound = self._bind(description)
            except PortInUseError as e:
                tried.append(e.port)
                if len(candidates) == 1:
                    raise
                continue
            if tried:
                busy, port = ", ".join(map(str, tried)), self.bound.port_number
                _log.warn("--{r}: port {b} busy; on {p}", r=self.role, b=busy, p=port)
            break
        else:
            ports = ", ".join(str(p) for p in tried)
            raise PortInUseError(
                self.role,
                self.description,
                tried[0],
                f"address already in use on every port tried: {ports} (--port-fallback "
                f"{self.fallback})",
            )
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def _bind(self, description: str) -> Listener:
        where = f"--{self.role} {description!r}"
        tls = _is_tls(description)
        hint = f"; a TLS listener is {_TLS_FORM}" if tls else ""
        try:
            endpoint = serverFromString(self.reactor, endpoint_string(description))
        except ImportError as e:  # ssl:/tls: without pyOpenSSL
            raise ConfigError(
                f"{where} needs TLS support, which is not installed ({e}): "
                "pip install 'trainstream[tls]'"
            ) from None
        except OSError as e:  # ssl: reads its certificate and key files here
            name = e.filename if e.filename is not None else "a file"
            default = (
                " (ssl: without privateKey= reads server.pem)"
                if tls and "privatekey=" not in description.lower()
                else ""
            )
            raise ConfigError(
                f"{where}: cannot read {name}: {e.strerror or e}{default}{hint}"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where} is not a valid endpoint string: {e}{hint}") from None
        except VerifyError:
            raise ConfigError(f"{where}: the private key is not the certificate's{hint}") from None
        except Exception as e:
            if tls and type(e).__module__.startswith("OpenSSL"):
                raise ConfigError(
                    f"{where}: the certificate or the key is not a PEM file OpenSSL can "
                    f"load ({e}){hint}"
                ) from None
            raise
        factory = TrackingFactory(self.site, self.role, self.reactor, self.close_timeout)
        outcome: list[object] = []
        endpoint.listen(factory).addBoth(outcome.append)
        if not outcome:  # pragma: no cover - every endpoint we accept binds at once
            raise ConfigError(f"--{self.role} {description!r} did not bind synchronously")
        result = outcome[0]
        if isinstance(result, Failure):
            error = result.value
            if isinstance(error, CannotListenError | OSError):
                raise _listen_error(self.role, description, error) from None
            if isinstance(error, OverflowError):  # tcp:99999: bind() refuses the number
                raise ConfigError(
                    f"--{self.role} {description!r} is not a usable endpoint: {error}"
                ) from None
            result.raiseException()
        return Listener(self.role, description, factory, result)  # type: ignore[arg-type]

    def status(self) -> ListenerStatus | None:
        bound = self.bound
        if bound is None:
            return None
        return ListenerStatus(
            role=bound.role,
            endpoint=bound.description,
            port=bound.port_number,
            url=bound.base("http") + "/",
            connections=len(bound.factory.protocols),
            loopback=bound.loopback,
        )


class Listeners(MultiService):
    """
    Every listener of one server. Started, each binds in turn (a failure
    closes those bound before it and raises). Stopped, it fires only when
    every ``stopListening`` Deferred has fired and every connection is gone,
    so every port can be bound again at once: listening sockets close
    first, then every stream is ended politely (``clients``), then each
    connection is reset once our data reached the peer, or after
    ``close_timeout`` (plus half a second, then anything left is aborted).
    """

    def __init__(self, clients: Clients, reactor: Any, close_timeout: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.clients = clients
        self.reactor = reactor
        self.close_timeout = close_timeout

    @property
    def roles(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

    @property
    def bound(self) -> list[Listener]:
        return [s.bound for s in self.roles if s.bound is not None]

    def privilegedStartService(self) -> None:
        """Bind each role in turn; on a failure those bound stay bound until ``stopService``."""
        for listener in self.roles:
            listener.privilegedStartService()
        Service.privilegedStartService(self)  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        bound = self.bound
        for listener in self.roles:
            listener.bound = None
        if not bound:
            return
        await gatherResults(
            [maybeDeferred(li.port.stopListening) for li in bound], consumeErrors=True
        )
        factories = [li.factory for li in bound]
        self.clients.close_all("server stopping")
        # Autobahn is imported at the first upgrade (an idle server never loads it).
        ws = sys.modules.get("trainstream.web.ws")
        for factory in factories:
            for wrapper in list(factory.protocols):
                protocol = wrapper.wrappedProtocol
                if ws is not None and isinstance(protocol, ws.StreamSession):
                    if protocol.state == protocol.STATE_CONNECTING:
                        wrapper.transport.abortConnection()
                    # Otherwise our close frame is out: Autobahn resets the
                    # connection once the client answers it, or after
                    # closeHandshakeTimeout.
                else:
                    # Plain HTTP (SSE streams are finished by now): flush, then reset.
                    wrapper.reset_when_flushed(self.close_timeout)
        everyone_gone = gatherResults([f.when_empty() for f in factories])
        deadline = self.reactor.callLater(self.close_timeout + 0.5, _abort_all, factories)
        await everyone_gone
        if deadline.active():
            deadline.cancel()


def _abort_all(factories: list[TrackingFactory]) -> None:
    for factory in factories:
        for wrapper in list(factory.protocols):
            _log.warn("client {peer} did not close in time: resetting", peer=wrapper.getPeer())
            wrapper.transport.abortConnection()


def build_listeners(
    roles: list[tuple[str, str]], site: Site, clients: Clients, reactor: Any, close_timeout: float
) -> Listeners:
    """One ``ListenerService`` per (role, endpoint string), in bind order."""
    group = Listeners(clients, reactor, close_timeout)
    for role, description in roles:
        ListenerService(role, description, site, reactor, close_timeout).setServiceParent(group)  # type: ignore[no-untyped-call]
    return group


__all__ = [
    "Listener",
    "ListenerService",
    "Listeners",
    "TrackedConnection",
    "build_listeners",
    "endpoint_string",
]
