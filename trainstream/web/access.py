"""
Who may use the site: the bearer token (PROTOCOL 6) and WebSocket origins.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.http import combinedLogFormatter
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from trainstream.events import MAX_BODY_BYTES, body_too_large
from trainstream.web.backend import ServerStatus
from trainstream.web.query import error_response

_log = Logger()

_OPEN_PATHS = {b"/api/health"}
#: Methods that change nothing: what a read token, or a page of another origin, may send.
_READ_METHODS = {b"GET", b"HEAD"}
#: What a token allows (``Access.level_of``).
READ, WRITE = "read", "write"
_LOOPBACK_NAMES = {"localhost", "::1"}


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_given(authorization: bytes, query_tokens: Sequence[bytes]) -> bytes:
    """
    The token a client gave (``b""`` for none): ``Authorization: Bearer``,
    else the first ``?token=`` (for EventSource and browser WebSocket).
    """
    scheme, _, value = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and value.strip():
        return value.strip()
    return query_tokens[0] if query_tokens else b""


def is_websocket_upgrade(request: Request) -> bool:
    """Whether ``Upgrade:`` names ``websocket`` (it may list several protocols)."""
    upgrade = request.getHeader(b"upgrade") or b""
    return any(p.strip().lower() == b"websocket" for p in upgrade.split(b","))


_TOKEN_VALUE = re.compile(rb"(?i)(token=)[^&;#\s\"]*")


def redact(uri: bytes) -> bytes:
    """
    ``uri`` (or a ``Referer``) with every token value replaced, for logs:
    EventSource, browser WebSocket and dashboard clients can only send
    their token in the URL. Each query parameter whose name decodes to
    ``token`` (``tok%65n`` too), and any ``token=...`` anywhere else (a
    fragment, a path, a second ``?``): a log may hide a little too much,
    never a token.
    """
    path, mark, query = uri.partition(b"?")
    if mark:
        parts = []
        for part in re.split(rb"([&;])", query):
            name, eq, _ = part.partition(b"=")
            if eq and unquote_to_bytes(name.replace(b"+", b" ")).strip() == b"token":
                part = name + b"=REDACTED"
            parts.append(part)
        uri = path + mark + b"".join(parts)
    return _TOKEN_VALUE.sub(rb"\1REDACTED", uri)


class _Logged:
    """What the access log line shows of a request: its URI and Referer redacted."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self.method = request.method
        self.uri = redact(request.uri)
        self.clientproto = request.clientproto
        self.code = request.code
        self.sentLength = request.sentLength

    def getClientAddress(self) -> object:
        return self._request.getClientAddress()

    def getHeader(self, name: bytes) -> bytes | None:
        value: bytes | None = self._request.getHeader(name)
        return redact(value) if value is not None and name.lower() == b"referer" else value


def access_log_line(timestamp: str, request: Request) -> str:
    """Twisted's combined log format, with tokens redacted (``redact``)."""
    line: str = combinedLogFormatter(timestamp, _Logged(request))  # type: ignore[no-untyped-call]
    return line


class LimitedRequest(Request):
    """
    A request that keeps at most ``max_body`` bytes of body (its site's
    ``max_body``): twisted.web would otherwise spool any body to a temp file
    before a resource (or the token check) sees the request. Past the limit
    the rest is read and dropped, and the request is answered 413.
    """

    too_large = False
    _received = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # Arguments come from the query string only: a form body is no JSON
        # and is refused (415) by what reads the body, not parsed here.
        self._parsePOSTFormSubmission = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method!r} {redact(self.uri or b'')!r}>"

    @property
    def max_body(self) -> int:
        limit: int = getattr(getattr(self.channel, "site", None), "max_body", MAX_BODY_BYTES)
        return limit

    def render(self, resrc: IResource) -> None:
        super().render(_MethodGuard(resrc))  # type: ignore[no-untyped-call]

    def processingFailed(self, reason: Failure) -> None:
        """A resource failed: log it, answer a JSON 500 (never a traceback)."""
        _log.failure("request {request} failed", reason, request=self)
        if self.finished or self._disconnected:
            return
        if self.startedWriting:
            self.finish()  # type: ignore[no-untyped-call]  # a stream under way just ends
            return
        body = error_response(self, 500, "internal server error (logged by the server)")
        self.setHeader(b"content-length", b"%d" % len(body))  # type: ignore[no-untyped-call]
        self.write(body)  # type: ignore[no-untyped-call]
        self.finish()  # type: ignore[no-untyped-call]

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


