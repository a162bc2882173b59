"""
``python -m trainstream tail``: print each event as one compact JSON line,
live and resuming (the SSE client), or the stored history (``--once``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from typing import IO, Any

from trainstream.cli import ServerOptions
from trainstream.client.http import HTTP, ClientError, Endpoint, describe, error_text
from trainstream.client.sse import ConnState, Reset, SSEClient

__all__ = ["TailOptions", "compact", "run_tail"]


def compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass
class TailOptions(ServerOptions):
    types: Sequence[str] = ()
    after: int | None = None
    limit: int | None = None
    once: bool = False
    quiet: bool = False


def run_tail(options: TailOptions, out: IO[str], err: IO[str]) -> int:
    """
    Print each event as one JSON line on ``out`` (flushed per line); a reset
    is printed there too, as ``{"type": "reset", "reason", "oldest_id"}``.
    Connection news goes to ``err`` unless ``quiet``.
    """
    endpoint, runs, token = options.where()
    printed = 0

    def emit(obj: object) -> None:
        out.write(compact(obj) + "\n")
        out.flush()

    if options.once:
        return _tail_once(endpoint, token, runs, options, emit)

    def news(state: ConnState) -> None:
        if options.quiet:
            return
        if state.status == "reconnecting" and state.retry_at is not None:
            wait = max(0.0, state.retry_at - time.monotonic())
            err.write(f"trainstream tail: {state.detail}; reconnecting in {wait:.1f}s\n")
            err.flush()

    client = SSEClient(
        endpoint, token, runs, options.names, options.types, options.after, on_state=news
    )
    for item in client.items():
        if isinstance(item, Reset):
            emit(item.to_json())
            continue
        emit(item.data)
        printed += 1
        if options.limit is not None and printed >= options.limit:
            client.close()
            break
    return 0


def _tail_once(
    endpoint: Endpoint,
    token: str | None,
    runs: Sequence[str],
    options: TailOptions,
    emit: Callable[[object], None],
) -> int:
    """The stored events after ``--after`` (default 0) up to now, then exit."""
    http_ = HTTP(endpoint, token)
    after = options.after or 0
    printed = 0
    query: dict[str, Any] = {"run": list(runs), "name": list(options.names)}
    if options.types:
        query["type"] = ",".join(options.types)
    end: int | None = None
    while True:
        try:
            status, body = http_.get_json("/api/events", {**query, "after": after, "limit": 1000})
        except (OSError, HTTPException) as e:  # --once does not retry: say why it stops
            raise ClientError(f"cannot reach {endpoint.base}: {describe(e)}") from None
        if status != 200 or not isinstance(body, dict):
            raise ClientError(error_text(status, body))
        if end is None:
            end = int(body.get("last_id", 0))
        events = [e for e in body.get("events", []) if int(e["id"]) <= end]
        for event in events:
            emit(event)
            printed += 1
            if options.limit is not None and printed >= options.limit:
                return 0
        if len(events) < len(body.get("events", [])) or not events:
            return 0
        after = int(events[-1]["id"])
