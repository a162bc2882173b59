"""
The one resource tree that every listener serves.

    /            dashboard (and, for seed clients, SSE or WebSocket at the root
                 of the listener whose role is SSE or WebSocket)
    /static/...  the dashboard's files (uPlot's from the uplot-python wheel)
    /api/...     REST (Klein)
    /events      SSE
    /ws          WebSocket
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web import http
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import Request, Site

from trainstream.metrics import MetricsResource
from trainstream.web.access import Access, LimitedRequest
from trainstream.web.dashboard import DashboardPage, StaticFiles
from trainstream.web.rest import RestApi
from trainstream.web.sse import SSEResource
from trainstream.web.ws import StreamFactory

if TYPE_CHECKING:
    from trainstream.service import StreamServer


def listener_role(request: Request) -> str | None:
    """The role of the listener a request arrived on (see ``service.TrackingFactory``)."""
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
            if role in ("ws", "listen") and (
                (request.getHeader(b"upgrade") or b"").lower() == b"websocket"
            ):
                return self.ws
            return self.index
        return NoResource("no such page")


class TrackingSite(Site):
    """
    The one ``Site``: notes on the connection, per request, whether the
    client will close it first (see ``service.TrackedConnection``).
    """

    access: Access | None = None
    full_access_log = False

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


def build_site(server: StreamServer) -> Site:
    """One ``Site`` for every listener of ``server``."""
    config = server.config
    sse = SSEResource(
        server.hub,
        server.clients,
        server.reactor,
        config.keepalive,
        config.retry_ms,
        config.client_buffer,
        config.close_timeout,
    )
    ws = WebSocketResource(
        StreamFactory(
            server.hub, server.clients, server.reactor, config.close_timeout, config.client_buffer
        )
    )
    root = Root(DashboardPage(), sse, ws)
    root.putChild(b"api", RestApi(server).app.resource())
    root.putChild(b"metrics", MetricsResource(server))
    root.putChild(b"events", sse)
    root.putChild(b"ws", ws)
    root.putChild(b"static", StaticFiles())
    site = TrackingSite(root, reactor=server.reactor)  # type: ignore[no-untyped-call]
    site.access = Access(
        server.token,
        config.allow_origin,
        lambda: {p for p in (listener.port_number for listener in server.listeners) if p},
        lambda: bool(server.listeners) and all(li.loopback for li in server.listeners),
    )
    site.full_access_log = config.access_log
    site.requestFactory = LimitedRequest
    site.displayTracebacks = False
    site.noisy = False
    return site
