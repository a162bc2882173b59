"""
The OpenAPI 3.1 description of every HTTP call a server answers, served at
``GET /api/openapi.json``.

The SSE stream and the WebSocket are described as well as OpenAPI can: their
request (path, query, headers) exactly, their messages as schemas under
``components`` (``SseEvent``, ``WsClientMessage``, ``WsServerMessage``; see
``openapi_schemas``).
"""

from __future__ import annotations

from typing import Any

from trainstream._version import __version__
from trainstream.events import EVENT_TYPES, MAX_BODY_BYTES
from trainstream.web.openapi_schemas import ref as _ref, schemas as _schemas

JSON = "application/json"


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
                    "413": _error(
                        "the body is over the size limit "
                        f"({MAX_BODY_BYTES // 2**20} MiB by default)"
                    ),
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
