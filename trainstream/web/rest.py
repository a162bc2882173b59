"""
The REST API under ``/api`` (Klein): answers are JSON, errors too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from trainstream._version import __version__
from trainstream.events import BodyTooLarge, EventError, decode_body, encode_json
from trainstream.web.sse import BadQueryError, filter_from_lists, parse_event_id

if TYPE_CHECKING:
    from trainstream.service import StreamServer

_log = Logger()


def json_response(request: IRequest, obj: object, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return encode_json(obj).encode()


class RestApi:
    """The ``/api`` routes of one server."""

    app = Klein()

    def __init__(self, server: StreamServer) -> None:
        self.server = server

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        server = self.server
        hub = server.hub
        return json_response(
            request,
            {
                "status": "ok",
                "version": __version__,
                "uptime_s": round(server.uptime(), 3),
                "last_id": hub.last_id,
                "epoch": hub.store.epoch,
                "listeners": server.listener_info(),
                "clients": server.clients.counts(),
            },
        )

    @app.route("/events", methods=["POST"])
    def post_events(self, request: Request) -> bytes:
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
        return json_response(request, {"accepted": accepted, "first_id": first, "last_id": last})

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


__all__ = ["RestApi", "json_response"]
