"""
The REST API under ``/api`` (Klein): answers are JSON, errors too.

Built from a ``Backend`` (see ``web.backend``): the hub (publishing, the
store), the runs and ranks registries, the clients and a status snapshot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from trainstream._version import __version__
from trainstream.events import (
    LEVELS,
    BodyTooLarge,
    EventError,
    UnsupportedMediaType,
    decode_body,
    encode_json,
)
from trainstream.hub import Hub, prepare
from trainstream.store import Record
from trainstream.web.backend import Backend
from trainstream.web.logs import (
    DEFAULT_LIMIT as DEFAULT_LOG_LIMIT,
    MAX_LIMIT as MAX_LOG_LIMIT,
    MAX_QUERY,
    LogPage,
    search_logs,
)
from trainstream.web.openapi import openapi_document
from trainstream.web.query import (
    BadQueryError,
    bad_query,
    choice_param,
    error_response,
    int_param,
    json_bytes,
    json_response,
    query_filter,
    single_param,
    store_failed,
)

_log = Logger()

#: Points a metric history holds at most when the client gives no ``max_points``.
#: Bodies of ``POST /api/events`` larger than this are decoded and checked
#: in a thread (about 15,000 metric events).
OFF_THREAD_BYTES = 1 << 20
DEFAULT_MAX_POINTS = 10_000
MAX_MAX_POINTS = 1_000_000
#: Events one ``GET /api/events`` answers at most, and by default.
MAX_EVENTS_LIMIT = 10_000
DEFAULT_EVENTS_LIMIT = 1000


def split_run_path(raw_segments: Sequence[bytes]) -> tuple[str, str | None]:
    """
    Split the still percent-encoded path segments after ``/api/runs/`` into
    a run name and, for a metric history, a metric name.

    The rule: the path is split at its first segment (after the first) that
    is literally ``metrics``; before it is the run, after it the metric name.
    A ``/`` inside either name may be sent as is or as ``%2F``. A run name
    that has a ``metrics`` segment of its own must be sent with its slashes
    encoded (``a%2Fmetrics%2Fb``), since such a segment is never split.
    """

    def decode(segments: Sequence[bytes]) -> str:
        return "/".join(unquote_to_bytes(s).decode("utf-8", "replace") for s in segments)

    for k in range(1, len(raw_segments) - 1):
        if raw_segments[k] == b"metrics":
            return decode(raw_segments[:k]), decode(raw_segments[k + 1 :])
    return decode(raw_segments), None


def split_ranks_path(raw_segments: Sequence[bytes], word: bytes = b"ranks") -> str | None:
    """
    The run of ``/api/runs/{run}/ranks`` (distributed ranks, see
    ``trainstream.ranks``), or with ``word=b"logs"`` of
    ``/api/runs/{run}/logs``; ``None`` for another run path.

    The rule: when the path is no metric history (``split_run_path``) and
    has a last segment, after the first, that is literally ``word``, the
    segments before it are the run. A run whose name ends in such a
    segment is then asked for with its slashes encoded (``a%2Franks``), as
    for ``metrics``.
    """
    if len(raw_segments) < 2 or raw_segments[-1] != word:
        return None
    if split_run_path(raw_segments)[1] is not None:
        return None
    return split_run_path(raw_segments[:-1])[0]


def _raw_tail(request: IRequest, decoded_tail: str) -> list[bytes]:
    """
    The raw (percent-encoded) path segments after ``.../runs/`` that Klein
    matched, decoded, as ``decoded_tail``: Twisted decodes ``%2F`` before
    Klein sees the path, so only the raw path tells ``a%2Fb`` from ``a/b``.
    """
    path: bytes = request.path
    raw = path.split(b"/")
    decoded = [unquote_to_bytes(s) for s in raw]
    target = decoded_tail.encode("utf-8")
    for j in range(len(raw) - 1):
        if decoded[j] == b"runs" and b"/".join(decoded[j + 1 :]) == target:
            return raw[j + 1 :]
    return decoded_tail.encode("utf-8").split(b"/")  # pragma: no cover - Klein gave the tail


def _method_not_allowed(request: IRequest, allowed: list[str]) -> bytes:
    """A 405 naming the methods ``allowed``, in ``Allow`` and in the error."""
    request.setHeader(b"allow", ", ".join(allowed).encode())
    return error_response(
        request,
        405,
        f"{request.method.decode('latin-1')} is not allowed on "
        f"{request.path.decode('latin-1')}; allowed: {', '.join(allowed)}",
    )


def _no_run(request: IRequest, run: str) -> bytes:
    hint = ""
    if "/" in run:
        hint = "; a run name with '/' in it may be sent with '%2F' for each '/'"
    return error_response(request, 404, f"no run named {run!r}{hint}")


def _decode_and_check(
    body: bytes, media: str | None, hub: Hub
) -> list[tuple[dict[str, object], str | None]]:
    """(In a thread.) A publisher's body, decoded, validated as the hub would, and encoded."""
    return prepare(hub.check(decode_body(body, media, hub.limits)))


