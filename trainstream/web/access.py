"""
Who may use the site: the bearer token (PROTOCOL 6) and WebSocket origins.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from trainstream.events import MAX_BODY_BYTES, body_too_large
from trainstream.web.backend import ServerStatus
from trainstream.web.query import error_response

_OPEN_PATHS = {b"/api/health"}
_LOOPBACK_NAMES = {"localhost", "::1"}


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LimitedRequest(Request):
    """
    A request that keeps at most ``max_body`` bytes of body (its site's
    ``max_body``): twisted.web would otherwise spool any body to a temp file
    before a resource (or the token check) sees the request. Past the limit
    the rest is read and dropped, and the request is answered 413.
    """

    too_large = False
    _received = 0

    @property
    def max_body(self) -> int:
        limit: int = getattr(getattr(self.channel, "site", None), "max_body", MAX_BODY_BYTES)
        return limit

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


class ErrorPage(Resource):
    """A JSON error answer (never a traceback)."""

    isLeaf = True

    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.code = code
        self.message = message
        self.headers = headers or {}

    def render(self, request: Request) -> bytes:
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return error_response(request, self.code, self.message)


class Access:
    """
    Checks every request before routing: the token, when one is set (every
    path but ``/api/health``; ``?token=`` for EventSource and WebSocket
    clients that cannot set headers), and the ``Origin`` of WebSocket
    upgrades (the server's own host on one of its ports, or ``allow_origin``).
    """

    def __init__(
        self,
        token: str | None,
        allow_origin: Iterable[str],
        status: Callable[[], ServerStatus],
    ) -> None:
        """
        :param status: the server's listeners now (``Backend.status``): its
            own ports, and whether every one is bound to loopback.
        """
        self.token = token.encode() if token is not None else None
        self.allow_origin = {o.rstrip("/").lower() for o in allow_origin}
        self.allow_hosts = {urlsplit(o).hostname for o in self.allow_origin} - {None}
        self.status = status

    def refuse(self, request: Request) -> IResource | None:
        """An error page if the request may not go on, else ``None``."""
        if isinstance(request, LimitedRequest) and request.too_large:
            return ErrorPage(413, body_too_large(None, request.max_body).message)
        if self.status().loopback_only:
            # Bound to loopback only: a Host that is not a loopback name is a
            # page from elsewhere reaching us through DNS rebinding.
            host = urlsplit("//" + (request.getHeader(b"host") or b"").decode("latin-1")).hostname
            if host and not is_loopback_host(host) and host not in self.allow_hosts:
                return ErrorPage(
                    403,
                    f"Host {host!r} refused: this server listens on loopback only; "
                    "name it with --allow-origin (e.g. behind a proxy) to allow it",
                )
        if self.token is not None and request.path not in _OPEN_PATHS:
            if not hmac.compare_digest(self._given_token(request), self.token):
                return ErrorPage(
                    401,
                    "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                    "(or ?token=TOKEN for EventSource and WebSocket clients)",
                    {b"www-authenticate": b'Bearer realm="trainstream"'},
                )
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            origin = request.getHeader(b"origin")
            if origin is not None and not self.origin_allowed(request, origin.decode("latin-1")):
                return ErrorPage(
                    403,
                    f"WebSocket upgrade refused from Origin {origin.decode('latin-1')!r}: "
                    "not this server's; start the server with --allow-origin ORIGIN to allow it",
                )
        return None

    def _given_token(self, request: Request) -> bytes:
        auth = request.getHeader(b"authorization") or b""
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return value.strip()
        values = (request.args or {}).get(b"token")
        return values[0] if values else b""

    def origin_allowed(self, request: Request, origin: str) -> bool:
        if origin.rstrip("/").lower() in self.allow_origin:
            return True
        try:
            parts = urlsplit(origin)
            host_header = (request.getHeader(b"host") or b"").decode("latin-1")
            own_host = urlsplit("//" + host_header).hostname
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        return (
            parts.scheme in ("http", "https")
            and parts.hostname is not None
            and parts.hostname == own_host
            and port in self.status().ports
        )
