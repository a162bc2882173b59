"""
Where the monitor's server is: a URL, a ``StreamServer`` object, or the
process-wide embedded server, whatever it is at the moment (a desktop app
that gets and releases the server for each training run gets a new server,
perhaps on new ports, each time). Read at every attempt, never cached past
what the server says.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from attrs import frozen

from trainstream.client.http import TOKEN_ENV, parse_endpoint

__all__ = ["DEFAULT_URL", "Source", "Urls"]

#: The URL watched when no server is given and none runs in this process.
DEFAULT_URL = "http://127.0.0.1:8890"
#: Where a URL is read from before the default (as the terminal clients do).
URL_ENV = "TRAINSTREAM_URL"


@frozen
class Urls:
    """``api``: the REST base (``.../api``); ``sse``: the stream; ``ws``: the socket."""

    api: str
    sse: str
    ws: str


def _from_base(url: str) -> Urls:
    endpoint = parse_endpoint(url)
    base = endpoint.base
    ws_scheme = "wss" if endpoint.scheme == "https" else "ws"
    return Urls(base + "/api", base + "/events", ws_scheme + base[len(endpoint.scheme) :] + "/ws")


def _from_server_urls(urls: dict[str, str]) -> Urls | None:
    try:
        return Urls(urls["rest"], urls["sse"], urls["ws"])
    except KeyError:
        return None


class Source:
    """
    :param target: a base URL (``http://host:port``, see
        :func:`~trainstream.client.http.parse_endpoint`); a server object
        (``trainstream.get_stream_server()``'s); the manager
        (``trainstream.get_stream_server_manager()``): whichever server it
        runs at the moment, else the last one seen; or ``None``: the same
        while this process runs an embedded server, else
        ``$TRAINSTREAM_URL``, else :data:`DEFAULT_URL`.
    :param token: the bearer token; by default the server's own (a server
        object or the embedded one), or ``$TRAINSTREAM_TOKEN`` for a URL.
    :raises ValueError: for a URL that cannot name a server (one line).
    """

    def __init__(self, target: object, token: str | None, runs: Sequence[str]) -> None:
        self._token = token
        self.runs = tuple(runs)
        self._fixed: Urls | None = None
        self._server: Any = None
        self._manager: Any = None
        self._last: Urls | None = None
        if isinstance(target, str):
            self._fixed = _from_base(target)  # URLError is a ValueError
        elif hasattr(target, "is_server_running"):
            self._manager = target
        elif target is not None:
            if not hasattr(target, "urls"):
                raise TypeError(
                    "StreamMonitor needs a server (trainstream.get_stream_server()), "
                    f"its manager, a URL or None, not {type(target).__name__}"
                )
            self._server = target

    @property
    def description(self) -> str:
        if self._fixed is not None:
            return self._fixed.api.removesuffix("/api")
        return "the embedded server"

    def _live_server(self) -> Any:
        if self._server is not None:
            return self._server
        manager = self._manager
        if manager is None:
            import sys

            embedded = sys.modules.get("trainstream.embedded")
            if embedded is None:
                return None  # this process never started one: nothing to follow
            manager = embedded.get_stream_server_manager()
        return manager.server

    def urls(self) -> Urls | None:
        """Where to connect now; ``None`` if there is nowhere to."""
        if self._fixed is not None:
            return self._fixed
        server = self._live_server()
        if server is not None:
            urls = _from_server_urls(dict(server.urls))
            if urls is not None:
                self._last = urls
                return urls
        if self._last is not None or self._server is not None or self._manager is not None:
            return self._last  # stopped: where it was (it may come back there)
        return _from_base(os.environ.get(URL_ENV) or DEFAULT_URL)

    def stream_url(self, urls: Urls) -> str:
        if not self.runs or self.runs == ("*",):
            return urls.sse
        return urls.sse + "?" + urlencode([("run", r) for r in self.runs])

    def token(self) -> str | None:
        if self._token is not None:
            return self._token
        server = self._live_server() if self._fixed is None else None
        if server is not None:
            config = getattr(server, "config", None)
            try:
                token = config.resolve_token() if config is not None else None
            except Exception:  # a token file gone: connect without, 401 says why
                token = None
            if token:
                return str(token)
            read = getattr(config, "read_token", ())
            return str(read[0]) if read else None
        return os.environ.get(TOKEN_ENV) or None
