"""
The terminal clients of a trainstream server (``python -m trainstream``),
built on the client library (:mod:`trainstream.client`):

    tail.py    every event as one JSON line
    watch.py   a live table of runs: a REST snapshot, then the stream
    model.py   what ``watch`` shows, fed snapshots and events (pure)
    render.py  the model as a rich renderable (pure)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainstream.client.http import Endpoint, parse_endpoint

__all__ = ["ServerOptions"]


@dataclass
class ServerOptions:
    """What both commands are told: the server, the filters and the token."""

    url: str
    runs: Sequence[str] = ()
    names: Sequence[str] = ()
    token: str | None = None

    def where(self) -> tuple[Endpoint, list[str], str | None]:
        """
        The server's endpoint, the run globs and the token, with the
        ``?run=`` and ``?token=`` of an SSE URL given as ``url``.
        """
        endpoint = parse_endpoint(self.url)
        runs = list(self.runs) + list(endpoint.query.get("run", ()))
        tokens = endpoint.query.get("token")
        return endpoint, runs, self.token or (tokens[0] if tokens else None)
