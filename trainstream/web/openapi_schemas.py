"""
The schemas of the OpenAPI document (``components/schemas``): events as a
publisher sends them and as the server stores them, every answer, and the
SSE and WebSocket messages. Built from the event rules (``events.rules``),
so the document and the validator cannot disagree.
"""

from __future__ import annotations

import copy
from typing import Any

from trainstream.events import (
    INT_MAX,
    INT_MIN,
    LEVELS,
    MAX_NAME_LENGTH,
    MAX_RUN_LENGTH,
    NAME_PATTERN,
    NON_FINITE,
    STATES,
)
from trainstream.events.rules import MEDIA_TYPES
from trainstream.web.openapi_media import media_variants, stored_numbers


def ref(name: str) -> dict[str, str]:
    """A reference to the schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def int64(minimum: int = INT_MIN, **extra: Any) -> dict[str, Any]:
    """An integer from ``minimum`` to the 64-bit maximum (every integer an event holds)."""
    return {"type": "integer", "minimum": minimum, "maximum": INT_MAX, **extra}


def _number(minimum: float | None = None) -> dict[str, Any]:
    """
    A JSON number as the validator takes it: an integer literal must fit in
    64 bits, a number with a fraction or exponent may be any finite float.
    """
    low = INT_MIN if minimum is None else int(minimum)
    fraction: dict[str, Any] = {"type": "number", "not": {"type": "integer"}}
    if minimum is not None:
        fraction["minimum"] = minimum
    return {"anyOf": [int64(low), fraction]}


def _optional(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field of a new event: ``null`` counts as absent."""
    return {"anyOf": [schema, {"type": "null"}]}


def _event_variant(
    kind: str, required: list[str], fields: dict[str, Any], optional: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "object",
        "title": f"{kind} event",
        "required": ["type", "run", *required],
        "additionalProperties": False,
        "properties": {
            "type": {"const": kind},
            "run": ref("RunName"),
            "time": {
                **_number(0),
                "description": "Unix seconds; the server sets it when absent",
            },
            **fields,
            **optional,
        },
        "x-optional": sorted(["time", *optional]),
    }


def _event_variants() -> list[dict[str, Any]]:
    return [
        _event_variant(
            "metric",
            ["name", "step", "value"],
            {
                "name": ref("MetricName"),
                "step": int64(0),
                "value": ref("MetricValue"),
            },
            {"rank": int64(0, description="the distributed-training process that logged it")},
        ),
        _event_variant(
            "status",
            ["state"],
            {"state": {"type": "string", "enum": sorted(STATES)}},
            {"epoch": int64(), "message": {"type": "string"}},
        ),
        _event_variant(
            "log",
            ["level", "message"],
            {
                "level": {"type": "string", "enum": sorted(LEVELS)},
                "message": {"type": "string"},
            },
            {},
        ),
        _event_variant(
            "hparams",
            ["params"],
            {"params": ref("HParams")},
            {},
        ),
        _event_variant(
            "alert",
            ["kind", "message"],
            {
                "kind": {"type": "string", "minLength": 1, "examples": ["nan", "stall"]},
                "message": {"type": "string"},
            },
            {"name": ref("MetricName")},
        ),
        *media_variants(_event_variant, _number, int64, ref),
    ]


def _new_variant(variant: dict[str, Any]) -> dict[str, Any]:
    """A variant as a publisher sends it: each optional field may be ``null``."""
    new = copy.deepcopy(variant)
    for field in new.pop("x-optional"):
        new["properties"][field] = _optional(new["properties"][field])
    return new


