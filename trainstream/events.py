"""
Event types, validation and the JSON codec (``PROTOCOL.md`` section 2).

Pure: no reactor, no I/O.  Every error a publisher can cause is an
:class:`EventError` whose message names the event index, the field and
what is wrong with it, so the web layer can answer it as-is.

Choices this module makes where the protocol leaves room:

- A request body must be a JSON *array*; a lone object is refused with a
  hint to wrap it in ``[...]`` (section 3 says "a JSON array of events").
- An optional field given as ``null`` counts as absent and is left out of
  the normalized event.
- Every integer (``step``, ``rank``, ``epoch``, integer ``value``, ``time``
  and ``params`` values) must fit in a signed 64-bit integer, so any store
  can keep it exactly.
- Python callers may pass other real numbers (``numbers.Integral`` and
  ``numbers.Real``, e.g. NumPy scalars); they are normalized to ``int`` and
  ``float``.  ``bool`` is never a number.
- Duplicate keys in one JSON object are refused by :func:`decode_body`.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
import time
from collections.abc import Callable, Mapping
from typing import NoReturn, cast

import attrs

__all__ = [
    "EVENT_TYPES",
    "LEVELS",
    "STATES",
    "BodyTooLarge",
    "EventError",
    "Limits",
    "decode_body",
    "encode_event",
    "encode_json",
    "validate_event",
    "validate_events",
]

EVENT_TYPES: frozenset[str] = frozenset({"metric", "status", "log", "hparams", "alert"})
STATES: frozenset[str] = frozenset(
    {"created", "running", "paused", "finished", "failed", "stalled"}
)
LEVELS: frozenset[str] = frozenset({"debug", "info", "warning", "error"})

#: Maximum lengths of a run name and of a metric (or alert) name.
MAX_RUN_LENGTH = 128
MAX_NAME_LENGTH = 256

_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

_NAME_RE = re.compile(r"[A-Za-z0-9._:\-][A-Za-z0-9._:/\-]*")
_BAD_NAME_CHAR_RE = re.compile(r"[^A-Za-z0-9._:/\-]")

# Upper bound of the encoded size of a metric event, not counting its run
# and name: keys and punctuation (~75 bytes), a float time (<= 24), a 64-bit
# step and rank (<= 20 each) and a value (<= 24).  Run and name are ASCII
# without characters JSON escapes, so they add exactly their length.
_METRIC_SIZE_OVERHEAD = 200

_COMMON_FIELDS = frozenset({"type", "run", "time"})
_FIELDS: dict[str, frozenset[str]] = {
    "metric": _COMMON_FIELDS | {"name", "step", "value", "rank"},
    "status": _COMMON_FIELDS | {"state", "epoch", "message"},
    "log": _COMMON_FIELDS | {"level", "message"},
    "hparams": _COMMON_FIELDS | {"params"},
    "alert": _COMMON_FIELDS | {"kind", "message", "name"},
}
# Fields only the server may set: named as such instead of as unknown.
_SERVER_FIELDS = {"id": "assigned", "rewind_to": "added"}


@attrs.frozen
class Limits:
    """
    Size limits on what a publisher may send.

    :ivar max_event_bytes: one event, encoded by :func:`encode_event`, in
        bytes of UTF-8 (over it: HTTP 400).
    :ivar max_body_bytes: one request body in bytes (over it: HTTP 413).
    """

    max_event_bytes: int = attrs.field(
        default=64 * 1024,
        validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)],
    )
    max_body_bytes: int = attrs.field(
        default=8 * 1024 * 1024,
        validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)],
    )


_DEFAULT_LIMITS = Limits()


class EventError(ValueError):
    """
    A publisher's mistake: maps to HTTP 400 ``{"error": message, "index": index}``.

    :ivar message: what is wrong and where, fit to show to the publisher.
    :ivar index: position of the bad event in its batch, or ``None`` when
        the problem is not in one event (the body, the batch itself).
    :ivar field: name of the offending field, or ``None``.
    :ivar detail: what is wrong, without where (``message`` says where): the
        same text whichever entry point (REST, WebSocket, ``run.log``) met it.
    """

    def __init__(
        self,
        message: str,
        index: int | None = None,
        field: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.field = field
        self.detail = message if detail is None else detail

    def to_json(self) -> dict[str, object]:
        """
        :return: the HTTP error body; ``index`` only when known.
        """
        result: dict[str, object] = {"error": self.message}
        if self.index is not None:
            result["index"] = self.index
        return result


class BodyTooLarge(EventError):  # noqa: N818 (the name is the public API)
    """
    The request body is over :attr:`Limits.max_body_bytes`: maps to HTTP 413.
    """


# --- JSON codec -------------------------------------------------------------

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _replace_non_finite(obj: object, seen: set[int]) -> object:
    """
    Copy ``obj`` with non-finite floats turned into their protocol strings.
    """
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
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


def encode_event(event: Mapping[str, object]) -> str:
    """
    Encode one event as compact JSON text; see :func:`encode_json`.

    A metric event with exactly the usual fields in the usual order (what
    validation and ``Run.log`` produce) is written directly: it is most of
    the traffic, and this is several times faster than the encoder, with the
    same text (floats by ``repr``, as ``json`` writes them).
    """
    if type(event) is dict and event.get("type") == "metric" and tuple(event) == _METRIC_KEYS:
        time_, step, value = event["time"], event["step"], event["value"]
        if (
            type(time_) is float
            and math.isfinite(time_)
            and type(step) is int
            and (type(value) is int or (type(value) is float and math.isfinite(value)))
        ):
            return (
                f'{{"id":{event["id"]},"type":"metric","run":{_string(event["run"])},'
                f'"time":{time_!r},"name":{_string(event["name"])},"step":{step},'
                f'"value":{value!r}}}'
            )
    return encode_json(event if isinstance(event, dict) else dict(event))


# --- request bodies ---------------------------------------------------------


def _check_content_type(content_type: str | None) -> None:
    """
    Accept ``application/json``, ``*/*+json`` and a missing header.
    """
    if content_type is None:
        return
    media_type, *params = content_type.split(";")
    kind, _, subtype = media_type.strip().lower().partition("/")
    plain = kind == "application" and subtype == "json"
    suffixed = kind not in ("", "*") and len(subtype) > 5 and subtype.endswith("+json")
    if not (plain or suffixed):
        raise EventError(f'Content-Type {_show(content_type)} is not JSON; send "application/json"')
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in ("utf-8", "utf8"):
                raise EventError(
                    f"Content-Type charset {json.dumps(charset)} is not "
                    f'supported; send UTF-8 and "charset=utf-8"'
                )


def _refuse_constant(name: str) -> NoReturn:
    raise EventError(
        f'body is not valid JSON: {name} is not a JSON number; send the string "{name}" instead'
    )


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise EventError(f"body is not valid JSON: duplicate key {_show(key)} in an object")
            seen.add(key)
    return result


_decoder = json.JSONDecoder(
    parse_constant=_refuse_constant, object_pairs_hook=_object_without_duplicates
)
# Without the pairs hook the C scanner builds the dicts itself, several
# times faster; a duplicate key then shows as fewer keys than '":' tokens.
_fast_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


def _count_keys(value: object) -> int:
    """How many keys the objects in ``value`` hold, all levels."""
    items = value.values() if type(value) is dict else value
    total = len(value) if type(value) is dict else 0
    if not isinstance(items, list | type({}.values())):
        return total
    for item in items:
        kind = type(item)
        if kind is dict:
            total += len(item)  # type: ignore[arg-type]
            for inner in item.values():  # type: ignore[attr-defined]
                if type(inner) is dict or type(inner) is list:
                    total += _count_keys(inner)
        elif kind is list:
            total += _count_keys(item)
    return total


def decode_body(
    body: bytes, content_type: str | None, limits: Limits = _DEFAULT_LIMITS
) -> list[object]:
    """
    Decode a publisher's request body into a list of (unvalidated) events.

    The body must be strict UTF-8 JSON (no ``NaN``/``Infinity`` literals,
    no duplicate keys) whose top level is an array; a single object is
    refused rather than wrapped.

    :param content_type: the ``Content-Type`` header, ``None`` if absent;
        parameters such as ``charset=utf-8`` are allowed.
    :raises BodyTooLarge: if ``body`` is over ``limits.max_body_bytes``.
    :raises EventError: for anything else wrong, naming the problem.
    """
    if len(body) > limits.max_body_bytes:
        raise BodyTooLarge(
            f"request body is {len(body)} bytes, over the limit of "
            f"{limits.max_body_bytes} bytes; send fewer events per request"
        )
    _check_content_type(content_type)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EventError(f"body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    if text.startswith("\ufeff"):
        raise EventError("body starts with a byte order mark; send JSON without it")
    if not text or text.isspace():
        raise EventError("body is empty; send a JSON array of events")
    try:
        value = _fast_decoder.decode(text)
        if text.count('":') != _count_keys(value):
            # Maybe a duplicate key (which a dict hides), maybe only a value
            # or a spacing that the count cannot tell: decode strictly.
            value = _decoder.decode(text)
    except json.JSONDecodeError as e:
        raise EventError(
            f"body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
        ) from None
    except RecursionError:
        raise EventError("body is not valid JSON: nested too deeply") from None
    except EventError:
        raise
    except ValueError:  # int() refusing a literal of over 4300 digits
        raise EventError("body is not valid JSON: a number has too many digits") from None
    if not isinstance(value, list):
        raise EventError(
            f"body must be a JSON array of events, got {_show(value)}"
            + ("; wrap a single event in [...]" if isinstance(value, dict) else "")
        )
    return value


# --- validation -------------------------------------------------------------


def _show(value: object) -> str:
    """
    Show ``value`` briefly, as JSON where possible, for error messages.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value[:40])
        return shown if len(value) <= 40 else shown[:-1] + '..."'
    if isinstance(value, int):
        if abs(value) > 10**30:
            return f"an integer of {value.bit_length()} bits"
        return repr(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"a Python {type(value).__name__}"


def _fail(index: int, field: str | None, problem: str) -> NoReturn:
    where = f"field {_show(field)} " if field is not None else ""
    raise EventError(f"event {index}: {where}{problem}", index, field, where + problem)


# Names seen valid before (a training run logs the same few thousand over and
# over): a set lookup instead of a regex match. Only exact str objects go in.
_VALID_NAMES: set[str] = set()


def _check_name(value: object, index: int, field: str, max_length: int) -> str:
    """
    Check a run or metric name: ``[A-Za-z0-9._:/-]``, not starting with ``/``.
    """
    if type(value) is str and value in _VALID_NAMES and len(value) <= max_length:
        return value
    if isinstance(value, str):
        if 0 < len(value) <= max_length and _NAME_RE.fullmatch(value):
            if type(value) is str:
                if len(_VALID_NAMES) > 65_536:
                    _VALID_NAMES.clear()
                _VALID_NAMES.add(value)
            return str(value)
        if not value:
            _fail(index, field, "must not be empty")
        if len(value) > max_length:
            _fail(
                index,
                field,
                f"must be at most {max_length} characters, got {len(value)}",
            )
        if value.startswith("/"):
            _fail(index, field, f'must not start with "/", got {_show(value)}')
        bad = _BAD_NAME_CHAR_RE.search(value)
        position = bad.start() if bad else 0
        _fail(
            index,
            field,
            f"contains {json.dumps(value[position])} at position {position}; "
            f"use only letters, digits and . _ : / -",
        )
    _fail(index, field, f"must be a string, got {_show(value)}")


def _check_text(value: object, index: int, field: str, non_empty: bool) -> str:
    """
    Check a free-text string: any text that UTF-8 can encode.
    """
    if not isinstance(value, str):
        _fail(index, field, f"must be a string, got {_show(value)}")
    if non_empty and not value:
        _fail(index, field, "must not be empty")
    _check_encodable(value, index, field, "")
    return str(value)


def _check_encodable(value: str, index: int, field: str, what: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            _fail(
                index,
                field,
                f"{what}contains a lone surrogate at position {e.start}, which UTF-8 cannot encode",
            )


def _check_int(value: object, index: int, field: str, minimum: int = _INT_MIN) -> int:
    """
    Check an integer (not a bool, not a float) in ``[minimum, 2**63 - 1]``.
    """
    if type(value) is int:
        result = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        result = int(value)
    else:
        bounds = f">= {minimum}" if minimum != _INT_MIN else "in the 64-bit range"
        _fail(index, field, f"must be an integer {bounds}, got {_show(value)}")
    if not minimum <= result <= _INT_MAX:
        if result < minimum:
            bounds = f">= {minimum}" if minimum != _INT_MIN else "in the 64-bit range"
            _fail(index, field, f"must be an integer {bounds}, got {_show(result)}")
        _fail(index, field, f"must fit in 64 bits, got {_show(result)}")
    return result


def _as_number(value: object) -> int | float | None:
    """
    Normalize a real number to ``int`` or ``float``; ``None`` if not one.
    """
    if type(value) is float or type(value) is int:
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _check_time(value: object, index: int) -> float:
    number = _as_number(value)
    if number is None:
        _fail(index, "time", f"must be a number of Unix seconds, got {_show(value)}")
    if isinstance(number, float) and not math.isfinite(number):
        _fail(index, "time", f"must be a finite number, got {_show(number)}")
    if number < 0:
        _fail(index, "time", f"must be >= 0, got {_show(number)}")
    if isinstance(number, int):
        if number > _INT_MAX:
            _fail(index, "time", f"must fit in 64 bits, got {_show(number)}")
        return float(number)
    return number


def _check_value(value: object, index: int) -> int | float:
    if isinstance(value, str):
        try:
            return _NON_FINITE[value]
        except KeyError:
            pass
    number = _as_number(value)
    if number is None:
        _fail(
            index,
            "value",
            f'must be a number or one of "NaN", "Infinity", "-Infinity", got {_show(value)}',
        )
    if isinstance(number, int):
        return _check_int(number, index, "value")
    return number


def _choices(choices: frozenset[str], value: object) -> str:
    allowed = ", ".join(f'"{c}"' for c in sorted(choices))
    return f"must be one of {allowed}, got {_show(value)}"


def _check_choice(value: object, index: int, field: str, choices: frozenset[str]) -> str:
    if isinstance(value, str) and value in choices:
        return str(value)
    _fail(index, field, _choices(choices, value))


def _check_params(value: object, index: int) -> dict[str, object]:
    if not isinstance(value, Mapping):
        _fail(index, "params", f"must be an object, got {_show(value)}")
    params: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            _fail(index, "params", f"keys must be non-empty strings, got {_show(key)}")
        _check_encodable(key, index, "params", f"key {_show(key)} ")
        if item is None or isinstance(item, bool):
            params[key] = item
        elif isinstance(item, str):
            _check_encodable(item, index, "params", f"value of {_show(key)} ")
            params[key] = str(item)
        else:
            number = _as_number(item)
            if number is None:
                _fail(
                    index,
                    "params",
                    f"value of {_show(key)} must be a string, number, boolean "
                    f"or null, got {_show(item)}",
                )
            if isinstance(number, int):
                if not _INT_MIN <= number <= _INT_MAX:
                    _fail(
                        index,
                        "params",
                        f"value of {_show(key)} must fit in 64 bits, got {_show(number)}",
                    )
            elif not math.isfinite(number):
                _fail(
                    index,
                    "params",
                    f"value of {_show(key)} must be a finite number, got {_show(number)}",
                )
            params[key] = number
    return params


def _metric(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    out["name"] = _check_name(_required(item, "name", index), index, "name", MAX_NAME_LENGTH)
    out["step"] = _check_int(_required(item, "step", index), index, "step", 0)
    out["value"] = _check_value(_required(item, "value", index), index)
    rank = item.get("rank")
    if rank is not None:
        out["rank"] = _check_int(rank, index, "rank", 0)


def _status(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    out["state"] = _check_choice(_required(item, "state", index), index, "state", STATES)
    epoch = item.get("epoch")
    if epoch is not None:
        out["epoch"] = _check_int(epoch, index, "epoch")
    message = item.get("message")
    if message is not None:
        out["message"] = _check_text(message, index, "message", False)


def _log(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    out["level"] = _check_choice(_required(item, "level", index), index, "level", LEVELS)
    out["message"] = _check_text(_required(item, "message", index), index, "message", False)


def _hparams(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    out["params"] = _check_params(_required(item, "params", index), index)


def _alert(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    out["kind"] = _check_text(_required(item, "kind", index), index, "kind", True)
    out["message"] = _check_text(_required(item, "message", index), index, "message", False)
    name = item.get("name")
    if name is not None:
        out["name"] = _check_name(name, index, "name", MAX_NAME_LENGTH)


_CHECKERS: dict[str, Callable[[Mapping[str, object], int, dict[str, object]], None]] = {
    "metric": _metric,
    "status": _status,
    "log": _log,
    "hparams": _hparams,
    "alert": _alert,
}


def _required(item: Mapping[str, object], field: str, index: int) -> object:
    value = item.get(field)
    if value is None:
        if field in item:
            _null(index, field)
        _fail(index, field, f'is missing (required for type "{item["type"]}")')
    return value


def _null(index: int, field: str) -> NoReturn:
    _fail(index, field, "is required and must not be null")


def _check_size(event: dict[str, object], index: int, limits: Limits) -> None:
    size = len(encode_event(event).encode("utf-8"))
    if size <= limits.max_event_bytes:
        return
    sizes = {k: len(encode_json(v).encode("utf-8")) for k, v in event.items()}
    largest = max(sizes, key=sizes.__getitem__)
    raise EventError(
        f"event {index}: encoded size {size} bytes is over the limit of "
        f"{limits.max_event_bytes} bytes; its largest field is "
        f'"{largest}" ({sizes[largest]} bytes), shorten it',
        index,
        largest,
    )


def validate_event(
    item: object,
    index: int = 0,
    limits: Limits = _DEFAULT_LIMITS,
    now: Callable[[], float] = time.time,
) -> dict[str, object]:
    """
    Check one event from a publisher and return a new, normalized copy.

    The copy has ``type``, ``run`` and a float ``time`` (from ``now()`` when
    absent) first, then the type's own fields; ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"`` values become floats.  ``item`` is never modified.

    :param index: position of ``item`` in its batch, for error messages.
    :raises EventError: naming ``index`` and the field at fault.
    """
    if not isinstance(item, Mapping):
        raise EventError(f"event {index}: must be a JSON object, got {_show(item)}", index)
    event_type = item.get("type")
    if not (isinstance(event_type, str) and event_type in EVENT_TYPES):
        if "type" not in item:
            _fail(index, "type", "is missing (required)")
        _fail(index, "type", _choices(EVENT_TYPES, event_type))
    allowed = _FIELDS[event_type]
    if not allowed.issuperset(item.keys()):
        unknown = [k for k in item if k not in allowed]
        first = unknown[0]
        if first in _SERVER_FIELDS:
            _fail(
                index,
                first,
                f"is {_SERVER_FIELDS[first]} by the server; remove it",
            )
        names = ", ".join(_show(k) for k in unknown)
        raise EventError(
            f'event {index}: field {_show(first)} is unknown for type "{event_type}"'
            + (f" (unknown fields: {names})" if len(unknown) > 1 else "")
            + f"; allowed: {', '.join(sorted(allowed))}",
            index,
            first if isinstance(first, str) else None,
        )
    if "run" not in item:
        _fail(index, "run", "is missing (required)")
    run = _check_name(item["run"], index, "run", MAX_RUN_LENGTH)
    given_time = item.get("time")
    out: dict[str, object] = {
        "type": event_type,
        "run": run,
        "time": float(now()) if given_time is None else _check_time(given_time, index),
    }
    _CHECKERS[event_type](item, index, out)
    # A metric event's size is bounded by its run and name: skip encoding it.
    if (
        event_type != "metric"
        or len(run) + len(cast(str, out["name"])) + _METRIC_SIZE_OVERHEAD > limits.max_event_bytes
    ):
        _check_size(out, index, limits)
    return out


def validate_events(
    items: object,
    limits: Limits = _DEFAULT_LIMITS,
    now: Callable[[], float] = time.time,
) -> list[dict[str, object]]:
    """
    Check a batch of events, all or nothing.

    :param items: a list (or tuple) of events, e.g. from :func:`decode_body`;
        an empty one is valid and gives an empty list.
    :return: new normalized events, in order (see :func:`validate_event`).
    :raises EventError: for the first bad event, with its index; then no
        event of the batch may be stored.
    """
    if not isinstance(items, (list, tuple)):
        raise EventError(f"events must be a JSON array, got {_show(items)}")
    return [validate_event(item, index, limits, now) for index, item in enumerate(items)]


def metric_events(
    run: str, metrics: Mapping[str, object], step: object, t: object, checked: set[str]
) -> list[dict[str, object]]:
    """
    The metric events of one ``log(metrics, step)`` call (``Run.log`` and
    ``client.Publisher.log``), checked by the very functions
    :func:`validate_event` uses for each field, so a value REST refuses is
    refused here with the same :attr:`EventError.detail`. Names that pass go
    into ``checked`` (the caller's fast path may skip their check then).

    One thing only Python callers can pass goes further than JSON: a value
    that is no ``numbers.Real`` but converts with ``float()`` (a torch
    scalar tensor, a ``Decimal``) is that float, then checked as any.

    :param t: the events' time (Unix seconds).
    :raises EventError: naming the run, the metric(s) and the field; nothing
        of the call is kept then.
    """
    try:
        t = _check_time(t, 0)
        step = _check_int(step, 0, "step", 0)
    except EventError as e:
        shown = ", ".join(_show(name) for name in itertools.islice(metrics, 3))
        more = ", ..." if len(metrics) > 3 else ""
        where = f"run {_show(run)}" + (
            f", metric{'s' if len(metrics) > 1 else ''} {shown}{more}" if metrics else ""
        )
        raise EventError(f"{where}: {e.detail}", field=e.field, detail=e.detail) from None
    events: list[dict[str, object]] = []
    for name, value in metrics.items():
        try:
            if name not in checked:
                checked.add(_check_name(name, 0, "name", MAX_NAME_LENGTH))
            kind = type(value)
            if kind is not float:
                if kind is not int and isinstance(value, float):
                    value = float(value)  # numpy.float64: every float is a value
                elif value is None:
                    _null(0, "value")
                else:
                    value = _check_value(_python_number(value), 0)
        except EventError as e:
            where = f"run {_show(run)}, metric {_show(name)}"
            raise EventError(f"{where}: {e.detail}", field=e.field, detail=e.detail) from None
        events.append(
            {"type": "metric", "run": run, "time": t, "name": name, "step": step, "value": value}
        )
    return events


def _python_number(value: object) -> object:
    """``value``, or its ``float()`` when it is a Python-only number (see ``metric_events``)."""
    if isinstance(value, (str, bytes, bool, numbers.Number)) or not hasattr(value, "__float__"):
        return value
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return value  # refused by _check_value, which names it
