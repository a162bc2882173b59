"""
The REST API under ``/api`` (Klein): answers are JSON, errors too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from trainstream._version import __version__
from trainstream.events import BodyTooLarge, EventError, decode_body, encode_json
from trainstream.ranks import RanksService
from trainstream.web.openapi import openapi_document
from trainstream.web.sse import BadQueryError, filter_from_lists, parse_event_id

if TYPE_CHECKING:
    from trainstream.service import StreamServer

_log = Logger()


def json_response(request: IRequest, obj: object, code: int = 200) -> bytes:
    return _json_bytes(request, encode_json(obj).encode(), code)


def _json_bytes(request: IRequest, body: bytes, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


#: Points a metric history holds at most when the client gives no ``max_points``.
DEFAULT_MAX_POINTS = 10_000
MAX_MAX_POINTS = 1_000_000


class BadParameterError(BadQueryError):
    """A query parameter is wrong: 400 ``{"error", "parameter"}``."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def int_param(
    args: Mapping[bytes, Sequence[bytes]],
    name: str,
    minimum: int,
    maximum: int = 2**63 - 1,
) -> int | None:
    """
    The integer query parameter ``name`` in ``[minimum, maximum]``, or
    ``None`` when absent.

    :raises BadParameterError: naming ``name`` when it is repeated or not such an integer.
    """
    values = args.get(name.encode())
    if not values:
        return None
    if len(values) > 1:
        raise BadParameterError(
            name, f"query parameter {name} is given {len(values)} times; give it once"
        )
    raw = values[0].decode("utf-8", "replace")
    try:
        value = int(raw.strip()) if raw.strip().lstrip("+-").isdigit() else None
    except ValueError:  # over int()'s digit limit
        value = None
    if value is None or not minimum <= value <= maximum:
        bounds = f">= {minimum}" if maximum == 2**63 - 1 else f"from {minimum} to {maximum}"
        raise BadParameterError(
            name, f"query parameter {name} must be an integer {bounds}, got {raw[:40]!r}"
        )
    return value


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


def split_ranks_path(raw_segments: Sequence[bytes]) -> str | None:
    """
    The run of ``/api/runs/{run}/ranks`` (distributed ranks, see
    ``trainstream.ranks``), or ``None`` for another run path.

    The rule: when the path is no metric history (``split_run_path``) and
    has a last segment, after the first, that is literally ``ranks``, the
    segments before it are the run. A run whose name ends in a ``ranks``
    segment is then asked for with its slashes encoded (``a%2Franks``), as
    for ``metrics``.
    """
    if len(raw_segments) < 2 or raw_segments[-1] != b"ranks":
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


def _no_run(request: IRequest, run: str) -> bytes:
    hint = ""
    if "/" in run:
        hint = "; a run name with '/' in it may be sent with '%2F' for each '/'"
    return json_response(request, {"error": f"no run named {run!r}{hint}"}, 404)


