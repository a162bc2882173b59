"""
The JSON codec: what the server writes (always strict JSON) and the one
decoder for what clients send, REST bodies and WebSocket messages alike.

The decoder sees every key of every object (``object_pairs_hook``), so a
duplicate key is refused wherever it hides (in a nested object, after a
space before its colon, on another line); the same problem gets the same
text over REST (400) and WebSocket (an ``error`` op). Measured on 2000-event
batches of metrics, it decodes about 650,000 events/s, as fast as the
former scan-then-count heuristic it replaces and far above what ingest needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import NoReturn

from trainstream.events.rules import (
    DEFAULT_LIMITS,
    BodyTooLarge,
    EventError,
    Limits,
    non_finite_name,
    show,
)

# --- encoding ---------------------------------------------------------------

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _replace_non_finite(obj: object, seen: set[int]) -> object:
    """
    Copy ``obj`` with non-finite floats turned into their protocol strings.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else non_finite_name(obj)
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in seen:
            raise ValueError("Circular reference detected")
        seen.add(id(obj))
        try:
            if isinstance(obj, dict):
                return {k: _replace_non_finite(v, seen) for k, v in obj.items()}
            return [_replace_non_finite(v, seen) for v in obj]
        finally:
            seen.discard(id(obj))
    return obj


def encode_json(obj: object) -> str:
    """
    Encode ``obj`` as compact JSON text (not ASCII-escaped).

    Float NaN and infinities anywhere in ``obj`` are written as the strings
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, so the text is always
    strict JSON.

    :raises TypeError: for objects JSON cannot represent.
    """
    try:
        return _encoder.encode(obj)
    except ValueError:
        # Out of range float values (allow_nan=False), or a circular
        # reference: the second attempt raises again in the latter case.
        return _encoder.encode(_replace_non_finite(obj, set()))


_METRIC_KEYS = ("id", "type", "run", "time", "name", "step", "value")
_string = json.encoder.encode_basestring  # C; escapes what JSON needs, keeps non-ASCII
#: The last metric time written, and its text: the metrics of one ``log``
#: call (and often a whole batch) share their time, and a shortest ``repr``
#: of a Unix time costs about 0.6 us. Replaced whole, so any thread reads a
#: matching pair.
_last_time: tuple[float, str] = (math.nan, "")


def encode_event(event: Mapping[str, object]) -> str:
    """
    Encode one event as compact JSON text; see :func:`encode_json`.

    A metric event with exactly the usual fields in the usual order (what
    validation and ``Run.log`` produce) is written directly: it is most of
    the traffic, and this is several times faster than the encoder, with the
    same text (floats by ``repr``, as ``json`` writes them).
    """
    global _last_time
    if type(event) is dict and event.get("type") == "metric" and tuple(event) == _METRIC_KEYS:
        time_, step, value = event["time"], event["step"], event["value"]
        if (
            type(time_) is float
            and math.isfinite(time_)
            and type(step) is int
            and (type(value) is int or (type(value) is float and math.isfinite(value)))
        ):
            last = _last_time
            # Equal floats have one repr, but for 0.0 and -0.0 (NaN is never equal).
            if time_ == last[0] and time_:
                time_text = last[1]
            else:
                time_text = repr(time_)
                _last_time = (time_, time_text)
            return (
                f'{{"id":{event["id"]},"type":"metric","run":{_string(event["run"])},'
                f'"time":{time_text},"name":{_string(event["name"])},"step":{step},'
                f'"value":{value!r}}}'
            )
    return encode_json(event if isinstance(event, dict) else dict(event))


# --- decoding ---------------------------------------------------------------


class _RefusedError(ValueError):
    """Raised inside the scanner; ``decode_json`` says which text it was."""


def _refuse_constant(name: str) -> NoReturn:
    raise _RefusedError(f'{name} is not a JSON number; send the string "{name}" instead')


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RefusedError(f"duplicate key {show(key)} in an object")
            seen.add(key)
    return result


_decoder = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_object)
#: The C decoder with no hook: duplicate keys collapse, unseen (see _decode).
_plain_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
#: How far into the text ``_decode`` looks for a metric event.
_SNIFF = 300


