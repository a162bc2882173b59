"""
A server's listeners from endpoint strings, and a start and stop that are
Deferreds which fire only when the ports are bound, or truly free again.

Stopping is the heart of the original bug: a port is only free for a plain
``bind`` (no ``SO_REUSEADDR``) once the listening socket is closed *and* no
connection of ours is left on it, not even in TIME_WAIT. A connection whose
close our side starts goes to TIME_WAIT for a minute, so ``stop`` ends every
stream politely (SSE response finished, WebSocket close 1001 answered), then
resets the connection (``SO_LINGER`` 0) instead of sending a FIN of its own.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import struct
import tempfile
import termios
import time
from collections.abc import Mapping
from typing import Any

from attrs import define
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import Site

from trainstream.config import Config, default_db_path
from trainstream.errors import ConfigError, ListenError, PortInUseError
from trainstream.events import Limits
from trainstream.hub import Hub
from trainstream.ranks import RanksService
from trainstream.run import Inbox, Run
from trainstream.runs import RunsService
from trainstream.store import Store
from trainstream.store.memory import MemoryStore
from trainstream.web.backend import ListenerStatus, ServerStatus
from trainstream.web.clients import Clients
from trainstream.web.site import build_site
from trainstream.web.ws import StreamSession

_log = Logger()

_DONE = Failure(ConnectionDone())
# run.log() batches reach the hub at most this long after they are logged.
_INBOX_DELAY = 0.05


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
    """

    factory: TrackingFactory
    peer_closes_first = False  # set per request by web.site.TrackingSite
    stall_timeout = 60.0  # as Twisted's HTTP idle timeout
    _close_call: Any = None
    _deadline = float("inf")
    _resetting = False
    _unsent = -1  # at the last look
    _progress_at = 0.0  # when the peer last took some of it

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
            if not self.peer_closes_first:
                # The end of an answer only our close delimits (HTTP/1.0).
                if isinstance(transport, ProtocolWrapper):
                    transport.loseConnection()  # TLS: its close_notify first
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


class TrackingFactory(WrappingFactory):
    """
    Wraps the one ``Site`` for one listener: it knows the listener's role and
    every connection open on it, and says when none is left.
    """

    noisy = False
    protocol = TrackedConnection

    def __init__(self, site: Site, role: str, reactor: Any, close_grace: float) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.role = role
        self.reactor = reactor
        self.close_grace = close_grace
        self._empty_waiters: list[Deferred[None]] = []

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


def _unsent(transport: Any) -> int:
    """
    Bytes written that have not reached the peer: in Twisted's buffer and,
    where the system tells (Linux ``TIOCOUTQ``: sent but not acknowledged,
    a FIN counting one), in the kernel's send queue. 0: all flushed.
    """
    unsent = int(
        len(getattr(transport, "dataBuffer", b""))
        - getattr(transport, "offset", 0)
        + getattr(transport, "_tempDataLen", 0)
    )
    sock = getattr(transport, "socket", None)
    if (
        isinstance(sock, socket.socket)
        and sock.family in (socket.AF_INET, socket.AF_INET6)  # on UNIX sockets it means unread
        and hasattr(termios, "TIOCOUTQ")
    ):
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return unsent
        unsent += int(struct.unpack("i", queued)[0])
    return unsent


@define
class Listener:
    """One bound endpoint and its role."""

    role: str
    description: str
    factory: TrackingFactory
    port: IListeningPort

    @property
    def secure(self) -> bool:
        return self.description.split(":", 1)[0].lower() in ("ssl", "tls")

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