class _MethodGuard(Resource):
    """
    Renders ``resource``, answering a method it has no ``render_*`` for
    with a JSON 405 and ``Allow`` (Twisted's own answer is an HTML 405, or
    501 for a method it does not know, such as ``TRACE``).
    """

    isLeaf = True

    def __init__(self, resource: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.resource = resource

    def render(self, request: Request) -> bytes | int:
        try:
            body: bytes | int = self.resource.render(request)
        except UnsupportedMethod as e:
            allowed = list(e.allowedMethods)
            if request.method == b"HEAD" and b"GET" in allowed:
                raise  # Twisted answers HEAD as GET without the body
            if b"GET" in allowed and b"HEAD" not in allowed:
                allowed.append(b"HEAD")
            request.setHeader(b"allow", b", ".join(allowed))
            method = request.method.decode("latin-1")
            names = ", ".join(m.decode("latin-1") for m in allowed) or "none"
            return error_response(
                request,
                405,
                f"{method} is not allowed on {request.path.decode('latin-1')}; allowed: {names}",
            )
        return body


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
        read_tokens: Iterable[str] = (),
    ) -> None:
        """
        :param status: the server's listeners now (``Backend.status``): its
            own ports, and whether every one is bound to loopback.
        :param read_tokens: tokens that may read but not write (only with ``token``).
        """
        self.token = token.encode() if token is not None else None
        self.read_tokens = tuple(t.encode() for t in read_tokens)
        self.allow_origin = {o.rstrip("/").lower() for o in allow_origin}
        self.allow_hosts = {urlsplit(o).hostname for o in self.allow_origin} - {None}
        self.status = status

    def refuse(self, request: Request) -> IResource | None:
        """An error page if the request may not go on, else ``None``."""
        if isinstance(request, LimitedRequest) and request.too_large:
            return ErrorPage(413, body_too_large(None, request.max_body).message)
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            return ErrorPage(400, "the path is not UTF-8 once its %-escapes are decoded")
        host_header = (request.getHeader(b"host") or b"").decode("latin-1")
        try:
            host = urlsplit("//" + host_header).hostname
        except ValueError:
            return ErrorPage(400, f"Host header {host_header!r} is not a host name or address")
        if self.status().loopback_only:
            # Bound to loopback only: a Host that is not a loopback name is a
            # page from elsewhere reaching us through DNS rebinding.
            if host and not is_loopback_host(host) and host not in self.allow_hosts:
                return ErrorPage(
                    403,
                    f"Host {host!r} refused: this server listens on loopback only; "
                    "name it with --allow-origin (e.g. behind a proxy) to allow it",
                )
        level = self.level_of(self._given_token(request))
        if level is None and request.path not in _OPEN_PATHS:
            return ErrorPage(
                401,
                "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                "(or ?token=TOKEN for EventSource and WebSocket clients)",
                {b"www-authenticate": b'Bearer realm="trainstream"'},
            )
        upgrade = is_websocket_upgrade(request)
        writes = request.method not in _READ_METHODS
        if upgrade or writes:
            origin = request.getHeader(b"origin")
            what = "WebSocket upgrade" if upgrade else f"{request.method.decode('latin-1')}"
            if origin is not None and not self.origin_allowed(request, origin.decode("latin-1")):
                return ErrorPage(
                    403,
                    f"{what} refused from Origin {origin.decode('latin-1')!r}: not this "
                    "server's; start the server with --allow-origin ORIGIN to allow it",
                )
            # A browser that sends no Origin still says where the page came from.
            fetch_site = (request.getHeader(b"sec-fetch-site") or b"").lower()
            if origin is None and fetch_site in (b"cross-site", b"same-site"):
                return ErrorPage(403, f"{what} refused: sent by a page of another site")
        if writes and level == READ:
            return ErrorPage(
                403,
                f"{request.method.decode('latin-1')} refused: this token may read but not "
                "write; publishing and deleting need the token given with --token",
            )
        return None

    def level_of(self, given: bytes) -> str | None:
        """
        What the token ``given`` (``b""`` for none) allows: ``WRITE``
        (everything; also with no token set), ``READ`` (a read token), or
        ``None``. Every token is compared, in constant time.
        """
        if self.token is None:
            return WRITE
        level = WRITE if hmac.compare_digest(given, self.token) else None
        for read in self.read_tokens:
            if hmac.compare_digest(given, read) and level is None:
                level = READ
        return level

    def _given_token(self, request: Request) -> bytes:
        return token_given(
            request.getHeader(b"authorization") or b"", (request.args or {}).get(b"token", [])
        )

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
