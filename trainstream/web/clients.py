"""
The live clients of one server, so it can count them and close them on stop.
"""

from __future__ import annotations

from typing import Protocol


class Closable(Protocol):
    def close(self, reason: str) -> None:
        """End the stream politely: SSE response finished, WebSocket close frame sent."""


class Clients:
    """Open SSE streams and WebSocket sessions."""

    def __init__(self) -> None:
        self.sse: set[Closable] = set()
        self.ws: set[Closable] = set()

    def counts(self) -> dict[str, int]:
        return {"sse": len(self.sse), "ws": len(self.ws)}

    def close_all(self, reason: str) -> None:
        for client in list(self.sse) + list(self.ws):
            client.close(reason)
