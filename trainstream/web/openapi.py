"""
The OpenAPI 3.1 description of every HTTP call a server answers, served at
``GET /api/openapi.json``.

The SSE stream and the WebSocket are described as well as OpenAPI can: their
request (path, query, headers) exactly, their messages as schemas under
``components`` (``SseEvent``, ``WsClientMessage``, ``WsServerMessage``).
"""

from __future__ import annotations

import copy
from typing import Any

from trainstream._version import __version__
from trainstream.events import EVENT_TYPES, LEVELS, MAX_NAME_LENGTH, MAX_RUN_LENGTH, STATES

_NAME_PATTERN = r"^[A-Za-z0-9._:\-][A-Za-z0-9._:/\-]*$"

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json_body(_ref("Error"), description)


def _query(name: str, description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
        **extra,
    }


_RUN_PARAM = {
    "name": "run",
    "in": "path",
    "required": True,
    "description": (
        "The run name. A '/' in it may be sent as is, or percent-encoded as %2F; "
        "it must be encoded when the name has a segment 'metrics' "
        "(see the metric path)."
    ),
    "schema": _ref("RunName"),
}

_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": (
        "The metric name; a '/' in it may be sent as is (e.g. train/loss). "
        "The path is split at its first segment that is literally 'metrics'."
    ),
    "schema": _ref("MetricName"),
}

_FILTER_PARAMS = [
    _query(
        "run",
        "Run globs ('*' matches anything); repeatable or comma-separated",
        {"type": "array", "items": {"type": "string"}},
        style="form",
        explode=True,
    ),
    _query(
        "name",
        "Metric-name globs; events without a name (status, log) always pass",
        {"type": "array", "items": {"type": "string"}},
        style="form",
        explode=True,
    ),
    _query(
        "type",
        "Event types; repeatable or comma-separated",
        {"type": "array", "items": {"type": "string", "enum": [*sorted(EVENT_TYPES), "*"]}},
        style="form",
        explode=False,
    ),
]


def _event_variant(kind: str, required: list[str], fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "title": f"{kind} event",
        "required": ["type", "run", *required],
        "additionalProperties": False,
        "properties": {
            "type": {"const": kind},
            "run": _ref("RunName"),
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
                "name": _ref("MetricName"),
                "step": {"type": "integer", "minimum": 0},
                "value": _ref("MetricValue"),
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
                "name": _ref("MetricName"),
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


def _schemas() -> dict[str, Any]:
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
            "pattern": _NAME_PATTERN,
            "examples": ["resnet-3"],
        },
        "MetricName": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_NAME_LENGTH,
            "pattern": _NAME_PATTERN,
            "examples": ["train/loss"],
        },
        "MetricValue": {
            "description": "a number, or one of the strings JSON has no number for",
            "oneOf": [
                {"type": "number"},
                {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]},
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
                "events": {"type": "array", "items": _ref("Event")},
                "last_id": {"type": "integer", "description": "the newest id of the server"},
            },
        },
        "RunState": {"type": "string", "enum": sorted(STATES)},
        "RunSummary": {
            "type": "object",
            "required": ["run", "state", "created", "updated", "last_step", "metrics"],
            "properties": {
                "run": _ref("RunName"),
                "state": _ref("RunState"),
                "created": {"type": "number", "description": "time of its first event"},
                "updated": {"type": "number", "description": "latest event time"},
                "last_step": {"type": ["integer", "null"]},
                "metrics": {"type": "array", "items": _ref("MetricName")},
            },
        },
        "RunList": {
            "type": "object",
            "required": ["runs"],
            "properties": {"runs": {"type": "array", "items": _ref("RunSummary")}},
        },
        "MetricSummary": {
            "type": "object",
            "required": ["count", "last_step", "last_value", "min", "max"],
            "properties": {
                "count": {"type": "integer", "description": "every value, NaN included"},
                "last_step": {"type": "integer"},
                "last_value": _ref("MetricValue"),
                "min": {"type": ["number", "null"], "description": "over finite values"},
                "max": {"type": ["number", "null"], "description": "over finite values"},
            },
        },
        "RunDetail": {
            "type": "object",
            "required": ["run", "state", "hparams", "metrics"],
            "properties": {
                "run": _ref("RunName"),
                "state": _ref("RunState"),
                "created": {"type": "number"},
                "updated": {"type": "number"},
                "last_step": {"type": ["integer", "null"]},
                "hparams": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
                },
                "metrics": {"type": "object", "additionalProperties": _ref("MetricSummary")},
            },
        },
        "MetricSeries": {
            "type": "object",
            "required": ["run", "name", "points", "downsampled"],
            "properties": {
                "run": _ref("RunName"),
                "name": _ref("MetricName"),
                "points": {
                    "type": "array",
                    "description": "[step, value, time], in step order",
                    "items": {
                        "type": "array",
                        "prefixItems": [
                            {"type": "integer"},
                            _ref("MetricValue"),
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
                "run": _ref("RunName"),
                "deleted": {"type": "integer", "description": "stored events removed"},
            },
        },
        "SseEvent": {
            "description": (
                "One SSE message: 'id: <id>', 'event: <type>', 'data: <Event JSON>'. "
                "Also 'event: reset' with data ResetInfo, a first 'retry: <ms>' line "
                "and ': keepalive' comments."
            ),
            "oneOf": [_ref("Event"), _ref("ResetInfo")],
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
                        "events": {"type": "array", "items": _ref("NewEvent")},
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
                        "events": {"type": "array", "items": _ref("Event")},
                        "coalesced": {"type": "integer"},
                    },
                },
                {
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "pong"}, "nonce": {}},
                },
                {
                    "allOf": [_ref("Accepted")],
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "ack"}},
                },
                {
                    "allOf": [_ref("ResetInfo")],
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "reset"}},
                },
                {
                    "allOf": [_ref("Error")],
                    "type": "object",
                    "required": ["op"],
                    "properties": {"op": {"const": "error"}},
                },
            ],
        },
    }


