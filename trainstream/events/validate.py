"""
Validation: every event a publisher sends (REST, WebSocket, ``run.log``,
the server's own) is checked here, field by field, and normalized.

Pure: no reactor, no I/O.  Every error a publisher can cause is an
:class:`~trainstream.events.rules.EventError` whose message names the event
index, the field and what is wrong with it, so the web layer can answer it
as-is.

Choices this module makes where the protocol leaves room:

- An optional field given as ``null`` counts as absent and is left out of
  the normalized event.
- Every integer (``step``, ``rank``, ``epoch``, integer ``value``, ``time``
  and ``params`` values) must fit in a signed 64-bit integer, so any store
  can keep it exactly.
- Python callers may pass other real numbers (``numbers.Integral`` and
  ``numbers.Real``, e.g. NumPy scalars); they are normalized to ``int`` and
  ``float``.  ``bool`` is never a number.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, cast

from trainstream.events.codec import encode_event, encode_json
from trainstream.events.media import CHECKERS as MEDIA_CHECKERS, NAMED as MEDIA_NAMED
from trainstream.events.rules import (
    BAD_NAME_CHAR_RE,
    DEFAULT_LIMITS,
    EVENT_TYPES,
    FIELDS,
    INT_MAX,
    INT_MIN,
    LEVELS,
    MAX_NAME_LENGTH,
    MAX_RUN_LENGTH,
    MEDIA_TYPES,
    NAME_RE,
    NON_FINITE,
    SERVER_FIELDS,
    STATES,
    EventError,
    Limits,
    show as _show,
)

# Upper bound of the encoded size of a metric event, not counting its run
# and name: keys and punctuation (~75 bytes), a float time (<= 24), a 64-bit
# step and rank (<= 20 each) and a value (<= 24).  Run and name are ASCII
# without characters JSON escapes, so they add exactly their length.
METRIC_SIZE_OVERHEAD = 200

_NON_FINITE_NAMES = ", ".join(f'"{name}"' for name in NON_FINITE)


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
        if 0 < len(value) <= max_length and NAME_RE.fullmatch(value):
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
        bad = BAD_NAME_CHAR_RE.search(value)
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


def _check_int(value: object, index: int, field: str, minimum: int = INT_MIN) -> int:
    """
    Check an integer (not a bool; a float only with no fraction, ``3.0``)
    in ``[minimum, 2**63 - 1]``.
    """
    if type(value) is int:
        result = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        result = int(value)
    elif type(value) is float and value.is_integer():
        # ``170.0`` is an integer to JSON Schema and to JavaScript alike.
        result = int(value)
    else:
        bounds = f">= {minimum}" if minimum != INT_MIN else "in the 64-bit range"
        _fail(index, field, f"must be an integer {bounds}, got {_show(value)}")
    if not minimum <= result <= INT_MAX:
        if result < minimum:
            bounds = f">= {minimum}" if minimum != INT_MIN else "in the 64-bit range"
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
        if number > INT_MAX:
            _fail(index, "time", f"must fit in 64 bits, got {_show(number)}")
        return float(number)
    return number


def _check_value(value: object, index: int) -> int | float:
    if isinstance(value, str):
        try:
            return NON_FINITE[value]
        except KeyError:
            pass
    number = _as_number(value)
    if number is None:
        _fail(
            index,
            "value",
            f"must be a number or one of {_NON_FINITE_NAMES}, got {_show(value)}",
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
                if not INT_MIN <= number <= INT_MAX:
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


def _media(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    """A media event (``events/media.py``): a metric's name and step, then its own fields."""
    kind = cast(str, out["type"])
    if kind in MEDIA_NAMED:
        out["name"] = _check_name(_required(item, "name", index), index, "name", MAX_NAME_LENGTH)
        out["step"] = _check_int(_required(item, "step", index), index, "step", 0)
    MEDIA_CHECKERS[kind](item, index, out)


