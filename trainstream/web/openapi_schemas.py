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
    LEVELS,
    MAX_NAME_LENGTH,
    MAX_RUN_LENGTH,
    NAME_PATTERN,
    NON_FINITE,
    STATES,
)


def ref(name: str) -> dict[str, str]:
    """A reference to the schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def _event_variant(kind: str, required: list[str], fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "title": f"{kind} event",
        "required": ["type", "run", *required],
        "additionalProperties": False,
        "properties": {
            "type": {"const": kind},
            "run": ref("RunName"),
            "time": {
                "type": "number",
                "minimum": 0,
                "description": "Unix seconds; the server sets it when absent",
            },
            **fields,
        },
    }


def _event_variants() -> list[dict[str, Any]]:
    return [
        _event_variant(
            "metric",
            ["name", "step", "value"],
            {
                "name": ref("MetricName"),
                "step": {"type": "integer", "minimum": 0},
                "value": ref("MetricValue"),
                "rank": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the distributed-training process that logged it",
                },
            },
        ),
        _event_variant(
            "status",
            ["state"],
            {
                "state": {"type": "string", "enum": sorted(STATES)},
                "epoch": {"type": "integer"},
                "message": {"type": "string"},
            },
        ),
        _event_variant(
            "log",
            ["level", "message"],
            {
                "level": {"type": "string", "enum": sorted(LEVELS)},
                "message": {"type": "string"},
            },
        ),
        _event_variant(
            "hparams",
            ["params"],
            {
                "params": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
                }
            },
        ),
        _event_variant(
            "alert",
            ["kind", "message"],
            {
                "kind": {"type": "string", "minLength": 1, "examples": ["nan", "stall"]},
                "message": {"type": "string"},
                "name": ref("MetricName"),
            },
        ),
    ]


def _stored_variant(variant: dict[str, Any]) -> dict[str, Any]:
    stored = copy.deepcopy(variant)
    stored["required"] = ["id", *stored["required"], "time"]
    stored["properties"]["id"] = {"type": "integer", "minimum": 1}
    if stored["properties"]["type"]["const"] == "status":
        stored["properties"]["rewind_to"] = {
            "type": "integer",
            "description": "added by the server when a run's steps go back",
        }
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
            "description": "a number, or one of the strings JSON has no number for",
            "oneOf": [
                {"type": "number"},
                {"type": "string", "enum": list(NON_FINITE)},
            ],
        },
        "NewEvent": {
            "description": "an event as a publisher sends it: no id; unknown fields are refused",
            "oneOf": variants,
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
                "last_value": ref("MetricValue"),
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
                            ref("MetricValue"),
                            {"type": "number"},
                        ],
                        "minItems": 3,
                        "maxItems": 3,
                    },
                },
                "downsampled": {"type": "boolean"},
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
