"""
What a client asks for, read in one place, and how the web layer answers
JSON: query parameters (integers, event ids, filters) for REST, SSE and
WebSocket alike, and every JSON answer and error body.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from trainstream.errors import DiskFullError, StoreError
from trainstream.events import EVENT_TYPES, encode_json
from trainstream.store.filter import Filter

_INT64_MAX = 2**63 - 1
#: An integer as a query parameter or header gives it: ASCII digits, an
#: optional ``-``; no sign ``+``, no blanks, no ``_``, no other digits.
_INTEGER_RE = re.compile(r"-?[0-9]{1,40}")

Args = Mapping[bytes, Sequence[bytes]]


class BadQueryError(ValueError):
    """
    A query (parameter, header, subscribe field) a client got wrong: 400
    ``{"error", "parameter"}`` (``parameter`` when there is one to name).
    """

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": str(self)}
        if self.parameter is not None:
            body["parameter"] = self.parameter
        return body


def json_bytes(request: IRequest, body: bytes, code: int = 200) -> bytes:
    """Answer ``body`` (JSON text already) with ``code``, never cached."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


def json_response(request: IRequest, obj: object, code: int = 200) -> bytes:
    """Answer ``obj`` as JSON with ``code``."""
    return json_bytes(request, encode_json(obj).encode(), code)


def error_response(request: IRequest, code: int, message: str, **extra: object) -> bytes:
    """An error answer: ``{"error": message, ...extra}`` with ``code``."""
    return json_response(request, {"error": message, **extra}, code)


def store_failed(request: IRequest, failure: Failure) -> bytes:
    """
    The answer when the history could not do what was asked (nothing of it
    was stored): 507 for a full disk, else 503; both say to try again.
    """
    failure.trap(StoreError)
    error = failure.value
    code = 507 if isinstance(error, DiskFullError) else 503
    request.setHeader(b"retry-after", b"5")
    return error_response(request, code, str(error))


def bad_query(request: IRequest, error: BadQueryError) -> bytes:
    """The 400 answer to ``error``."""
    return json_response(request, error.to_json(), 400)


def values(args: Args, key: str) -> tuple[str, ...]:
    """Every value of a repeatable, comma-separated parameter (``?run=a,b&run=c``)."""
    out: list[str] = []
    for raw in args.get(key.encode(), ()):
        for part in raw.decode("utf-8", "replace").split(","):
            if part.strip():
                out.append(part.strip())
    return tuple(out)


def single_param(args: Args, name: str) -> str | None:
    """The one value of the parameter ``name``, or ``None`` when absent."""
    given = args.get(name.encode())
    if not given:
        return None
    if len(given) > 1:
        raise BadQueryError(
            f"query parameter {name} is given {len(given)} times; give it once", name
        )
    return given[0].decode("utf-8", "replace")


def _integer(raw: str) -> int | None:
    """``raw`` as an integer (``_INTEGER_RE``), else ``None``."""
    return int(raw) if _INTEGER_RE.fullmatch(raw) else None


def int_param(args: Args, name: str, minimum: int, maximum: int = _INT64_MAX) -> int | None:
    """
    The integer query parameter ``name`` in ``[minimum, maximum]``, or
    ``None`` when absent.

    An empty value (``?name=``) is no integer: it is refused like any
    other, not taken as absent, as the OpenAPI document says (an integer,
    ``allowEmptyValue`` false).

    :raises BadQueryError: naming ``name`` when it is repeated or not such an integer.
    """
    raw = single_param(args, name)
    if raw is None:
        return None
    value = _integer(raw)
    if value is None or not minimum <= value <= maximum:
        bounds = f">= {minimum}" if maximum == _INT64_MAX else f"from {minimum} to {maximum}"
        raise BadQueryError(
            f"query parameter {name} must be an integer {bounds}, got {raw[:40]!r}", name
        )
    return value


def choice_param(args: Args, name: str, choices: Sequence[str]) -> str | None:
    """
    The query parameter ``name``, one of ``choices``, or ``None`` when absent.

    :raises BadQueryError: naming ``name`` when it is repeated, empty or another value.
    """
    raw = single_param(args, name)
    if raw is None or raw in choices:
        return raw
    shown = " or ".join(repr(c) for c in choices)
    raise BadQueryError(f"query parameter {name} must be {shown}, got {raw[:40]!r}", name)


def parse_event_id(raw: str, what: str) -> int:
    """
    An event id a client resumes after, given other than as a query
    parameter (the ``Last-Event-ID`` header).

    :raises BadQueryError: naming ``what``.
    """
    value = _integer(raw)
    if value is None or value > _INT64_MAX:
        raise BadQueryError(f"{what} must be an integer event id, got {raw[:40]!r}")
    if value < 0:
        raise BadQueryError(f"{what} must be >= 0, got {value}")
    return value


def filter_from_lists(
    runs: Sequence[str] = (), names: Sequence[str] = (), types: Sequence[str] = ()
) -> Filter:
    """The one way REST, SSE and WebSocket turn client input into a ``Filter``."""
    for kind, given in (("runs", runs), ("names", names), ("types", types)):
        if isinstance(given, str | bytes) or not all(isinstance(v, str) for v in given):
            raise BadQueryError(f"{kind!r} must be a list of strings")
    unknown = [t for t in types if t != "*" and t not in EVENT_TYPES]
    if unknown:
        raise BadQueryError(
            f"unknown event type {unknown[0]!r}; types are {', '.join(sorted(EVENT_TYPES))}"
        )
    return Filter(runs=tuple(runs), names=tuple(names), types=tuple(types))


def query_filter(args: Args) -> Filter:
    """The filter of ``?run=&name=&type=`` (SSE and ``GET /api/events``)."""
    try:
        return filter_from_lists(
            runs=values(args, "run"), names=values(args, "name"), types=values(args, "type")
        )
    except BadQueryError as e:
        raise BadQueryError(str(e), "type") from None  # the only one a value can be wrong in


def resume_id(request: IRequest) -> int | None:
    """The id an SSE client resumes after: ``Last-Event-ID``, else ``?last_event_id=``."""
    header = request.getHeader(b"last-event-id")
    if header:
        return parse_event_id(header.decode("ascii", "replace").strip(), "Last-Event-ID")
    return int_param(request.args or {}, "last_event_id", 0)