def _refused(request: Request, failure: Failure) -> bytes:
    """What ``_decode_and_check`` refused, answered as the inline path answers it."""
    error = failure.trap(BodyTooLarge, UnsupportedMediaType, EventError)
    value = failure.value
    assert isinstance(value, EventError)
    code = 413 if error is BodyTooLarge else 415 if error is UnsupportedMediaType else 400
    return json_response(request, value.to_json(), code)


class RestApi:
    """The ``/api`` routes of one server."""

    app = Klein()

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._openapi: bytes | None = None

    @app.route("/", methods=["GET"], strict_slashes=False)
    def index(self, request: Request) -> bytes:
        """``GET /api``: what is here, with links, so the URL in ``server.urls`` answers."""
        return json_response(
            request,
            {
                "name": "trainstream",
                "version": __version__,
                "links": {
                    "health": "/api/health",
                    "events": "/api/events?after=0",
                    "publish": "POST /api/events",
                    "runs": "/api/runs",
                    "run": "/api/runs/{run}",
                    "metric": "/api/runs/{run}/metrics/{name}",
                    "ranks": "/api/runs/{run}/ranks",
                    "openapi": "/api/openapi.json",
                    "sse": "/events",
                    "ws": "/ws",
                    "metrics": "/metrics",
                    "dashboard": "/",
                },
                "urls": dict(self.backend.status().urls),
            },
        )

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        """
        ``ok``, or 503 ``degraded`` with ``reasons`` (and the first as
        ``reason``) while the history is in trouble, e.g. its writer
        process died and is being restarted, or the server is
        (``ServerStatus.problems``).
        """
        backend = self.backend
        status = backend.status()
        hub = backend.hub
        store = hub.store.health()
        problems = [*store.problems, *status.problems]
        answer: dict[str, object] = {
            "status": "degraded" if problems else "ok",
            "version": __version__,
            "uptime_s": round(status.uptime_s, 3),
            "last_id": hub.last_id,
            "epoch": hub.epoch,
            "listeners": {li.role: li.to_json() for li in status.listeners},
            "clients": backend.clients.counts(),
            "store": {
                "writer_restarts": store.writer_restarts,
                "events_lost": store.events_lost,
            },
            "config_version": status.config_version,
        }
        if status.lag is not None:
            # The largest lag of the last seconds (trainstream.lag), and its threshold.
            answer["reactor_lag_ms"] = round(status.lag.max_s * 1000, 3)
            answer["reactor_lag_warn_ms"] = round(status.lag.warn_s * 1000, 3)
        if status.cluster is not None:
            answer["cluster"] = dict(status.cluster)  # docs/cluster.md
        if problems:
            answer["reason"] = problems[0]
            answer["reasons"] = problems
        return json_response(request, answer, 503 if problems else 200)

    @app.route("/config/reload", methods=["POST"])
    def reload_config(self, request: Request) -> bytes:
        """
        Read the ``--config`` file again (as SIGHUP does): 200 with what
        changed, or 400 with why the file was refused (the old config is
        kept). Needs the write token (``web.access``: a read token gets 403).
        """
        reload = getattr(self.backend, "reload_config", None)
        if reload is None:
            return error_response(request, 404, "this server has no config file to reload")
        done = reload()
        code = 200 if done.ok else 404 if done.no_file else 400
        return json_response(request, done.to_json(), code)

    @app.route("/events", methods=["POST"])
    def post_events(self, request: Request) -> bytes | Deferred[bytes]:
        assert request.content is not None
        ctype = request.getHeader(b"content-type")
        hub = self.backend.hub
        body = request.content.read()
        media = ctype.decode("latin-1") if ctype is not None else None
        reactor: Any = getattr(self.backend, "reactor", None)
        if OFF_THREAD_BYTES < len(body) <= hub.limits.max_body_bytes and hasattr(
            reactor, "getThreadPool"
        ):
            # A large batch is decoded and checked in a thread, so the
            # reactor goes on serving everyone else meanwhile (90,000 events
            # held it 0.5 s); it is numbered in the reactor thread, whole.
            checked = deferToThreadPool(
                reactor, reactor.getThreadPool(), _decode_and_check, body, media, hub
            )
            answer = checked.addCallback(lambda events: self._publish_checked(request, events))
            return answer.addErrback(lambda f: _refused(request, f))
        try:
            items = decode_body(body, media, hub.limits)
            published = hub.publish(items)
        except BodyTooLarge as e:
            return json_response(request, e.to_json(), 413)
        except UnsupportedMediaType as e:
            return json_response(request, e.to_json(), 415)
        except EventError as e:
            return json_response(request, e.to_json(), 400)
        # 200 means stored: answer once the history has committed the batch
        # (in a cluster: once Redis holds it, see docs/cluster.md).
        d = published.addCallback(
            lambda a: json_response(request, {"accepted": a[0], "first_id": a[1], "last_id": a[2]})
        )
        return d.addErrback(lambda f: store_failed(request, f))

    def _publish_checked(
        self, request: Request, events: list[tuple[dict[str, object], str | None]]
    ) -> Deferred[bytes]:
        published = self.backend.hub.publish_checked(events)
        d = published.addCallback(
            lambda a: json_response(request, {"accepted": a[0], "first_id": a[1], "last_id": a[2]})
        )
        return d.addErrback(lambda f: store_failed(request, f))

    @app.route("/events", methods=["GET"])
    def get_events(self, request: Request) -> bytes | Deferred[bytes]:
        """Polling fallback: stored events after ``?after=``."""
        args = request.args or {}
        try:
            after = int_param(args, "after", 0) or 0
            limit = int_param(args, "limit", 1, MAX_EVENTS_LIMIT) or DEFAULT_EVENTS_LIMIT
            flt = query_filter(args)
        except BadQueryError as e:
            return bad_query(request, e)
        hub = self.backend.hub

        def page(records: list[Record]) -> bytes:
            body = ",".join(r.json for r in records)
            # As of the answer: a read off the reactor thread may end in newer events.
            last_id = max(hub.last_id, records[-1].id if records else 0)
            return json_bytes(request, f'{{"events":[{body}],"last_id":{last_id}}}'.encode())

        # The reactor thread reads memory only; the disk is read off it.
        cached = hub.store.after_cached(after, flt, limit)
        if cached is not None:
            return page(cached)
        d = maybeDeferred(hub.store.read_after, after, flt, limit)
        answer = d.addCallback(lambda read: page(read.records))
        return answer.addErrback(lambda f: store_failed(request, f))

    @app.route("/runs", methods=["GET"])
    def list_runs(self, request: Request) -> bytes:
        runs = self.backend.runs.all()
        return json_response(request, {"runs": [info.summary() for info in runs]})

    @app.route("/runs/<path:tail>", methods=["GET", "DELETE"])
    def run_path(self, request: Request, tail: str) -> bytes | Deferred[bytes]:
        """``/runs/{run}`` and ``/runs/{run}/metrics/{name}``: see ``split_run_path``."""
        raw_tail = _raw_tail(request, tail)
        ranks_run = split_ranks_path(raw_tail)
        if ranks_run is not None:
            return self._ranks(request, ranks_run)
        logs_run = split_ranks_path(raw_tail, b"logs")
        if logs_run is not None:
            return self._logs(request, logs_run)
        run, name = split_run_path(raw_tail)
        if request.method == b"DELETE":
            if name is not None:
                request.setHeader(b"allow", b"GET, HEAD")
                return error_response(
                    request,
                    405,
                    "DELETE is not allowed on a metric history; "
                    "DELETE /api/runs/{run} removes the whole run",
                )
            return self._delete_run(request, run)
        if name is None:
            info = self.backend.runs.get(run)
            if info is None:
                return _no_run(request, run)
            return json_response(request, info.detail())
        return self._metric_series(request, run, name)

    def _delete_run(self, request: Request, run: str) -> Deferred[bytes]:
        def deleted(removed: int | None) -> bytes:
            if removed is None:
                return _no_run(request, run)
            ranks = self.backend.ranks
            if ranks is not None:
                ranks.forget(run)
            _log.info("run {run} deleted ({n} events)", run=run, n=removed)
            return json_response(request, {"run": run, "deleted": removed})

        # 200 once the delete is committed: a crash cannot bring the run back.
        d = self.backend.runs.delete(run).addCallback(deleted)
        return d.addErrback(lambda f: store_failed(request, f))

    def _metric_series(self, request: Request, run: str, name: str) -> bytes | Deferred[bytes]:
        args = request.args or {}
        try:
            from_step = int_param(args, "from_step", 0)
            to_step = int_param(args, "to_step", 0)
            max_points = int_param(args, "max_points", 2, MAX_MAX_POINTS)
            segments = choice_param(args, "segments", ("current", "all")) or "current"
        except BadQueryError as e:
            return bad_query(request, e)
        info = self.backend.runs.get(run)
        if info is None:
            return _no_run(request, run)
        if name not in info.metrics:
            return error_response(request, 404, f"run {run!r} has no metric {name!r}")
        if from_step is not None and to_step is not None and from_step > to_step:
            # An empty range, as the OpenAPI document says: no points, not an error.
            return json_response(
                request, {"run": run, "name": name, "points": [], "downsampled": False}
            )
        hub = self.backend.hub
        segment = None if segments == "all" else hub.segments.current(run, name)
        store = hub.store
        limit = max_points if max_points is not None else DEFAULT_MAX_POINTS

        def answer(_: object) -> bytes:
            # Read the history once what was published before this call is stored.
            kept, downsampled = store.history(run, name, segment, from_step, to_step, limit)
            return json_response(
                request, {"run": run, "name": name, "points": kept, "downsampled": downsampled}
            )

        # A failed sync means events were not stored: the history is still read.
        return store.sync().addBoth(answer).addErrback(lambda f: store_failed(request, f))

    # Distributed ranks (trainstream.ranks)

    def _logs(self, request: Request, run: str) -> bytes | Deferred[bytes]:
        """``?level=&q=&after=&limit=``: the run's log events, searched (``web/logs.py``)."""
        if request.method == b"DELETE":
            request.setHeader(b"allow", b"GET, HEAD")
            return error_response(
                request,
                405,
                "DELETE is not allowed on logs; DELETE /api/runs/{run} removes the run",
            )
        args = request.args or {}
        try:
            raw_levels = [raw.decode("utf-8", "replace") for raw in args.get(b"level", ())]
            levels = sorted({v for raw in raw_levels for v in raw.split(",")})
            bad = [v for v in levels if v not in LEVELS]
            if bad:
                raise BadQueryError(
                    f"level {bad[0]!r} is not one of {', '.join(sorted(LEVELS))}", "level"
                )
            text = single_param(args, "q")  # commas and spaces are part of the text
            if text is not None and len(text) > MAX_QUERY:
                raise BadQueryError(f"q: at most {MAX_QUERY} characters", "q")
            after = int_param(args, "after", 0) or 0
            limit = int_param(args, "limit", 1, MAX_LOG_LIMIT) or DEFAULT_LOG_LIMIT
        except BadQueryError as e:
            return bad_query(request, e)
        if self.backend.runs.get(run) is None:
            return _no_run(request, run)
        hub = self.backend.hub

        def answer(found: LogPage) -> bytes:
            body = ",".join(r.json for r in found.logs)
            after_id = "null" if found.next_after is None else str(found.next_after)
            head = json.dumps({"run": run})[:-1]
            return json_bytes(
                request,
                f'{head},"logs":[{body}],"scanned":{found.scanned},"next_after":{after_id}}}'.encode(),
            )

        d = search_logs(hub.store, hub.last_id, run, levels or None, text, after, limit)
        return d.addCallback(answer).addErrback(lambda f: store_failed(request, f))

    def _ranks(self, request: Request, run: str) -> bytes:
        """``GET /api/runs/{run}/ranks``: per-metric mean/min/max across ranks, laggards."""
        if request.method == b"DELETE":
            request.setHeader(b"allow", b"GET, HEAD")
            return error_response(
                request,
                405,
                "DELETE is not allowed on ranks; DELETE /api/runs/{run} removes the run",
            )
        ranks = self.backend.ranks
        if ranks is None:
            return error_response(request, 404, "this server does not track ranks")
        if self.backend.runs.get(run) is None:
            return _no_run(request, run)
        return json_response(request, ranks.snapshot(run))

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Request) -> bytes:
        if self._openapi is None:
            self._openapi = encode_json(openapi_document()).encode()
        return json_bytes(request, self._openapi)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        if request.path == b"/api":  # Werkzeug matches only GET on the bare prefix
            return _method_not_allowed(request, ["GET", "HEAD"])
        return error_response(request, 404, f"no such API path: {request.path.decode()}")

    @app.handle_errors(RequestRedirect)
    def redirected(self, request: IRequest, failure: Failure) -> bytes:
        # Werkzeug would merge an empty segment away (``runs//metrics``).
        return error_response(
            request, 404, f"no such API path: {request.path.decode('latin-1')} (an empty segment)"
        )

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        valid = set(getattr(failure.value, "valid_methods", None) or ())
        if "GET" in valid:
            valid.add("HEAD")
        raw = request.path.split(b"/")
        if raw[1:3] == [b"api", b"runs"] and len(raw) > 3:
            tail = raw[3:]
            if (
                split_ranks_path(tail) is not None
                or split_ranks_path(tail, b"logs") is not None
                or split_run_path(tail)[1] is not None
            ):
                valid = {"GET", "HEAD"}  # a metric history, ranks and logs are read only
        return _method_not_allowed(request, sorted(valid - {"OPTIONS"}))

    @app.handle_errors(Exception)
    def internal(self, request: IRequest, failure: Failure) -> bytes:
        _log.failure("REST request {path} failed", failure, path=request.path)
        return error_response(request, 500, "internal server error (logged by the server)")


__all__ = ["RestApi", "split_ranks_path", "split_run_path"]
