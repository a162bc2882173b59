"""
Where a server is, and the little HTTP the clients speak to it: blocking,
over ``http.client`` (no reactor), through a ``connect`` function that tests
replace with a fake (see :data:`Connect`).

A server URL may be given as its base (``http://host:port``, any listener:
each serves everything), or as a URL under it (``.../events?run=x``,
``.../api``, ``.../api/health``, ``host:port``): :func:`parse_endpoint`
finds the base in all of them.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlencode, urlsplit

__all__ = [
    "CONNECT_TIMEOUT",
    "HTTP",
    "TOKEN_ENV",
    "ClientError",
    "Connect",
    "Connection",
    "Endpoint",
    "KeepAlive",
    "Response",
    "URLError",
    "api_base",
    "connect",
    "describe",
    "error_text",
    "parse_endpoint",
    "quote_segment",
]

#: Where the terminal clients read a token from when ``--token`` is not given.
TOKEN_ENV = "TRAINSTREAM_TOKEN"
#: Seconds to connect, send a request and get its answer.
CONNECT_TIMEOUT = 10.0
#: What a connection that could not be made or broke raises.
UNREACHABLE = (OSError, http.client.HTTPException)


class ClientError(Exception):
    """A refusal that retrying will not fix (a bad URL, a 401, a bad filter)."""


class URLError(ClientError, ValueError):
    """A URL that cannot name a trainstream server."""


# Where the server is


@dataclass(frozen=True)
class Endpoint:
    """
    Where the server is: its base URL (scheme, host, port, path prefix). Any
    listener serves everything, so ``/events`` and ``/api`` hang off the base.
    """

    scheme: str
    host: str
    port: int
    prefix: str = ""
    #: ``?run=`` and ``?token=`` found in an SSE URL given on the command line.
    query: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def parse_endpoint(url: str) -> Endpoint:
    """
    The server's base in ``http://host:port``, ``http://host:port/``,
    ``.../events?run=x``, ``.../api``, ``.../api/health`` or ``host:port``.

    :raises URLError: for another scheme, no host or a bad port.
    """
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise URLError(f"unsupported URL scheme {parts.scheme!r} in {url!r}: use http or https")
    if not parts.hostname:
        raise URLError(f"no host in {url!r}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise URLError(f"bad port in {url!r}") from None
    path = parts.path.rstrip("/")
    segments = path.split("/")
    for marker in ("events", "api", "ws"):
        if marker in segments:
            path = "/".join(segments[: segments.index(marker)])
            break
    query = {k: tuple(v) for k, v in parse_qs(parts.query).items()}
    return Endpoint(scheme, parts.hostname, port, path, query)


def api_base(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path prefix)`` of a server URL (see :func:`parse_endpoint`)."""
    endpoint = parse_endpoint(url)
    return endpoint.scheme, endpoint.host, endpoint.port, endpoint.prefix


def quote_segment(name: str) -> str:
    """A run or metric name as one path segment (``/`` as ``%2F``)."""
    return quote(name, safe="")


# The transport


class Response(Protocol):
    """What the clients read of an answer (``http.client.HTTPResponse``)."""

    status: int

    def read(self) -> bytes: ...
    def readline(self) -> bytes: ...
    def getheader(self, name: str) -> str | None: ...


class Connection(Protocol):
    """
    One HTTP/1.1 connection (``http.client.HTTPConnection``); ``sock`` is
    its socket once connected (``None`` for a fake).
    """

    sock: socket.socket | None

    def request(
        self, method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] = ...
    ) -> None: ...
    def getresponse(self) -> Response: ...
    def close(self) -> None: ...


#: Opens a connection to an endpoint with a timeout (seconds): :func:`connect`,
#: or in tests a fake that answers from a script, with no socket.
Connect = Callable[[Endpoint, float], Connection]


def connect(endpoint: Endpoint, timeout: float) -> Connection:
    """An ``http.client`` connection to ``endpoint`` (made at its first request)."""
    if endpoint.scheme == "https":
        return http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=timeout)
    return http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)


def headers(token: str | None, **extra: str) -> dict[str, str]:
    """A request's headers: ``User-Agent``, the bearer token if any, and ``extra``."""
    out = {"User-Agent": "trainstream-cli", **extra}
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


def decode(raw: bytes) -> Any:
    """A JSON answer, or ``None`` when it is empty or not JSON."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def error_text(status: int, body: object, fallback: str = "") -> str:
    """``HTTP 404: <the server's "error">`` for an answer that is no success."""
    message = body.get("error") if isinstance(body, dict) else None
    return f"HTTP {status}: {message or fallback or 'request refused'}"


def describe(error: BaseException) -> str:
    """A failed connection in a few words, for a status line."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    text = str(error) or type(error).__name__
    return text if len(text) < 80 else text[:77] + "..."


class HTTP:
    """Blocking JSON GETs against one server, a connection each."""

    def __init__(
        self,
        endpoint: Endpoint,
        token: str | None,
        timeout: float = CONNECT_TIMEOUT,
        connect: Connect = connect,
    ) -> None:
        self.endpoint = endpoint
        self.token = token
        self.timeout = timeout
        self.connect = connect

    def get_json(self, path: str, query: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """
        ``(status, body)`` of ``GET path``; ``body`` is ``None`` unless JSON.

        :raises ClientError: on a 401 (a token is needed, or the wrong one).
        :raises OSError, http.client.HTTPException: when unreachable.
        """
        target = self.endpoint.prefix + path
        if query:
            target += "?" + urlencode(query, doseq=True)
        conn = self.connect(self.endpoint, self.timeout)
        try:
            conn.request("GET", target, headers=headers(self.token, Accept="application/json"))
            response = conn.getresponse()
            body = decode(response.read())
        finally:
            conn.close()
        if response.status == 401:
            raise ClientError(error_text(401, body, "a token is needed: --token or $" + TOKEN_ENV))
        return response.status, body


class KeepAlive:
    """
    Requests on one keep-alive connection, made again after any failure: the
    Publisher's transport.
    """

    def __init__(
        self, endpoint: Endpoint, timeout: float = CONNECT_TIMEOUT, connect: Connect = connect
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect = connect
        self._connection: Connection | None = None

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """
        ``(status, answer)`` of ``POST prefix + path``.

        :raises OSError, http.client.HTTPException: when unreachable (the
            connection is dropped then).
        """
        try:
            if self._connection is None:
                self._connection = self.connect(self.endpoint, self.timeout)
            self._connection.request("POST", self.endpoint.prefix + path, body, headers)
            response = self._connection.getresponse()
            return response.status, response.read()
        except UNREACHABLE:
            self.close()
            raise

    def close(self) -> None:
        """Drop the connection (the next request makes a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
