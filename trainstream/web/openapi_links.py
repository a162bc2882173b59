"""
The parts of the OpenAPI document (``openapi.py``) that are plain data:
the shared response headers and the links between operations.
"""

from __future__ import annotations

from typing import Any


def headers() -> dict[str, Any]:
    return {
        "Allow": {
            "description": "the methods the path has, e.g. 'GET, HEAD'",
            "required": True,
            "schema": {"type": "string"},
        },
        "RetryAfter": {
            "description": "seconds to wait before trying again",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        },
        "WWWAuthenticate": {
            "description": "'Bearer realm=\"trainstream\"'",
            "required": True,
            "schema": {"type": "string"},
        },
    }


def links() -> dict[str, Any]:
    """OpenAPI links: where a run named in one answer can be asked for next."""
    return {
        "GetPublishedRun": {
            "operationId": "getRun",
            "parameters": {"run": "$request.body#/0/run"},
            "description": "the run of the first event published",
        },
        "DeletePublishedRun": {
            "operationId": "deleteRun",
            "parameters": {"run": "$request.body#/0/run"},
        },
        "GetPublishedMetric": {
            "operationId": "getMetricSeries",
            "parameters": {"run": "$request.body#/0/run", "name": "$request.body#/0/name"},
            "description": "the series of the first event published, if a metric",
        },
        "GetDeletedRun": {
            "operationId": "getRun",
            "parameters": {"run": "$request.path.run"},
            "description": "a deleted run is gone: 404",
        },
        "GetListedRun": {
            "operationId": "getRun",
            "parameters": {"run": "$response.body#/runs/0/run"},
        },
        "GetListedMetric": {
            "operationId": "getMetricSeries",
            "parameters": {
                "run": "$response.body#/runs/0/run",
                "name": "$response.body#/runs/0/metrics/0",
            },
        },
        "GetListedRanks": {
            "operationId": "getRanks",
            "parameters": {"run": "$response.body#/runs/0/run"},
        },
    }


def link_refs(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/links/{name}"} for name in names}
