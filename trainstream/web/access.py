"""
Who may use the site: the bearer token (PROTOCOL 6) and WebSocket origins.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from trainstream.events import encode_json

_OPEN_PATHS = {b"/api/health"}


class ErrorPage(Resource):
    """A JSON error answer (never a traceback)."""

    isLeaf = True

    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.code = code
        self.message = message
        self.headers = headers or {}

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return encode_json({"error": self.message}).encode()


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
        own_ports: Callable[[], set[int]],
    ) -> None:
        self.token = token.encode() if token is not None else None
        self.allow_origin = {o.rstrip("/").lower() for o in allow_origin}
        self.own_ports = own_ports

    def refuse(self, request: Request) -> IResource | None:
        """An error page if the request may not go on, else ``None``."""
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
            and port in self.own_ports()
        )
