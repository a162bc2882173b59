"""
The one resource tree that every listener serves, built from a ``Backend``
and the ``Config`` (never the server object).

    /            dashboard (and, for seed clients, SSE or WebSocket at the root
                 of the listener whose role is SSE or WebSocket)
    /static/...  the dashboard's files (uPlot's vendored with them)
    /api/...     REST (Klein)
    /events      SSE
    /ws          WebSocket

Autobahn is imported on the first WebSocket upgrade, not before: importing
any ``autobahn.twisted`` module loads its WAMP code and ``cryptography``
too (about 12 MiB), which a server no WebSocket client talks to never uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from trainstream.config import Config
from trainstream.events import MAX_BODY_BYTES
from trainstream.web.access import (
    Access,
    ErrorPage,
    LimitedRequest,
    access_log_line,
    is_websocket_upgrade,
)
from trainstream.web.backend import Backend
from trainstream.web.channel import Timeouts
from trainstream.web.dashboard import DashboardPage, StaticFiles
from trainstream.web.rest import RestApi
from trainstream.web.sse import SSEResource


def listener_role(request: Request) -> str | None:
    """The role of the listener a request arrived on (its factory's ``role``)."""
    transport = request.channel.transport if request.channel is not None else None
    return getattr(getattr(transport, "factory", None), "role", None)


class Root(Resource):
    """Routes ``/`` by listener role and request kind; children do the rest."""

    def __init__(self, index: IResource, sse: IResource, ws: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.index = index
        self.sse = sse
        self.ws = ws

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            role = listener_role(request)
            if role in ("sse", "listen") and b"text/event-stream" in (
                request.getHeader(b"accept") or b""
            ):
                return self.sse
            if role in ("ws", "listen") and is_websocket_upgrade(request):
                return self.ws  # the same guard as /ws
            return self.index
        return ErrorPage(404, f"no such page: {request.path.decode('latin-1')}")


class WebSocketOnly(Resource):
    """
    ``/ws``: the WebSocket resource for upgrades, a JSON 426 for anything else.
    The resource is built (and Autobahn imported) on the first upgrade.
    """

    isLeaf = True

    def __init__(self, build: Callable[[], Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._build = build
        self._ws: Any = None

    @property
    def ws(self) -> Any:
        """Autobahn's ``WebSocketResource`` over our ``StreamFactory``."""
        if self._ws is None:
            self._ws = self._build()
        return self._ws

    def render(self, request: Request) -> bytes | int:
        if not is_websocket_upgrade(request):
            return _upgrade_required(
                request,
                "this is the WebSocket endpoint: connect with a WebSocket client "
                "(Upgrade: websocket)",
            )
        # What Autobahn would refuse with a bare status line, refused in JSON.
        version = request.getHeader(b"sec-websocket-version")
        if version != b"13":
            shown = "none" if version is None else repr(version.decode("latin-1"))
            return _upgrade_required(
                request, f"WebSocket version {shown} not supported: send Sec-WebSocket-Version: 13"
            )
        if not (request.getHeader(b"sec-websocket-key") or b"").strip():
            return ErrorPage(400, "a WebSocket upgrade needs a Sec-WebSocket-Key").render(request)
        body: bytes | int = self.ws.render(request)  # type: ignore[no-untyped-call]
        return body


def _upgrade_required(request: Request, message: str) -> bytes:
    """426 Upgrade Required (Twisted knows no phrase for it), naming the version we speak."""
    body = ErrorPage(
        426, message, {b"upgrade": b"websocket", b"sec-websocket-version": b"13"}
    ).render(request)
    request.setResponseCode(426, b"Upgrade Required")
    return body


class Lazy(Resource):
    """A leaf resource built at its first request (its imports with it)."""

    isLeaf = True

    def __init__(self, build: Callable[[], IResource]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._build = build
        self._resource: IResource | None = None

    def render(self, request: Request) -> bytes | int:
        if self._resource is None:
            self._resource = self._build()
        body: bytes | int = self._resource.render(request)
        return body


def _metrics(backend: Backend) -> IResource:
    # prometheus_client (about 1 MiB) is loaded when /metrics is first asked for.
    from trainstream.web.metrics import MetricsResource

    return MetricsResource(backend)


class TrackingSite(Site):
    """
    The one ``Site``: notes on the connection, per request, whether the
    client will close it first (the listener's tracked connection has
    ``peer_closes_first``), and checks ``access`` before routing.

    :ivar max_body: bytes of request body kept at most (``LimitedRequest``).
    """

    access: Access | None = None
    full_access_log = False
    max_body = MAX_BODY_BYTES

    def log(self, request: http.Request) -> None:
        """
        The access log, less routine publishing: a training run's batches
        answered 2xx would be most of it (``--access-log`` logs them too).
        """
        if (
            not self.full_access_log
            and request.method == b"POST"
            and request.path == b"/api/events"
            and 200 <= request.code < 300
        ):
            return
        super().log(request)  # type: ignore[no-untyped-call]

    def getResourceFor(self, request: Request) -> IResource:
        transport: Any = request.channel.transport if request.channel is not None else None
        if hasattr(transport, "peer_closes_first"):
            transport.peer_closes_first = request.clientproto == b"HTTP/1.1"
        if self.access is not None:
            refused = self.access.refuse(request)
            if refused is not None:
                return refused
        resource: IResource = super().getResourceFor(request)  # type: ignore[no-untyped-call]
        return resource


def build_site(backend: Backend, config: Config, reactor: IReactorTime) -> Site:
    """
    One ``Site`` for every listener of the server ``backend`` stands for.

    Reads only ``backend.hub`` and ``backend.clients`` until a request comes,
    so it may be built before the runs and ranks exist.

    :param config: the token (``config.resolve_token()``), allowed origins,
        SSE keepalive and retry, client buffer, close timeout, access log.
    :param reactor: the clock of keepalives and close timeouts, and the site's.
    :raises trainstream.errors.ConfigError: if the token file cannot be read.
    """
    hub, clients = backend.hub, backend.clients
    max_body = hub.limits.max_body_bytes
    sse = SSEResource(
        hub, clients, reactor, config.keepalive, config.retry_ms, config.client_buffer
    )
    access = Access(
        config.resolve_token(),
        config.allow_origin,
        backend.status,
        config.resolve_read_tokens(),
    )

    def websocket() -> Any:
        from autobahn.twisted.resource import WebSocketResource

        from trainstream.web.ws import StreamFactory

        factory = StreamFactory(
            hub, clients, reactor, config.close_timeout, config.client_buffer, max_body
        )
        factory.access = access
        return WebSocketResource(factory)

    ws = WebSocketOnly(websocket)
    root = Root(DashboardPage(), sse, ws)
    root.putChild(b"api", RestApi(backend).app.resource())
    root.putChild(b"metrics", Lazy(lambda: _metrics(backend)))
    root.putChild(b"events", sse)
    root.putChild(b"ws", ws)
    root.putChild(b"static", StaticFiles())
    site = TrackingSite(  # type: ignore[no-untyped-call]
        root, reactor=reactor, logFormatter=access_log_line
    )
    site.access = access
    site.full_access_log = config.access_log
    site.max_body = max_body
    site.requestFactory = LimitedRequest
    site.displayTracebacks = False
    site.noisy = False
    # Slow clients (PROTOCOL 6): deadlines no byte resets; 100 Continue after access.
    timeouts = Timeouts(config.header_timeout, config.request_timeout, config.idle_timeout)
    site.protocol = timeouts.channel  # type: ignore[assignment]
    return site
