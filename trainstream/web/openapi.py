"""
The OpenAPI 3.1 description of every HTTP call a server answers, served at
``GET /api/openapi.json``.

The SSE stream and the WebSocket are described as well as OpenAPI can: their
request (path, query, headers) exactly, their messages as schemas under
``components`` (``SseEvent``, ``WsClientMessage``, ``WsServerMessage``; see
``openapi_schemas``).

Checked both ways: ``tests/test_openapi.py`` (every route, the status of
representative answers) and ``.ci/schemathesis`` (every check of
schemathesis against a live server, with and without a token).
"""

from __future__ import annotations

import copy
from typing import Any

from trainstream._version import __version__
from trainstream.events import EVENT_TYPES, INT_MAX, MAX_BODY_BYTES, MAX_EVENT_BYTES
from trainstream.web.openapi_links import (
    headers as _headers,
    link_refs as _link_refs,
    links as _links,
)
from trainstream.web.openapi_schemas import ref as _ref, schemas as _schemas

JSON = "application/json"


def _json_body(schema: dict[str, Any], description: str, **headers: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _error(description: str, **headers: Any) -> dict[str, Any]:
    return _json_body(_ref("Error"), description, **headers)


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _query(name: str, description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
        **extra,
    }


def _int_query(name: str, description: str, minimum: int, maximum: int = INT_MAX) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum, "maximum": maximum}
    return _query(
        name,
        f"{description}. ASCII digits; an empty value (?{name}=) is no integer "
        "and is refused (400) like any other, as is the parameter given twice",
        schema,
    )


_RUN_PARAM = {
    "name": "run",
    "in": "path",
    "required": True,
    "description": (
        "The run name. A '/' in it may be sent as is, or percent-encoded as %2F; "
        "it must be encoded when the name has a segment 'metrics' "
        "(see the metric path), or ends in a segment 'ranks' (see the ranks path)."
    ),
    "schema": _ref("RunName"),
}

_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": (
        "The metric name; a '/' in it may be sent as is (e.g. train/loss) or as %2F. "
        "The path is split at its first segment that is literally 'metrics'."
    ),
    "schema": _ref("MetricName"),
}

_TYPE_NAMES = "|".join([*sorted(EVENT_TYPES), r"\*"])
#: One ``type`` value: comma-separated types (or ``*``); blanks around each,
#: and empty items, are ignored.
_TYPE_LIST = rf"^\s*(?:{_TYPE_NAMES})?\s*(?:,\s*(?:{_TYPE_NAMES})?\s*)*$"

_FILTER_PARAMS = [
    _query(
        "run",
        "Run globs ('*' matches anything). Repeatable, and each value may be "
        "comma-separated; an empty value or item is ignored (no filter)",
        {"type": "array", "items": {"type": "string"}},
        style="form",
        explode=True,
    ),
    _query(
        "name",
        "Metric-name globs; events without a name (status, log) always pass. "
        "Repeatable and comma-separated as run",
        {"type": "array", "items": {"type": "string"}},
        style="form",
        explode=True,
    ),
    _query(
        "type",
        f"Event types ({', '.join(sorted(EVENT_TYPES))}, or * for all). Repeatable, "
        "and each value may be comma-separated; an empty value or item is ignored, "
        "another type is refused (400)",
        {"type": "array", "items": {"type": "string", "pattern": _TYPE_LIST}},
        style="form",
        explode=True,
    ),
]


def _answers(own: dict[str, Any], token: bool = True) -> dict[str, Any]:
    """
    ``own`` and what every operation may answer: 401 when it needs the
    token, 403 (Host, and Origin or a read token for writes), 405 with
    ``Allow`` for a method its path does not have, 500.
    """
    common = {"403": "Forbidden", "405": "MethodNotAllowed", "500": "InternalError"}
    if token:
        common = {"401": "Unauthorized", **common}
    return {**own, **{code: _response(name) for code, name in common.items()}}