def _paths() -> dict[str, Any]:
    bad_request = _error("a query parameter is wrong; 'parameter' names it")
    unknown_run = _error("no such run")
    return {
        "/api": {
            "get": {
                "operationId": "index",
                "summary": "An index of the API, with links",
                "responses": {
                    "200": _json_body(
                        {
                            "type": "object",
                            "required": ["name", "version", "links", "urls"],
                            "properties": {
                                "name": {"const": "trainstream"},
                                "version": {"type": "string"},
                                "links": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "urls": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                        "what this server offers",
                    )
                },
            }
        },
        "/api/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness, ids and listeners; never needs a token",
                "security": [],
                "responses": {
                    "200": _json_body(_ref("Health"), "the server is up"),
                    "503": _json_body(
                        _ref("Health"), "degraded: 'reasons' says what is in trouble"
                    ),
                },
            }
        },
        "/api/events": {
            "post": {
                "operationId": "publishEvents",
                "summary": "Publish a batch of events, all or nothing",
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": {"type": "array", "items": _ref("NewEvent")}}},
                },
                "responses": {
                    "200": _json_body(_ref("Accepted"), "every event was stored"),
                    "400": _error("an event is wrong; 'index' names it; none was stored"),
                    "413": _error("the body is over the size limit (8 MiB by default)"),
                },
            },
            "get": {
                "operationId": "pollEvents",
                "summary": "Stored events after an id (polling fallback)",
                "parameters": [
                    _query(
                        "after", "return events with a larger id", {"type": "integer", "minimum": 0}
                    ),
                    _query(
                        "limit",
                        "at most this many events",
                        {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000},
                    ),
                    *_FILTER_PARAMS,
                ],
                "responses": {
                    "200": _json_body(_ref("EventPage"), "the events, in id order"),
                    "400": bad_request,
                },
            },
        },
        "/api/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": "Every run the server knows, in the order first seen",
                "responses": {"200": _json_body(_ref("RunList"), "the runs")},
            }
        },
        "/api/runs/{run}": {
            "parameters": [_RUN_PARAM],
            "get": {
                "operationId": "getRun",
                "summary": "A run's state, hyperparameters and metric summaries",
                "responses": {
                    "200": _json_body(_ref("RunDetail"), "the run"),
                    "404": unknown_run,
                },
            },
            "delete": {
                "operationId": "deleteRun",
                "summary": "Remove a run's stored history and forget the run",
                "responses": {
                    "200": _json_body(_ref("Deleted"), "the run is gone"),
                    "404": unknown_run,
                },
            },
        },
        "/api/runs/{run}/metrics/{name}": {
            "parameters": [_RUN_PARAM, _NAME_PARAM],
            "get": {
                "operationId": "getMetricSeries",
                "summary": "A metric's stored history, downsampled to max_points",
                "description": (
                    "Points in step order. Past max_points, the step range is cut into "
                    "max_points/2 buckets and each keeps its minimum and maximum point, "
                    "so a spike is never hidden; NaN counts as a maximum."
                ),
                "parameters": [
                    _query(
                        "from_step", "first step (inclusive)", {"type": "integer", "minimum": 0}
                    ),
                    _query("to_step", "last step (inclusive)", {"type": "integer", "minimum": 0}),
                    _query(
                        "max_points",
                        "at most this many points",
                        {"type": "integer", "minimum": 2, "maximum": 1000000, "default": 10000},
                    ),
                ],
                "responses": {
                    "200": _json_body(_ref("MetricSeries"), "the points"),
                    "400": bad_request,
                    "404": _error("no such run, or the run has no such metric"),
                },
            },
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/events": {
            "get": {
                "operationId": "streamEvents",
                "summary": "Server-Sent Events: replay after an id, then live",
                "description": (
                    "A text/event-stream. The first bytes are 'retry: <ms>'; each event is "
                    "'id: <id>', 'event: <type>', 'data: <Event JSON>' and a blank line; "
                    "a ': keepalive' comment comes at least every 15 s. With "
                    "Last-Event-ID (or last_event_id) every stored matching event after "
                    "it is replayed first, in order, with no gap and no duplicate; if "
                    "they are no longer stored an 'event: reset' (ResetInfo) comes first."
                ),
                "parameters": [
                    *_FILTER_PARAMS,
                    _query(
                        "last_event_id", "resume after this id", {"type": "integer", "minimum": 0}
                    ),
                    _query(
                        "token",
                        "the bearer token, for clients that cannot set headers",
                        {"type": "string"},
                    ),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the stream; it ends when the server stops",
                        "content": {"text/event-stream": {"schema": _ref("SseEvent")}},
                    },
                    "400": bad_request,
                    "401": _error("a token is required"),
                },
            }
        },
        "/ws": {
            "get": {
                "operationId": "websocket",
                "summary": "WebSocket: subscribe, publish, ping (JSON text frames)",
                "description": (
                    "Upgrade to WebSocket. Frames from the client are WsClientMessage, "
                    "frames from the server WsServerMessage; the first is 'hello'. "
                    "Refused with 403 from an Origin that is not allowed."
                ),
                "parameters": [
                    {
                        "name": "Upgrade",
                        "in": "header",
                        "required": True,
                        "schema": {"const": "websocket"},
                    },
                    _query(
                        "token",
                        "the bearer token, for clients that cannot set headers",
                        {"type": "string"},
                    ),
                ],
                "responses": {
                    "101": {
                        "description": "switching to WebSocket",
                        "content": {
                            JSON: {
                                "schema": {
                                    "oneOf": [
                                        _ref("WsClientMessage"),
                                        _ref("WsServerMessage"),
                                    ]
                                }
                            }
                        },
                    },
                    "401": {"description": "a token is required"},
                    "403": {"description": "Origin not allowed"},
                    "426": {"description": "not a WebSocket upgrade"},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "prometheus",
                "summary": "The server's own counters, Prometheus text format",
                "responses": {
                    "200": {
                        "description": "text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    """A new copy of the OpenAPI document."""
    schemas = _schemas()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trainstream",
            "version": __version__,
            "summary": "Watch a machine-learning training run live",
            "description": (
                "Events are JSON over HTTP/1.1. REST under /api, SSE at /events, "
                "WebSocket at /ws, Prometheus at /metrics. Errors are JSON "
                '{"error": ...}, never a traceback. With a token set, every call but '
                "GET /api/health needs 'Authorization: Bearer TOKEN'."
            ),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        "security": [{}, {"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


__all__ = ["openapi_document"]
