"""
Records to SQLite rows and back.

The writer thread turns each batch into ready rows (and its series
summaries) in one pass; a row SQLite or the pipe to the writer process
cannot take is kept out of its transaction (see :func:`row_problem`).
Readers turn rows back into records with :func:`decode`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from trainstream.store.records import Record

_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _brief(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _INT_MIN <= value <= _INT_MAX


def row_problem(row: tuple[Any, ...]) -> str | None:
    """
    Why SQLite (or the pipe to the writer process) cannot take ``row``, or
    ``None``. Every entry point validates events, so this is the last line:
    a row that would fail the whole transaction is kept out of it instead.
    """
    event_id, kind, run, name, step, value, t, text, segment = row
    if kind == "metric" and step is None:
        return 'a metric event without "step"'
    for field, number in (("id", event_id), ("step", step), ("segment", segment)):
        if (number is not None or field == "id") and not _is_int64(number):
            return f'"{field}" is {_brief(number)}, not an integer in the 64-bit range'
    if value is not None and not (isinstance(value, float) or _is_int64(value)):
        return f'"value" is {_brief(value)}, not a float or a 64-bit integer'
    if not (isinstance(t, float) or _is_int64(t)) or not math.isfinite(t):
        return f'"time" is {_brief(t)}, not a finite number'
    for field, string in (("type", kind), ("run", run), ("name", name), ("json", text)):
        if string is None and field == "name":
            continue
        if not isinstance(string, str):
            return f'"{field}" is {_brief(string)}, not a string'
        if not string.isascii():
            try:
                string.encode("utf-8")
            except UnicodeEncodeError:
                return f'"{field}" has a lone surrogate, which UTF-8 cannot encode'
    return None


def _row(r: Record) -> tuple[Any, ...]:
    e = r.event
    value = e.get("value")
    if isinstance(value, float) and value != value:
        value = None  # NaN: SQLite would store NULL anyway
    segment = r.segment if r.type == "metric" else None
    return (r.id, r.type, r.run, r.name, e.get("step"), value, e.get("time"), r.json, segment)


def add_rows(
    records: Sequence[Record],
    rows: list[tuple[Any, ...]],
    series: dict[tuple[str, str], list[Any]],
    bad: list[tuple[int, str]],
) -> None:
    """
    One pass over a batch: its rows, and its series summaries (writer
    thread). A record SQLite cannot take goes to ``bad`` as ``(id, why)``.
    """
    append = rows.append
    for r in records:
        e = r.event
        step: Any = e.get("step")
        value: Any = e.get("value")
        t: Any = e.get("time")
        kind = type(value)
        if (
            r.type == "metric"
            and type(step) is int
            and 0 <= step <= 9223372036854775807
            and (kind is float or (kind is int and _INT_MIN <= value <= _INT_MAX))
            and type(t) is float
            and -1.8e308 < t < 1.8e308
            and r.json.isascii()  # so are its run and name, which it holds
        ):
            # The common row, plainly fine: no need to look at every field.
            stored = None if value != value else value  # NaN: SQLite has no NaN
            append((r.id, "metric", r.run, r.name, step, stored, t, r.json, r.segment))
        else:
            row = _row(r)
            problem = row_problem(row)
            if problem is not None:
                bad.append((r.id, problem))
                continue
            append(row)
            if r.type != "metric":
                continue
            stored, step, t = row[5], row[4], row[6]
        key = (r.run, r.name or "")
        summary = series.get(key)
        finite = stored if stored is not None and -math.inf < stored < math.inf else None
        if summary is None:
            series[key] = [r.segment, step, 1, finite, finite, stored, t, r.id]
            continue
        summary[0] = r.segment
        summary[1] = step
        summary[2] += 1
        if finite is not None:
            if summary[3] is None or finite < summary[3]:
                summary[3] = finite
            if summary[4] is None or finite > summary[4]:
                summary[4] = finite
        summary[5] = stored
        summary[6] = t
        summary[7] = r.id


def rows_op(
    rows: list[tuple[Any, ...]], series: dict[tuple[str, str], list[Any]], last: int
) -> tuple[Any, ...]:
    """One insert op for the writer process; empties ``series`` for the next."""
    op = ("rows", rows, [(*k, *v) for k, v in series.items()], last)
    series.clear()
    return op


class RowError(ValueError):
    """A stored row that is not an event (its JSON does not decode to one)."""

    def __init__(self, event_id: object, why: str) -> None:
        super().__init__(f"event {_brief(event_id)} {why}")
        self.event_id = event_id
        self.why = why


def event_of(row: tuple[int, str, str, str | None, str]) -> dict[str, object]:
    """
    The event a stored row holds.

    :raises RowError: when the row is damaged: its JSON does not decode, is
        not an object, or its columns are not what every written row has.
    """
    event_id, kind, run, name, text = row
    if not (
        type(event_id) is int
        and isinstance(kind, str)
        and isinstance(run, str)
        and (name is None or isinstance(name, str))
        and isinstance(text, str)
    ):
        raise RowError(event_id, "has columns of the wrong type")
    try:
        event = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RowError(event_id, f"is not valid JSON ({e})") from None
    if not isinstance(event, dict):
        raise RowError(event_id, f"is JSON {type(event).__name__}, not an event object")
    value = event.get("value")
    if kind == "metric" and isinstance(value, str):
        try:
            event["value"] = float(value)  # "NaN", "Infinity", "-Infinity" on the wire
        except ValueError:
            raise RowError(event_id, f"has value {_brief(value)}, not a number") from None
    return event


def decode(row: tuple[int, str, str, str | None, str], segment: int = 0) -> Record:
    """
    The record a stored row holds (``segment``: its metric's, for a repair).

    :raises RowError: when the row is damaged (see :func:`event_of`).
    """
    event_id, kind, run, name, text = row
    event = event_of(row)
    return Record(
        id=event_id, type=kind, run=run, name=name, event=event, json=text, segment=segment
    )
