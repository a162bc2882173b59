"""
Events (``PROTOCOL.md`` section 2): pure, no reactor, no I/O.

    rules.py     what an event may be: types, fields, the name alphabet, the
                 64-bit range, the NaN strings, the size limits, ``EventError``
    codec.py     strict JSON out; the one decoder for REST bodies and WS messages
    validate.py  ``validate_event``: every path's checks, field by field

Import from here (``from trainstream.events import validate_event``); the
modules above never import this package, so it has no cycle.

Choices made where the protocol leaves room: a request body must be a JSON
*array* (a lone object is refused with a hint to wrap it in ``[...]``);
duplicate keys in one JSON object are refused, over REST and WebSocket alike.
"""

from __future__ import annotations

from trainstream.events.codec import (
    UnsupportedMediaType,
    body_too_large,
    decode_body,
    decode_json,
    encode_event,
    encode_json,
)
from trainstream.events.rules import (
    BAD_NAME_CHAR_RE,
    EVENT_TYPES,
    FIELDS,
    INT_MAX,
    INT_MIN,
    LEVELS,
    MAX_BODY_BYTES,
    MAX_EVENT_BYTES,
    MAX_NAME_LENGTH,
    MAX_RUN_LENGTH,
    NAME_PATTERN,
    NAME_RE,
    NON_FINITE,
    STATES,
    BodyTooLarge,
    EventError,
    Limits,
    non_finite_name,
)
from trainstream.events.validate import (
    metric_events,
    plain_events,
    plain_log,
    validate_event,
    validate_events,
)

__all__ = [
    "BAD_NAME_CHAR_RE",
    "EVENT_TYPES",
    "FIELDS",
    "INT_MAX",
    "INT_MIN",
    "LEVELS",
    "MAX_BODY_BYTES",
    "MAX_EVENT_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_RUN_LENGTH",
    "NAME_PATTERN",
    "NAME_RE",
    "NON_FINITE",
    "STATES",
    "BodyTooLarge",
    "EventError",
    "Limits",
    "UnsupportedMediaType",
    "body_too_large",
    "decode_body",
    "decode_json",
    "encode_event",
    "encode_json",
    "metric_events",
    "non_finite_name",
    "plain_events",
    "plain_log",
    "validate_event",
    "validate_events",
]