class StreamServer(MultiService):
    """
    One trainstream server: a Hub, its store, its clients, and one listener
    per role, all served by one ``Site``. ``start`` and ``stop`` may be
    repeated; the history and the ``Run`` objects outlive a stop.
    """

    def __init__(
        self, config: Config | Mapping[str, Any] | None = None, reactor: Any = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = Config.from_value(config)
        self.reactor: Any = reactor
        self.token = self.config.resolve_token()
        self.store: Store
        if self.config.memory:
            self.store = MemoryStore(self.config.max_history)
        else:
            from trainstream.store.sqlite import RetentionService, SQLiteStore

            store = SQLiteStore(
                self.config.db or default_db_path(),
                lambda f, *a: self.reactor.callFromThread(f, *a),
                cache_events=self.config.max_history,
            )
            self.store = store
            if self.config.retain_days or self.config.max_db_mb:
                RetentionService(
                    store, self.reactor, self.config.retain_days, self.config.max_db_mb
                ).setServiceParent(self)  # type: ignore[no-untyped-call]
        self.hub = Hub(self.store, Limits())
        self.clients = Clients()
        self.inbox = Inbox(
            lambda f: self.reactor.callFromThread(f),
            self.hub.publish,
            lambda f: self.reactor.callLater(_INBOX_DELAY, f),
        )
        self.site = build_site(self)
        self.listeners: list[Listener] = []
        self._started_at = time.monotonic()
        self._starting: Deferred[StreamServer] | None = None
        self._start_error: BaseException | None = None
        self._stop_waiters: list[Deferred[None]] = []
        self.runs = RunsService(self.hub, self.reactor, self.config.stall_after)
        self.runs.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.ranks = RanksService(self.hub)
        if self.config.demo:
            from trainstream.demo import DemoService

            demo = DemoService(self.hub, self.reactor)
            demo.setServiceParent(self)  # type: ignore[no-untyped-call]

    # Lifecycle

    @property
    def listening(self) -> bool:
        return bool(self.listeners)

    def start(self) -> Deferred[StreamServer]:
        """
        Bind every listener, then start the child services.

        :return: fires with this server once every port is bound, or fails
            with ``PortInUseError``/``ListenError``/``ConfigError`` after
            closing whatever it had bound.
        """
        d = Deferred.fromCoroutine(self._start())
        self._starting = d
        return d

    async def _start(self) -> StreamServer:
        if self.listeners:
            return self
        bound: list[Listener] = []
        for role, description in self.config.listeners():
            try:
                endpoint = serverFromString(self.reactor, description)
            except (ValueError, KeyError, TypeError) as e:
                await self._unbind(bound)
                raise ConfigError(
                    f"--{role} {description!r} is not a valid endpoint string: {e}"
                ) from None
            except ImportError as e:  # ssl:/tls: without pyOpenSSL
                self._start_error = ConfigError(
                    f"--{role} {description!r} needs TLS support, which is not installed "
                    f"({e}): pip install 'trainstream[tls]'"
                )
                await self._unbind(bound)
                raise self._start_error from None
            factory = TrackingFactory(self.site, role, self.reactor, self.config.close_timeout)
            try:
                port = await endpoint.listen(factory)
            except (CannotListenError, OSError) as e:
                error = _listen_error(role, description, e)
                # Said now, before the ports bound so far are closed (which
                # takes a reactor turn): twistd reads it synchronously.
                self._start_error = error
                await self._unbind(bound)
                raise error from None
            bound.append(Listener(role, description, factory, port))
        self.listeners = bound
        self._started_at = time.monotonic()
        self.store.announce(self.urls)
        if self.config.ports_file:
            self._write_ports_file(self.config.ports_file)
        if not self.running:
            MultiService.startService(self)
        _log.info("trainstream listening: {urls}", urls=self.urls)
        return self

    def stop(self) -> Deferred[None]:
        """
        Stop the child services, close every listening port and every client
        connection. Fires only when each ``stopListening`` Deferred has fired
        and each connection is gone, so every port can be bound again at once.
        A stop asked for while one runs fires when that one ends.
        """
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if len(self._stop_waiters) == 1:
            Deferred.fromCoroutine(self._stop()).addBoth(self._stopped)
        return waiter

    def _stopped(self, result: object) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _stop(self) -> None:
        if self.running:
            await maybeDeferred(MultiService.stopService, self)
        # Whatever the training code queued before the stop is still published.
        self.inbox.drain()
        listeners, self.listeners = self.listeners, []
        await self._unbind(listeners)
        await self.store.sync()

    def close(self) -> None:
        """After the last stop: commit and close the history (frees its file)."""
        self.store.close()

    async def _unbind(self, listeners: list[Listener]) -> None:
        if not listeners:
            return
        await gatherResults(
            [maybeDeferred(listener.port.stopListening) for listener in listeners],
            consumeErrors=True,
        )
        factories = [listener.factory for listener in listeners]
        self.clients.close_all("server stopping")
        for factory in factories:
            for wrapper in list(factory.protocols):
                protocol = wrapper.wrappedProtocol
                if isinstance(protocol, StreamSession):
                    if protocol.state == WebSocketProtocol.STATE_CONNECTING:
                        wrapper.transport.abortConnection()
                    # Otherwise our close frame is out: Autobahn resets the
                    # connection once the client answers it, or after
                    # closeHandshakeTimeout.
                else:
                    # Plain HTTP (SSE streams are finished by now): flush, then reset.
                    wrapper.reset_when_flushed(self.config.close_timeout)
        everyone_gone = gatherResults([f.when_empty() for f in factories])
        deadline = self.reactor.callLater(
            self.config.close_timeout + 0.5, self._abort_all, factories
        )
        await everyone_gone
        if deadline.active():
            deadline.cancel()

    def _abort_all(self, factories: list[TrackingFactory]) -> None:
        for factory in factories:
            for wrapper in list(factory.protocols):
                _log.warn("client {peer} did not close in time: resetting", peer=wrapper.getPeer())
                wrapper.transport.abortConnection()

    # twistd integration: twistd calls these; embedded code uses start/stop.

    def privilegedStartService(self) -> None:
        self._start_error = None
        d = self.start()
        failures: list[BaseException] = []

        def failed(f: Failure) -> None:
            failures.append(f.value or Exception(f.getErrorMessage()))

        d.addErrback(failed)
        error = failures[0] if failures else self._start_error
        if error is not None:
            # Binding is synchronous for TCP, SSL and UNIX endpoints, for
            # every listener: whichever one fails, say why and exit, instead
            # of running a server with no ports. (The ports bound before it
            # close as the process exits.)
            raise SystemExit(f"trainstream: {error}")

    def startService(self) -> None:
        if self._starting is None:
            self.start()

    def stopService(self) -> Deferred[None]:
        def closed(result: object) -> object:
            self.close()  # whatever the stop said: the history file is freed
            return result

        return self.stop().addBoth(closed)

    # Information

    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    @property
    def urls(self) -> dict[str, str]:
        """Where clients connect: ``sse``, ``ws``, ``rest`` and ``dashboard``."""
        by_role = {listener.role: listener for listener in self.listeners}
        if not by_role:
            return {}
        if "listen" in by_role:
            one = by_role["listen"]
            sse = ws = rest = one
        else:
            sse, ws, rest = by_role["sse"], by_role["ws"], by_role["rest"]
        return {
            "sse": sse.base("http") + "/events",
            "ws": ws.base("ws") + "/ws",
            "rest": rest.base("http") + "/api",
            "dashboard": rest.base("http") + "/",
        }

    def status(self) -> ServerStatus:
        """The snapshot the web layer shows (``web.backend.Backend``)."""
        return ServerStatus(
            uptime_s=self.uptime(),
            urls=self.urls,
            listeners=tuple(
                ListenerStatus(
                    role=listener.role,
                    endpoint=listener.description,
                    port=listener.port_number,
                    url=listener.base("http") + "/",
                    connections=len(listener.factory.protocols),
                    loopback=listener.loopback,
                )
                for listener in self.listeners
            ),
        )

    def listener_info(self) -> dict[str, dict[str, object]]:
        return {
            listener.role: {
                "endpoint": listener.description,
                "port": listener.port_number,
                "url": listener.base("http") + "/",
                "connections": len(listener.factory.protocols),
            }
            for listener in self.listeners
        }

    def _write_ports_file(self, path: str) -> None:
        """Write ``urls`` as JSON atomically: a reader sees all of it or nothing."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".ports-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.urls, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    # Publishing from training code

    def run(self, name: str, hparams: Mapping[str, object] | None = None) -> Run:
        """A handle to log a training run; announces it as ``created``."""
        run = Run(self, name, self.inbox)
        run.status("created")
        if hparams:
            run.hparams(hparams)
        return run

    def flush_deferred(self) -> Deferred[None]:
        """Reactor thread: publish everything queued so far, and store it."""
        self.inbox.drain()
        return self.store.sync()

    def flush(self) -> None:
        """Any other thread: return once everything queued so far is stored."""
        from trainstream.manager import call_blocking

        call_blocking("flush()", "Run.flush_deferred()", self.flush_deferred, timeout=60)