def _stored_variant(variant: dict[str, Any]) -> dict[str, Any]:
    stored = copy.deepcopy(variant)
    del stored["x-optional"]
    # Stored, time is a float, and a value any number: JSON Schema takes a
    # float such as 1e19 for an integer, so no 64-bit bound can apply.
    stored["properties"]["time"] = {"type": "number", "minimum": 0}
    if "value" in stored["properties"]:
        stored["properties"]["value"] = ref("StoredValue")
    if stored["properties"]["type"]["const"] in MEDIA_TYPES:
        stored["properties"] = stored_numbers(stored["properties"])
    stored["required"] = ["id", *stored["required"], "time"]
    stored["properties"]["id"] = int64(1)
    if stored["properties"]["type"]["const"] == "status":
        stored["properties"]["rewind_to"] = int64(
            0, description="added by the server when a run's steps go back"
        )
    return stored


def schemas() -> dict[str, Any]:
    variants = _event_variants()
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "what is wrong, fit to show"},
                "index": {"type": "integer", "description": "the bad event of a batch"},
                "parameter": {"type": "string", "description": "the bad query parameter"},
            },
        },
        "RunName": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_RUN_LENGTH,
            "pattern": f"^{NAME_PATTERN}$",
            "examples": ["resnet-3"],
        },
        "MetricName": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_NAME_LENGTH,
            "pattern": f"^{NAME_PATTERN}$",
            "examples": ["train/loss"],
        },
        "MetricValue": {
            "description": (
                "a number (an integer fits in 64 bits), or one of the strings "
                "JSON has no number for"
            ),
            "anyOf": [
                *_number()["anyOf"],
                {"type": "string", "enum": list(NON_FINITE)},
            ],
        },
        "StoredValue": {
            "description": "a metric value as the server answers it",
            "anyOf": [{"type": "number"}, {"type": "string", "enum": list(NON_FINITE)}],
        },
        "HParams": {
            "type": "object",
            "description": "hyperparameters: non-empty names, JSON scalar values",
            "propertyNames": {"minLength": 1},
            "additionalProperties": {
                "anyOf": [{"type": ["string", "boolean", "null"]}, *_number()["anyOf"]]
            },
        },
        "NewEvent": {
            "description": (
                "an event as a publisher sends it: no id; unknown fields are refused; "
                "an optional field given as null counts as absent"
            ),
            "oneOf": [_new_variant(v) for v in variants],
            "discriminator": {"propertyName": "type"},
        },
        "Event": {
            "description": "an event as the server stores and sends it",
            "oneOf": [_stored_variant(v) for v in variants],
            "discriminator": {"propertyName": "type"},
        },
        "Health": {
            "type": "object",
            "required": [
                "status",
                "version",
                "uptime_s",
                "last_id",
                "epoch",
                "listeners",
                "clients",
            ],
            "properties": {
                "status": {"enum": ["ok", "degraded"]},
                "reason": {"type": "string", "description": "degraded: the first reason"},
                "reasons": {"type": "array", "items": {"type": "string"}},
                "store": {"type": "object", "description": "writer restarts, events lost"},
                "version": {"type": "string"},
                "uptime_s": {"type": "number"},
                "last_id": {"type": "integer"},
                "epoch": {"type": "string", "description": "changes when the history is new"},
                "config_version": {
                    "type": "integer",
                    "description": "1 at start; grows with each reload of the --config file",
                },
                "reactor_lag_ms": {
                    "type": "number",
                    "description": "the largest reactor lag of the last 10 s (how late "
                    "scheduled calls ran); past reactor_lag_warn_ms the server is degraded",
                },
                "reactor_lag_warn_ms": {"type": "number", "description": "--lag-warn, in ms"},
                "listeners": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "endpoint": {"type": "string"},
                            "port": {"type": ["integer", "null"]},
                            "url": {"type": "string"},
                            "connections": {"type": "integer"},
                        },
                    },
                },
                "clients": {
                    "type": "object",
                    "properties": {"sse": {"type": "integer"}, "ws": {"type": "integer"}},
                },
            },
        },
        "ConfigReloaded": {
            "type": "object",
            "required": ["reloaded", "config_version", "changed"],
            "properties": {
                "reloaded": {"type": "boolean"},
                "config_version": {"type": "integer", "description": "health's, from now on"},
                "changed": {"type": "array", "items": {"type": "string"}},
                "not_applied": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "changed keys that cannot change live: kept until a restart",
                },
                "message": {"type": "string"},
            },
        },
        "Accepted": {
            "type": "object",
            "required": ["accepted", "first_id", "last_id"],
            "properties": {
                "accepted": {"type": "integer"},
                "first_id": {"type": "integer"},
                "last_id": {"type": "integer"},
            },
        },
        "EventPage": {
            "type": "object",
            "required": ["events", "last_id"],
            "properties": {
                "events": {"type": "array", "items": ref("Event")},
                "last_id": {"type": "integer", "description": "the newest id of the server"},
            },
        },
        "LogSearch": {
            "type": "object",
            "required": ["run", "logs", "scanned", "next_after"],
            "properties": {
                "run": {"type": "string"},
                "logs": {"type": "array", "items": ref("Event")},
                "scanned": {"type": "integer", "description": "log events this request read"},
                "next_after": {
                    "type": ["integer", "null"],
                    "description": "the id to go on after, or null at the end",
                },
            },
        },
        "RunState": {"type": "string", "enum": sorted(STATES)},
        "RunSummary": {
            "type": "object",
            "required": ["run", "state", "created", "updated", "last_step", "metrics"],
            "properties": {
                "run": ref("RunName"),
                "state": ref("RunState"),
                "created": {"type": "number", "description": "time of its first event"},
                "updated": {"type": "number", "description": "latest event time"},
                "last_step": {"type": ["integer", "null"]},
                "metrics": {"type": "array", "items": ref("MetricName")},
            },
        },
        "RunList": {
            "type": "object",
            "required": ["runs"],
            "properties": {"runs": {"type": "array", "items": ref("RunSummary")}},
        },
        "MetricSummary": {
            "type": "object",
            "required": ["count", "last_step", "last_value", "min", "max"],
            "properties": {
                "count": {"type": "integer", "description": "every value, NaN included"},
                "last_step": {"type": "integer"},
                "last_value": ref("StoredValue"),
                "min": {"type": ["number", "null"], "description": "over finite values"},
                "max": {"type": ["number", "null"], "description": "over finite values"},
            },
        },
        "RunDetail": {
            "type": "object",
            "required": ["run", "state", "hparams", "metrics"],
            "properties": {
                "run": ref("RunName"),
                "state": ref("RunState"),
                "created": {"type": "number"},
                "updated": {"type": "number"},
                "last_step": {"type": ["integer", "null"]},
                "hparams": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
                },
                "metrics": {"type": "object", "additionalProperties": ref("MetricSummary")},
                "images": {"type": "object", "additionalProperties": ref("MediaIndex")},
                "histograms": {"type": "object", "additionalProperties": ref("MediaIndex")},
                "pr_curves": {"type": "object", "additionalProperties": ref("MediaIndex")},
                "layout": {
                    "type": ["object", "null"],
                    "description": "the latest layout event's layout (custom scalars)",
                },
            },
        },
        "MediaIndex": {
            "type": "object",
            "required": ["count", "last_step", "steps"],
            "description": "one media series: fetch an event by id with GET /api/events",
            "properties": {
                "count": {"type": "integer"},
                "last_step": {"type": ["integer", "null"]},
                "steps": {
                    "type": "array",
                    "description": "[step, event id] of the latest 1000, in step order",
                    "items": {
                        "type": "array",
                        "prefixItems": [{"type": "integer"}, {"type": "integer"}],
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
            },
        },
        "MetricSeries": {
            "type": "object",
            "required": ["run", "name", "points", "downsampled"],
            "properties": {
                "run": ref("RunName"),
                "name": ref("MetricName"),
                "points": {
                    "type": "array",
                    "description": "[step, value, time], in step order",
                    "items": {
                        "type": "array",
                        "prefixItems": [
                            {"type": "integer"},
                            ref("StoredValue"),
                            {"type": "number"},
                        ],
                        "minItems": 3,
                        "maxItems": 3,
                    },
                },
                "downsampled": {"type": "boolean"},
            },
        },
        "Ranks": {
            "type": "object",
            "required": ["run", "ranks", "metrics", "behind"],
            "properties": {
                "run": ref("RunName"),
                "ranks": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "metrics": {
                    "type": "object",
                    "description": "per metric name: the latest step every rank has logged",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["step", "mean", "min", "max", "by_rank"],
                        "properties": {
                            "step": {"type": ["integer", "null"]},
                            "mean": {"anyOf": [ref("StoredValue"), {"type": "null"}]},
                            "min": {"anyOf": [ref("StoredValue"), {"type": "null"}]},
                            "max": {"anyOf": [ref("StoredValue"), {"type": "null"}]},
                            "by_rank": {
                                "type": "object",
                                "description": "rank -> [its latest step, its value]",
                                "additionalProperties": {
                                    "type": "array",
                                    "prefixItems": [{"type": "integer"}, ref("StoredValue")],
                                    "minItems": 2,
                                    "maxItems": 2,
                                },
                            },
                        },
                    },
                },
                "behind": {
                    "type": "array",
                    "description": "ranks trailing the leading rank of a metric",
                    "items": {
                        "type": "object",
                        "required": ["rank", "name", "step", "lead_step", "behind_by"],
                        "properties": {
                            "rank": {"type": "integer"},
                            "name": ref("MetricName"),
                            "step": {"type": "integer"},
                            "lead_step": {"type": "integer"},
                            "behind_by": {"type": "integer"},
                        },
                    },
                },
            },
        },
        "Deleted": {
            "type": "object",
            "required": ["run", "deleted"],
            "properties": {
                "run": ref("RunName"),
                "deleted": {"type": "integer", "description": "stored events removed"},
            },
        },
        "SseEvent": {
            "description": (
                "One SSE message: 'id: <id>', 'event: <type>', 'data: <Event JSON>'. "
                "Also 'event: reset' with data ResetInfo, a first 'retry: <ms>' line "
                "and ': keepalive' comments."
            ),
            "oneOf": [ref("Event"), ref("ResetInfo")],
        },
        "ResetInfo": {
            "type": "object",
            "required": ["reason", "oldest_id"],
            "properties": {"reason": {"type": "string"}, "oldest_id": {"type": "integer"}},
        },
        "WsClientMessage": {
            "description": "client -> server text frames",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["op"],
                    "properties": {
                        "op": {"const": "subscribe"},
                        "runs": {"type": "array", "items": {"type": "string"}},
                        "names": {"type": "array", "items": {"type": "string"}},
                        "types": {"type": "array", "items": {"type": "string"}},
                        "after": {"type": "integer", "minimum": 0},
                        "max_rate": {"type": "number", "exclusiveMinimum": 0},
                    },
                },
                {
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "unsubscribe"}},
                },
                {
                    "type": "object",
                    "required": ["op", "events"],
                    "properties": {
                        "op": {"const": "publish"},
                        "events": {"type": "array", "items": ref("NewEvent")},
                    },
                },
                {
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "ping"}, "nonce": {}},
                },
            ],
        },
        "WsServerMessage": {
            "description": "server -> client text frames",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["op", "version", "last_id"],
                    "properties": {
                        "op": {"const": "hello"},
                        "version": {"type": "string"},
                        "last_id": {"type": "integer"},
                    },
                },
                {
                    "type": "object",
                    "required": ["op", "events"],
                    "properties": {
                        "op": {"const": "events"},
                        "events": {"type": "array", "items": ref("Event")},
                        "coalesced": {"type": "integer"},
                    },
                },
                {
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "pong"}, "nonce": {}},
                },
                {
                    "allOf": [ref("Accepted")],
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "ack"}},
                },
                {
                    "allOf": [ref("ResetInfo")],
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "reset"}},
                },
                {
                    "allOf": [ref("Error")],
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "error"}},
                },
            ],
        },
    }