def _responses() -> dict[str, Any]:
    """``components/responses``: the answers many operations share."""
    retry = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return {
        "BadRequest": _error("a query parameter is wrong; 'parameter' names it"),
        "Unauthorized": _error(
            "a token is set and the request has none or a wrong one: send "
            "'Authorization: Bearer TOKEN' (or ?token=TOKEN)",
            **{"WWW-Authenticate": {"$ref": "#/components/headers/WWWAuthenticate"}},
        ),
        "Forbidden": _error(
            "refused: a Host that is not a loopback name while the server listens on "
            "loopback only (DNS rebinding); for POST and DELETE also a foreign Origin "
            "(not the server's own, not --allow-origin) or a read-only token"
        ),
        "MethodNotAllowed": _error(
            "the path has no such method; Allow lists the ones it has",
            Allow={"$ref": "#/components/headers/Allow"},
        ),
        "InternalError": _error("a bug: logged by the server, never a traceback"),
        "StoreUnavailable": _error(
            "the history could not be read or written now (nothing was changed); try again",
            **retry,
        ),
        "DiskFull": _error(
            "the disk of the history is full (the answer names the disk and file); "
            "nothing was stored",
            **retry,
        ),
        "NoRun": _error("no such run"),
    }


def _paths() -> dict[str, Any]:
    return {
        "/api": {
            "get": {
                "operationId": "index",
                "summary": "An index of the API, with links",
                "responses": _answers(
                    {
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
                    }
                ),
            }
        },
        "/api/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness, ids and listeners; never needs a token",
                "security": [],
                "responses": _answers(
                    {
                        "200": _json_body(_ref("Health"), "the server is up"),
                        "503": _json_body(
                            _ref("Health"), "degraded: 'reasons' says what is in trouble"
                        ),
                    },
                    token=False,
                ),
            }
        },
        "/api/config/reload": {
            "post": {
                "operationId": "reloadConfig",
                "summary": "Read the --config file again, as SIGHUP does (write token)",
                "description": "Applies what can change live, without dropping a client; "
                "a file that fails to load is refused (400), the running config kept.",
                "responses": _answers(
                    {
                        "200": _json_body(_ref("ConfigReloaded"), "reloaded"),
                        "400": _error("the file was refused: its name, the key, the problem"),
                        "404": _error("this server was started without --config"),
                    }
                ),
            }
        },
        "/api/events": {
            "post": {
                "operationId": "publishEvents",
                "summary": "Publish a batch of events, all or nothing",
                "description": (
                    "The body is a JSON array of events (an empty one is valid). An "
                    "optional field given as null counts as absent. One event encoded "
                    f"is at most {MAX_EVENT_BYTES // 1024} KiB (else 400), the body at most "
                    f"{MAX_BODY_BYTES // 2**20} MiB (else 413), by default. 200 comes once "
                    "the batch is durable."
                ),
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": {"type": "array", "items": _ref("NewEvent")}}},
                },
                "responses": _answers(
                    {
                        "200": {
                            **_json_body(_ref("Accepted"), "every event was stored"),
                            "links": _link_refs(
                                "GetPublishedRun", "DeletePublishedRun", "GetPublishedMetric"
                            ),
                        },
                        "400": _error(
                            "the body or an event is wrong ('index' names the event); "
                            "none was stored"
                        ),
                        "413": _error(
                            "the body is over the size limit "
                            f"({MAX_BODY_BYTES // 2**20} MiB by default); none was stored"
                        ),
                        "415": _error(
                            "Content-Type is missing or not JSON (application/json or "
                            "application/*+json, charset utf-8 if any)"
                        ),
                        "503": _response("StoreUnavailable"),
                        "507": _response("DiskFull"),
                    }
                ),
            },
            "get": {
                "operationId": "pollEvents",
                "summary": "Stored events after an id (polling fallback)",
                "parameters": [
                    _int_query("after", "return events with a larger id (default 0)", 0),
                    _int_query("limit", "at most this many events (default 1000)", 1, 10_000),
                    *_FILTER_PARAMS,
                ],
                "responses": _answers(
                    {
                        "200": _json_body(_ref("EventPage"), "the events, in id order"),
                        "400": _response("BadRequest"),
                        "503": _response("StoreUnavailable"),
                    }
                ),
            },
        },
        "/api/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": "Every run the server knows, in the order first seen",
                "responses": _answers(
                    {
                        "200": {
                            **_json_body(_ref("RunList"), "the runs"),
                            "links": _link_refs(
                                "GetListedRun", "GetListedMetric", "GetListedRanks"
                            ),
                        }
                    }
                ),
            }
        },
        "/api/runs/{run}": {
            "parameters": [_RUN_PARAM],
            "get": {
                "operationId": "getRun",
                "summary": "A run's state, hyperparameters and metric summaries",
                "responses": _answers(
                    {
                        "200": _json_body(_ref("RunDetail"), "the run"),
                        "404": _response("NoRun"),
                    }
                ),
            },
            "delete": {
                "operationId": "deleteRun",
                "summary": "Remove a run's stored history and forget the run",
                "description": "200 once the removal is durable: a crash cannot bring it back.",
                "responses": _answers(
                    {
                        "200": {
                            **_json_body(_ref("Deleted"), "the run is gone"),
                            "links": _link_refs("GetDeletedRun"),
                        },
                        "404": _response("NoRun"),
                        "503": _response("StoreUnavailable"),
                        "507": _response("DiskFull"),
                    }
                ),
            },
        },
        "/api/runs/{run}/metrics/{name}": {
            "parameters": [_RUN_PARAM, _NAME_PARAM],
            "get": {
                "operationId": "getMetricSeries",
                "summary": "A metric's stored history, downsampled to max_points",
                "description": (
                    "Points in step order, from_step to to_step inclusive; a from_step "
                    "above to_step is an empty range (200, no points). Past max_points, "
                    "the step range is cut into max_points/2 buckets and each keeps its "
                    "minimum and maximum point, so a spike is never hidden; NaN counts as "
                    "a maximum. DELETE is not allowed here (405): DELETE the run."
                ),
                "parameters": [
                    _int_query("from_step", "first step (inclusive)", 0),
                    _int_query("to_step", "last step (inclusive)", 0),
                    _int_query(
                        "max_points", "at most this many points (default 10000)", 2, 1_000_000
                    ),
                    _query(
                        "segments",
                        "'current': the points since the series' last checkpoint rewind "
                        "(its current segment); 'all': every segment. Empty or another "
                        "value is refused (400)",
                        {"type": "string", "enum": ["current", "all"], "default": "current"},
                    ),
                ],
                "responses": _answers(
                    {
                        "200": _json_body(_ref("MetricSeries"), "the points"),
                        "400": _response("BadRequest"),
                        "404": _error("no such run, or the run has no such metric"),
                        "503": _response("StoreUnavailable"),
                    }
                ),
            },
        },
        "/api/runs/{run}/ranks": {
            "parameters": [_RUN_PARAM],
            "get": {
                "operationId": "getRanks",
                "summary": "Distributed ranks: per-metric aggregates across ranks, laggards",
                "description": (
                    "From metric events with a rank. A run whose name ends in a segment "
                    "'ranks' is asked for at /api/runs/{run} with its slashes encoded. "
                    "DELETE is not allowed here (405): DELETE the run."
                ),
                "responses": _answers(
                    {
                        "200": _json_body(_ref("Ranks"), "the run's ranks"),
                        "404": _error("no such run, or this server does not track ranks"),
                    }
                ),
            },
        },
        "/api/runs/{run}/logs": {
            "parameters": [_RUN_PARAM],
            "get": {
                "operationId": "searchLogs",
                "summary": "The run's log events, by level and text",
                "description": (
                    "Log events of the run in id order after `after`, whose level is one of "
                    "`level` and whose message contains `q` (case-insensitive). One request "
                    "reads at most 100,000 log events: `next_after` (else null) is the id to "
                    "go on after. A run whose name ends in a segment 'logs' is asked for at "
                    "/api/runs/{run} with its slashes encoded. DELETE is not allowed (405)."
                ),
                "parameters": [
                    _query(
                        "level",
                        "One or more of debug, info, warning, error (comma-separated or repeated)",
                        {
                            "type": "string",
                            "pattern": "^(debug|info|warning|error)(,(debug|info|warning|error))*$",
                        },
                        explode=True,
                    ),
                    _query("q", "Text the message contains", {"type": "string", "maxLength": 256}),
                    _query(
                        "after",
                        "Only events with a greater id",
                        {"type": "integer", "minimum": 0, "maximum": 9223372036854775807},
                    ),
                    _query(
                        "limit",
                        "At most this many (default 100)",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                    ),
                ],
                "responses": _answers(
                    {
                        "200": _json_body(_ref("LogSearch"), "the matching log events"),
                        "400": _response("BadRequest"),
                        "404": _error("no such run"),
                        "503": _response("StoreUnavailable"),
                    }
                ),
            },
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": _answers(
                    {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        }
                    }
                ),
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
                    "they are no longer stored an 'event: reset' (ResetInfo) comes first. "
                    "EventSource clients that cannot set headers send ?token=."
                ),
                "parameters": [
                    *_FILTER_PARAMS,
                    _int_query("last_event_id", "resume after this id", 0),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "resume after this id (before last_event_id)",
                        "schema": {"type": "integer", "minimum": 0, "maximum": INT_MAX},
                    },
                ],
                "responses": _answers(
                    {
                        "200": {
                            "description": "the stream; it ends when the server stops",
                            "content": {"text/event-stream": {"schema": _ref("SseEvent")}},
                        },
                        "400": _response("BadRequest"),
                    }
                ),
            }
        },
        "/ws": {
            "get": {
                "operationId": "websocket",
                "summary": "WebSocket: subscribe, publish, ping (JSON text frames)",
                "description": (
                    "Upgrade to WebSocket. Frames from the client are WsClientMessage, "
                    "frames from the server WsServerMessage; the first is 'hello'. "
                    "Refused with 403 from an Origin that is not allowed. Browser "
                    "clients that cannot set headers send ?token=; with a read-only "
                    "token, publish is answered with an error."
                ),
                "parameters": [
                    {
                        "name": "Upgrade",
                        "in": "header",
                        "required": True,
                        "schema": {"const": "websocket"},
                    },
                ],
                "responses": _answers(
                    {
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
                        "426": {"description": "not a WebSocket upgrade"},
                    }
                ),
            }
        },
        "/metrics": {
            "get": {
                "operationId": "prometheus",
                "summary": "The server's own counters, Prometheus text format",
                "responses": _answers(
                    {
                        "200": {
                            "description": "text exposition format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    }
                ),
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    """A new copy of the OpenAPI document (nothing in it is shared with another)."""
    schemas = _schemas()
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "trainstream",
            "version": __version__,
            "summary": "Watch a machine-learning training run live",
            "description": (
                "Events are JSON over HTTP/1.1. REST under /api, SSE at /events, "
                "WebSocket at /ws, Prometheus at /metrics. Errors are JSON "
                '{"error": ...}, never a traceback. With a token set (--token), every '
                "call but GET /api/health needs it: 'Authorization: Bearer TOKEN', or "
                "?token=TOKEN for clients that cannot set headers (401 otherwise); a "
                "read-only token (--read-token) may GET but not POST or DELETE (403). "
                "A server started without a token is open. Every path answers a method "
                "it does not describe with 405 and an Allow header. Integer query "
                "parameters are ASCII digits; an empty one (?after=) is refused (400), "
                "never taken as absent."
            ),
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        # With a token set (--token), every call but GET /api/health needs it;
        # a server started without one is open (PROTOCOL 6).
        "security": [{"bearer": []}, {"query_token": []}],
        "paths": _paths(),
        "components": {
            "schemas": schemas,
            "responses": _responses(),
            "headers": _headers(),
            "links": _links(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer TOKEN (--token, or --read-token)",
                },
                "query_token": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": (
                        "?token=TOKEN, for EventSource and WebSocket clients that cannot "
                        "set headers; used when there is no Authorization bearer"
                    ),
                },
            },
        },
    }
    return copy.deepcopy(document)


__all__ = ["openapi_document"]
