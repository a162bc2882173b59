"""
How events go on the wire: SSE blocks and WebSocket ``events`` frames.

Each is rendered once per batch and filter and shared by every client that
gets the same records (``hub.SharedFormat``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trainstream.events import encode_json
from trainstream.store import Record


def annotated(record: Record, coalesced: Mapping[int, int]) -> str:
    """The event's JSON, with ``"coalesced": n`` when values were folded into it."""
    n = coalesced.get(record.id)
    return record.json if not n else f'{record.json[:-1]},"coalesced":{n}}}'


def render_sse(records: Sequence[Record], coalesced: Mapping[int, int]) -> bytes:
    """``id:``, ``event:``, ``data:`` and a blank line for each record."""
    return "".join(
        f"id: {r.id}\nevent: {r.type}\ndata: {annotated(r, coalesced)}\n\n" for r in records
    ).encode()


def sse_notice(event: str, data: Mapping[str, object]) -> bytes:
    """An SSE block without an id (``reset``, ``overflow``)."""
    return f"event: {event}\ndata: {encode_json(data)}\n\n".encode()


def render_events(records: Sequence[Record], coalesced: Mapping[int, int]) -> bytes:
    """One WebSocket ``{"op": "events", "events": [...]}`` frame."""
    body = ",".join(annotated(r, coalesced) for r in records)
    return f'{{"op":"events","events":[{body}]}}'.encode()