_CHECKERS.update(dict.fromkeys(MEDIA_CHECKERS, _media))


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
    kind = "media " if event["type"] in MEDIA_TYPES else ""
    limit = limits.max_media_bytes if kind else limits.max_event_bytes
    if size <= limit:
        return
    sizes = {k: len(encode_json(v).encode("utf-8")) for k, v in event.items()}
    largest = max(sizes, key=sizes.__getitem__)
    raise EventError(
        f"event {index}: encoded size {size} bytes is over the limit of "
        f"{limit} bytes for {kind}events; its largest field is "
        f'"{largest}" ({sizes[largest]} bytes), shorten it',
        index,
        largest,
    )


def validate_event(
    item: object,
    index: int = 0,
    limits: Limits = DEFAULT_LIMITS,
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
    allowed = FIELDS[event_type]
    if not allowed.issuperset(item.keys()):
        unknown = [k for k in item if k not in allowed]
        first = unknown[0]
        if first in SERVER_FIELDS:
            _fail(
                index,
                first,
                f"is {SERVER_FIELDS[first]} by the server; remove it",
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
        or len(run) + len(cast(str, out["name"])) + METRIC_SIZE_OVERHEAD > limits.max_event_bytes
    ):
        _check_size(out, index, limits)
    return out


def validate_events(
    items: object,
    limits: Limits = DEFAULT_LIMITS,
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
    out: list[dict[str, object]] = []
    append = out.append
    names = _VALID_NAMES
    budget = limits.max_event_bytes - METRIC_SIZE_OVERHEAD
    for index, item in enumerate(items):
        # The common event, plainly valid: a metric with exactly type, run,
        # name, step, a float value and a float time, names seen valid
        # before. validate_event would return this very dict (same objects,
        # same order); anything else, or any doubt, goes through it.
        if type(item) is dict and len(item) == 6:
            kind = item.get("type")
            run = item.get("run")
            name = item.get("name")
            step = item.get("step")
            value = item.get("value")
            t = item.get("time")
            if (
                kind == "metric"
                and type(kind) is str
                and type(run) is str
                and type(name) is str
                and run in names
                and name in names
                and len(run) <= MAX_RUN_LENGTH
                and len(name) <= MAX_NAME_LENGTH
                and len(run) + len(name) <= budget
                and type(step) is int
                and 0 <= step <= INT_MAX
                and type(value) is float
                and type(t) is float
                and 0.0 <= t < math.inf
            ):
                event = {"type": kind, "run": run, "time": t, "name": name, "step": step}
                event["value"] = value
                append(event)
                continue
        append(validate_event(item, index, limits, now))
    return out


def plain_log(
    metrics: object, step: object, t: object, time_given: bool, checked: set[str]
) -> bool:
    """
    Whether a ``log(metrics, step)`` call is the common one that needs no
    check: a dict of names seen valid before (in ``checked``) to floats and
    64-bit ints, an int step in range, and a time that is ``time.time()``
    (``time_given`` false) or a float >= 0, finite. Such a call's metric
    events are the ones :func:`metric_events` would make; ``Run.log`` and
    ``Publisher.log`` take this shortcut and leave every other call to it.
    """
    if not (
        type(step) is int
        and 0 <= step <= 9223372036854775807  # INT_MAX
        and type(metrics) is dict
        and (not time_given or (type(t) is float and 0.0 <= t <= 1.7976931348623157e308))
    ):
        return False  # NaN fails the last test too
    for name, value in metrics.items():
        kind = type(value)
        if name not in checked or (
            kind is not float
            and (kind is not int or not -9223372036854775808 <= value <= 9223372036854775807)
        ):
            return False
    return True


def plain_events(
    run: str, t: float, step: int, metrics: dict[str, Any]
) -> Iterator[dict[str, object]]:
    """
    The metric events of a call :func:`plain_log` passed, as ``Run.log`` and
    ``Publisher.log`` queue it (``(run, t, step, metrics)``): what
    :func:`metric_events` would make, with no check.
    """
    return (
        {"type": "metric", "run": run, "time": t, "name": name, "step": step, "value": value}
        for name, value in metrics.items()
    )


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
    if not isinstance(metrics, Mapping):
        detail = f"log() takes a dict of {{name: number}}, got {_show(metrics)}"
        raise EventError(f"run {_show(run)}: {detail}", detail=detail)
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
    if "bool" in str(getattr(value, "dtype", "")):
        return value  # numpy.bool_, a torch bool tensor: refused, as True is
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return value  # refused by _check_value, which names it