class RestApi:
    """The ``/api`` routes of one server."""

    app = Klein()

    def __init__(self, server: StreamServer) -> None:
        self.server = server
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
                "urls": self.server.urls,
            },
        )

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        """
        ``ok``, or 503 ``degraded`` with ``reasons`` (and the first as
        ``reason``) while the history is in trouble, e.g. its writer
        process died and is being restarted.
        """
        server = self.server
        hub = server.hub
        store = hub.store.health()
        answer: dict[str, object] = {
            "status": "degraded" if store.problems else "ok",
            "version": __version__,
            "uptime_s": round(server.uptime(), 3),
            "last_id": hub.last_id,
            "epoch": hub.store.epoch,
            "listeners": server.listener_info(),
            "clients": server.clients.counts(),
            "store": {
                "writer_restarts": store.writer_restarts,
                "events_lost": store.events_lost,
            },
        }
        if store.problems:
            answer["reason"] = store.problems[0]
            answer["reasons"] = list(store.problems)
        return json_response(request, answer, 503 if store.problems else 200)

    @app.route("/events", methods=["POST"])
    def post_events(self, request: Request) -> bytes | Deferred[bytes]:
        assert request.content is not None
        ctype = request.getHeader(b"content-type")
        try:
            items = decode_body(
                request.content.read(),
                ctype.decode("latin-1") if ctype is not None else None,
                self.server.hub.limits,
            )
            accepted, first, last = self.server.hub.accept(items)
        except BodyTooLarge as e:
            return json_response(request, e.to_json(), 413)
        except EventError as e:
            return json_response(request, e.to_json(), 400)
        answer = {"accepted": accepted, "first_id": first, "last_id": last}
        # 200 means stored: answer once the history has committed the batch.
        return self.server.hub.store.sync().addCallback(lambda _: json_response(request, answer))

    @app.route("/events", methods=["GET"])
    def get_events(self, request: Request) -> bytes:
        """Polling fallback: stored events after ``?after=``."""
        args = request.args or {}

        def one(key: bytes) -> str | None:
            values = args.get(key)
            return values[0].decode("utf-8", "replace") if values else None

        def many(key: bytes) -> list[str]:
            return [
                p for v in args.get(key, []) for p in v.decode("utf-8", "replace").split(",") if p
            ]

        try:
            raw_after, raw_limit = one(b"after"), one(b"limit")
            after = parse_event_id(raw_after, "after") if raw_after is not None else 0
            limit = parse_event_id(raw_limit, "limit") if raw_limit is not None else 1000
            if not 1 <= limit <= 10_000:
                raise BadQueryError(f"limit must be 1..10000, got {limit}")
            flt = filter_from_lists(runs=many(b"run"), types=many(b"type"), names=many(b"name"))
        except BadQueryError as e:
            return json_response(request, {"error": str(e)}, 400)
        hub = self.server.hub
        records = hub.store.after(after, flt.matches, limit)
        body = ",".join(r.json for r in records)
        request.setHeader(b"content-type", b"application/json")
        return f'{{"events":[{body}],"last_id":{hub.last_id}}}'.encode()

    @app.route("/runs", methods=["GET"])
    def list_runs(self, request: Request) -> bytes:
        return json_response(request, {"runs": [info.summary() for info in self.server.runs.all()]})

    @app.route("/runs/<path:tail>", methods=["GET", "DELETE"])
    def run_path(self, request: Request, tail: str) -> bytes | Deferred[bytes]:
        """``/runs/{run}`` and ``/runs/{run}/metrics/{name}``: see ``split_run_path``."""
        raw_tail = _raw_tail(request, tail)
        ranks_run = split_ranks_path(raw_tail)
        if ranks_run is not None:
            return self._ranks(request, ranks_run)
        run, name = split_run_path(raw_tail)
        if request.method == b"DELETE":
            if name is not None:
                request.setHeader(b"allow", b"GET, HEAD")
                return json_response(
                    request,
                    {
                        "error": "DELETE is not allowed on a metric history; "
                        "DELETE /api/runs/{run} removes the whole run"
                    },
                    405,
                )
            return self._delete_run(request, run)
        if name is None:
            info = self.server.runs.get(run)
            if info is None:
                return _no_run(request, run)
            return json_response(request, info.detail())
        return self._metric_series(request, run, name)

    def _delete_run(self, request: Request, run: str) -> bytes:
        removed = self.server.runs.delete(run)
        if removed is None:
            return _no_run(request, run)
        ranks = _ranks_service(self.server)
        if ranks is not None:
            ranks.forget(run)
        _log.info("run {run} deleted ({n} events)", run=run, n=removed)
        return json_response(request, {"run": run, "deleted": removed})

    def _metric_series(self, request: Request, run: str, name: str) -> bytes | Deferred[bytes]:
        args: dict[bytes, list[bytes]] = request.args or {}
        try:
            from_step = int_param(args, "from_step", 0)
            to_step = int_param(args, "to_step", 0)
            max_points = int_param(args, "max_points", 2, MAX_MAX_POINTS)
            if from_step is not None and to_step is not None and from_step > to_step:
                raise BadParameterError(
                    "to_step", f"to_step ({to_step}) must not be below from_step ({from_step})"
                )
        except BadParameterError as e:
            return json_response(request, {"error": str(e), "parameter": e.parameter}, 400)
        info = self.server.runs.get(run)
        if info is None:
            return _no_run(request, run)
        if name not in info.metrics:
            return json_response(request, {"error": f"run {run!r} has no metric {name!r}"}, 404)
        segments = (args.get(b"segments") or [b"current"])[0]
        if segments not in (b"current", b"all"):
            return json_response(
                request,
                {"error": "segments must be 'current' or 'all'", "parameter": "segments"},
                400,
            )
        hub = self.server.hub
        segment = None if segments == b"all" else hub.segments.current(run, name)
        store = hub.store
        limit = max_points if max_points is not None else DEFAULT_MAX_POINTS

        def answer(_: object) -> bytes:
            # Read the history once what was published before this call is stored.
            kept, downsampled = store.history(run, name, segment, from_step, to_step, limit)
            return json_response(
                request, {"run": run, "name": name, "points": kept, "downsampled": downsampled}
            )

        return store.sync().addCallback(answer)

    # Distributed ranks (trainstream.ranks)

    def _ranks(self, request: Request, run: str) -> bytes:
        """``GET /api/runs/{run}/ranks``: per-metric mean/min/max across ranks, laggards."""
        if request.method == b"DELETE":
            request.setHeader(b"allow", b"GET, HEAD")
            return json_response(
                request,
                {"error": "DELETE is not allowed on ranks; DELETE /api/runs/{run} removes the run"},
                405,
            )
        ranks = _ranks_service(self.server)
        if ranks is None:
            return json_response(request, {"error": "this server does not track ranks"}, 404)
        if self.server.runs.get(run) is None:
            return _no_run(request, run)
        return json_response(request, ranks.snapshot(run))

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Request) -> bytes:
        if self._openapi is None:
            self._openapi = encode_json(openapi_document()).encode()
        return _json_bytes(request, self._openapi)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return json_response(request, {"error": f"no such API path: {request.path.decode()}"}, 404)

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        method = request.method.decode()
        return json_response(
            request, {"error": f"{method} is not allowed on {request.path.decode()}"}, 405
        )

    @app.handle_errors(Exception)
    def internal(self, request: IRequest, failure: Failure) -> bytes:
        _log.failure("REST request {path} failed", failure, path=request.path)
        return json_response(
            request, {"error": "internal server error (logged by the server)"}, 500
        )


def _ranks_service(server: StreamServer) -> RanksService | None:
    """The server's ``RanksService`` (``server.ranks``), if it has one."""
    ranks = getattr(server, "ranks", None)
    return ranks if isinstance(ranks, RanksService) else None


__all__ = ["RestApi", "json_response", "split_ranks_path"]
