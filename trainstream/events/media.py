"""
The fields of the media events (``rules.MEDIA_TYPES``: ``histogram``,
``image``, ``pr_curve``, ``layout``), each rule once.

``validate.validate_event`` checks what every event has (type, run, time)
and, for a histogram, image or PR curve, ``name`` and ``step`` exactly as a
metric's; then it calls the checker here for the type's own fields. Each
checker takes the publisher's event, its index in the batch and the
normalized event it fills, and raises :class:`~trainstream.events.rules.EventError`
naming the event index and the field. Pure: no reactor, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import math
import numbers
from collections.abc import Callable, Mapping
from typing import NoReturn

from trainstream.events.rules import (
    CHART_KINDS,
    IMAGE_FORMATS,
    INT_MAX,
    INT_MIN,
    MAX_BUCKETS,
    MAX_CURVE_POINTS,
    MAX_IMAGE_SIDE,
    MAX_LAYOUT_TAGS,
    EventError,
    show,
)

#: The optional statistics a histogram may carry (TensorBoard's HistogramProto).
HISTOGRAM_STATS = ("min", "max", "num", "sum", "sum_squares")
#: The arrays of a PR curve, all of one length.
CURVE_FIELDS = ("precision", "recall", "thresholds")


def _fail(index: int, field: str, problem: str) -> NoReturn:
    where = f'field "{field}" '
    raise EventError(f"event {index}: {where}{problem}", index, field, where + problem)


def _required(item: Mapping[str, object], field: str, index: int) -> object:
    value = item.get(field)
    if value is None:
        _fail(index, field, f'is missing (required for type "{item["type"]}")')
    return value


def _finite(value: object, index: int, field: str, what: str = "") -> float:
    """A finite number; an integer within 64 bits (as every integer an event holds)."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, numbers.Integral):
        if INT_MIN <= int(value) <= INT_MAX:
            return float(int(value))
    elif isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    _fail(
        index,
        field,
        f"{what}must be a finite number (an integer within 64 bits), got {show(value)}",
    )


def _array(value: object, index: int, field: str, most: int, what: str) -> list[object]:
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= most:
        _fail(index, field, f"must be an array of 1..{most} {what}, got {show(value)}")
    return list(value)


def _text(value: object, index: int, field: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(index, field, f"{what} must be a non-empty string, got {show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(index, field, f"{what} holds a lone surrogate, which UTF-8 cannot encode")
    return str(value)


def check_histogram(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    """
    ``buckets``: ``[[left, right, count], ...]`` (TensorBoard's own histogram
    tensor), finite numbers, ``count >= 0``; optional ``min``, ``max``,
    ``num``, ``sum``, ``sum_squares``: finite numbers. Buckets are meant to
    be in order with ``left <= right``; that is not refused (JSON Schema
    cannot say it, and the OpenAPI document must describe exactly what is
    taken): the dashboard sorts them and skips a bucket with ``right < left``.
    """
    what = "[left, right, count] arrays, count >= 0"
    buckets = _array(_required(item, "buckets", index), index, "buckets", MAX_BUCKETS, what)
    checked: list[list[float]] = []
    for i, bucket in enumerate(buckets):
        if not isinstance(bucket, (list, tuple)) or len(bucket) != 3:
            _fail(index, "buckets", f"item {i} must be [left, right, count], got {show(bucket)}")
        left, right, count = (_finite(v, index, "buckets", f"item {i}: ") for v in bucket)
        if count < 0:
            _fail(index, "buckets", f"item {i} must have a count >= 0, got {show(count)}")
        checked.append([left, right, count])
    out["buckets"] = checked
    for field in HISTOGRAM_STATS:
        if item.get(field) is not None:
            out[field] = _finite(item[field], index, field)


def check_image(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    """
    ``format`` (``png`` or ``jpeg``), ``width`` and ``height`` (pixels,
    1..``MAX_IMAGE_SIDE``), ``data``: the encoded image in base64.
    """
    image_format = item.get("format")
    if not (isinstance(image_format, str) and image_format in IMAGE_FORMATS):
        allowed = ", ".join(f'"{f}"' for f in sorted(IMAGE_FORMATS))
        _fail(index, "format", f"must be one of {allowed}, got {show(image_format)}")
    out["format"] = str(image_format)
    for field in ("width", "height"):
        side = _required(item, field, index)
        if isinstance(side, float) and side.is_integer():
            side = int(side)
        if not (isinstance(side, numbers.Integral) and not isinstance(side, bool)) or not (
            1 <= int(side) <= MAX_IMAGE_SIDE
        ):
            _fail(index, field, f"must be an integer in 1..{MAX_IMAGE_SIDE}, got {show(side)}")
        out[field] = int(side)
    data = _required(item, "data", index)
    try:
        if not isinstance(data, str) or not data.isascii():
            raise ValueError
        base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        _fail(index, "data", f"must be the image's bytes in base64, got {show(data)}")
    out["data"] = str(data)


def check_pr_curve(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    """
    ``precision``, ``recall``, ``thresholds``: arrays of finite numbers, meant
    to be of one length (not refused, as for a histogram's order: a reader
    uses the shortest).
    """
    for field in CURVE_FIELDS:
        values = _array(_required(item, field, index), index, field, MAX_CURVE_POINTS, "numbers")
        out[field] = [_finite(v, index, field, f"item {i}: ") for i, v in enumerate(values)]


def check_layout(item: Mapping[str, object], index: int, out: dict[str, object]) -> None:
    """
    ``layout`` (TensorBoard's custom scalars): ``{category: {chart title:
    [kind, [tag, ...]]}}``, kind ``Multiline`` or ``Margin`` (a margin
    chart's tags are value, lower, upper; the writer checks there are three).
    """
    layout = _required(item, "layout", index)
    shape = "must be {category: {chart title: [kind, [tag, ...]]}}"
    if not isinstance(layout, Mapping) or not layout:
        _fail(index, "layout", f"{shape}, got {show(layout)}")
    checked: dict[str, dict[str, list[object]]] = {}
    for category, charts in layout.items():
        name = _text(category, index, "layout", "a category")
        if not isinstance(charts, Mapping) or not charts:
            _fail(index, "layout", f"category {show(name)}: {shape}")
        section: dict[str, list[object]] = {}
        for title, chart in charts.items():
            where = f"chart {show(title)} of {show(name)}"
            title = _text(title, index, "layout", "a chart title")
            if not isinstance(chart, (list, tuple)) or len(chart) != 2:
                _fail(index, "layout", f"{where} must be [kind, [tag, ...]]")
            kind, tags = chart
            if kind not in CHART_KINDS:
                _fail(index, "layout", f'{where}: kind must be "Margin" or "Multiline"')
            tags = _array(tags, index, "layout", MAX_LAYOUT_TAGS, "tags")
            section[title] = [kind, [_text(t, index, "layout", f"a tag of {where}") for t in tags]]
        checked[name] = section
    out["layout"] = checked


#: The checker of each media type's own fields; ``NAMED``: those that also
#: have a metric's ``name`` and ``step``.
CHECKERS: Mapping[str, Callable[[Mapping[str, object], int, dict[str, object]], None]] = {
    "histogram": check_histogram,
    "image": check_image,
    "pr_curve": check_pr_curve,
    "layout": check_layout,
}
NAMED: frozenset[str] = frozenset({"histogram", "image", "pr_curve"})

__all__ = ["CHECKERS", "CURVE_FIELDS", "HISTOGRAM_STATS", "NAMED"]
