"""
The media events in the OpenAPI document (``histogram``, ``image``,
``pr_curve``, ``layout``: ``events/media.py``, docs/protocol.md "Media
events"), built from the same rules as the validator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainstream.events.rules import (
    CHART_KINDS,
    IMAGE_FORMATS,
    MAX_BUCKETS,
    MAX_CURVE_POINTS,
    MAX_IMAGE_SIDE,
    MAX_LAYOUT_TAGS,
)

#: base64 as ``base64.b64decode(validate=True)`` takes it: padded, whole quanta.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def media_variants(
    event_variant: Callable[[str, list[str], dict[str, Any], dict[str, Any]], dict[str, Any]],
    number: Callable[..., dict[str, Any]],
    int64: Callable[..., dict[str, Any]],
    ref: Callable[[str], dict[str, str]],
) -> list[dict[str, Any]]:
    """
    The media event variants, made with ``openapi_schemas``' own builders
    (passed in: that module imports this one).
    """
    named = {"name": ref("MetricName"), "step": int64(0)}

    def numbers(most: int, what: str) -> dict[str, Any]:
        items = number()
        return {
            "type": "array",
            "minItems": 1,
            "maxItems": most,
            "items": items,
            "description": what,
        }

    bucket = {
        "type": "array",
        "prefixItems": [number(), number(), number(0)],
        "minItems": 3,
        "maxItems": 3,
    }
    stats = {field: number() for field in ("min", "max", "num", "sum", "sum_squares")}
    text = {"type": "string", "minLength": 1}
    chart = {
        "type": "array",
        "prefixItems": [
            {"type": "string", "enum": sorted(CHART_KINDS)},
            {"type": "array", "minItems": 1, "maxItems": MAX_LAYOUT_TAGS, "items": text},
        ],
        "minItems": 2,
        "maxItems": 2,
        "description": "[kind, [tag, ...]]; a Margin chart's tags: value, lower, upper",
    }
    side = {"type": "integer", "minimum": 1, "maximum": MAX_IMAGE_SIDE}
    return [
        event_variant(
            "histogram",
            ["name", "step", "buckets"],
            {
                **named,
                "buckets": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BUCKETS,
                    "items": bucket,
                    "description": "[left, right, count], meant in order with left <= right",
                },
            },
            stats,
        ),
        event_variant(
            "image",
            ["name", "step", "format", "width", "height", "data"],
            {
                **named,
                "format": {"type": "string", "enum": sorted(IMAGE_FORMATS)},
                "width": side,
                "height": side,
                "data": {
                    "type": "string",
                    "pattern": BASE64_PATTERN,
                    "description": "the encoded image, base64 (the event within max_media_bytes)",
                },
            },
            {},
        ),
        event_variant(
            "pr_curve",
            ["name", "step", "precision", "recall", "thresholds"],
            {
                **named,
                "precision": numbers(MAX_CURVE_POINTS, "at each threshold"),
                "recall": numbers(MAX_CURVE_POINTS, "at each threshold"),
                "thresholds": numbers(MAX_CURVE_POINTS, "in [0, 1], ascending"),
            },
            {},
        ),
        event_variant(
            "layout",
            ["layout"],
            {
                "layout": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"minLength": 1},
                    "description": "custom scalars: {category: {chart title: [kind, [tag, ...]]}}",
                    "additionalProperties": {
                        "type": "object",
                        "minProperties": 1,
                        "propertyNames": {"minLength": 1},
                        "additionalProperties": chart,
                    },
                }
            },
            {},
        ),
    ]


def stored_numbers(schema: Any) -> Any:
    """
    ``schema`` with each of ``number()``'s published-number schemas (an
    integer within 64 bits, or a float) made any number: stored, every
    media number is a float, and ``9.2e18`` is one (JSON Schema calls it an
    integer past the 64-bit bound).
    """
    if isinstance(schema, list):
        return [stored_numbers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    options = schema.get("anyOf")
    if (
        isinstance(options, list)
        and len(options) == 2
        and options[1].get("not") == {"type": "integer"}
    ):
        loose = {"type": "number"}
        if "minimum" in options[1]:
            loose["minimum"] = options[1]["minimum"]
        return loose
    return {key: stored_numbers(value) for key, value in schema.items()}


__all__ = ["BASE64_PATTERN", "media_variants", "stored_numbers"]