def _decode(text: str) -> object:
    """
    ``_decoder.decode(text)``, a quarter faster for the usual batch of
    metrics: a list of events, or an object whose lists hold them (a
    WebSocket message), with no nested object and no colon in a string.

    Text that begins with a metric event is read by the plain C decoder,
    then the pairs of the objects at those levels are counted. Outside
    strings a colon ends a key, so the text has at least as many colons as
    pairs, more if a pair is nested deeper or a string holds one, and the
    count falls short of the pairs by any duplicate. Equal counts: every
    pair was counted and none collapsed. Anything else (and other text,
    where strings with colons are common: log lines) is decoded by the
    hooked decoder, which names the duplicate; a batch that begins with a
    metric and then fails the count is decoded twice.
    """
    if '"metric"' in text[:_SNIFF]:
        try:
            value = _plain_decoder.decode(text)
        except ValueError:
            return _decoder.decode(text)  # its error names a duplicate before a later fault
        objects: list[dict[str, object]] = []
        if type(value) is list:
            objects = [item for item in value if type(item) is dict]
        elif type(value) is dict:
            objects = [value]
            for member in value.values():
                if type(member) is list:
                    objects.extend(item for item in member if type(item) is dict)
        if text.count(":") == sum(map(len, objects)):
            return value
    return _decoder.decode(text)


def decode_json(
    data: bytes, subject: str = "body", expected: str = "a JSON array of events"
) -> object:
    """
    Decode strict UTF-8 JSON from a client: no ``NaN``/``Infinity``
    literals, no duplicate keys, no byte order mark.

    :param subject: what ``data`` is, to begin the error message with
        (``"body"`` for REST, ``"message"`` for WebSocket).
    :param expected: what to send instead of nothing.
    :raises EventError: naming the problem; its ``detail`` is the same
        whatever the subject.
    """

    def refuse(problem: str) -> NoReturn:
        raise EventError(f"{subject} {problem}", detail=problem)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        refuse(f"is not valid UTF-8: {e.reason} at byte {e.start}")
    if text.startswith("\ufeff"):
        refuse("starts with a byte order mark; send JSON without it")
    if not text or text.isspace():
        refuse(f"is empty; send {expected}")
    try:
        return _decode(text)
    except json.JSONDecodeError as e:
        refuse(f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})")
    except _RefusedError as e:
        refuse(f"is not valid JSON: {e}")
    except RecursionError:
        refuse("is not valid JSON: nested too deeply")
    except ValueError:  # int() refusing a literal of over 4300 digits
        refuse("is not valid JSON: a number has too many digits")


class UnsupportedMediaType(EventError):  # noqa: N818 (named as HTTP names it)
    """The body is not declared JSON: maps to HTTP 415."""


def _check_content_type(content_type: str | None) -> None:
    """
    Accept ``application/json`` and ``application/*+json`` only.

    A missing header is refused too: a web page of any site may send a
    "simple" cross-site request (no preflight) only as ``text/plain``, a
    form, or with no type, so none of those may publish.

    :raises UnsupportedMediaType: naming the type, or saying it is missing.
    """
    if content_type is None:
        raise UnsupportedMediaType('Content-Type is missing: send the events as "application/json"')
    media_type, *params = content_type.split(";")
    kind, _, subtype = media_type.strip().lower().partition("/")
    plain = kind == "application" and subtype == "json"
    suffixed = kind == "application" and len(subtype) > 5 and subtype.endswith("+json")
    if not (plain or suffixed):
        raise UnsupportedMediaType(
            f'Content-Type {show(content_type)} is not JSON; send "application/json"'
        )
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in ("utf-8", "utf8"):
                raise UnsupportedMediaType(
                    f"Content-Type charset {json.dumps(charset)} is not "
                    f'supported; send UTF-8 and "charset=utf-8"'
                )


def body_too_large(size: int | None, limit: int) -> BodyTooLarge:
    """The error for a body of ``size`` bytes (``None``: not all read), over ``limit``."""
    given = f"is {size} bytes, over" if size is not None else "is over"
    return BodyTooLarge(
        f"request body {given} the limit of {limit} bytes; send fewer events per request"
    )


def decode_body(
    body: bytes, content_type: str | None, limits: Limits = DEFAULT_LIMITS
) -> list[object]:
    """
    Decode a publisher's request body into a list of (unvalidated) events.

    The body must be strict UTF-8 JSON (see :func:`decode_json`) whose top
    level is an array; a single object is refused rather than wrapped.

    :param content_type: the ``Content-Type`` header, ``None`` if absent;
        parameters such as ``charset=utf-8`` are allowed.
    :raises BodyTooLarge: if ``body`` is over ``limits.max_body_bytes``.
    :raises UnsupportedMediaType: unless ``content_type`` is JSON.
    :raises EventError: for anything else wrong, naming the problem.
    """
    if len(body) > limits.max_body_bytes:
        raise body_too_large(len(body), limits.max_body_bytes)
    _check_content_type(content_type)
    value = decode_json(body, "body", "a JSON array of events")
    if not isinstance(value, list):
        raise EventError(
            f"body must be a JSON array of events, got {show(value)}"
            + ("; wrap a single event in [...]" if isinstance(value, dict) else "")
        )
    return value
