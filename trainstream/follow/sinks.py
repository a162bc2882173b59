"""
Where ``python -m trainstream follow`` publishes
(:class:`~trainstream.follow.follower.Sink`): a running server,
``POST /api/events`` on one keep-alive connection. A 200 means stored
durably, which is what the follower's state waits for, so it POSTs itself
rather than through :class:`trainstream.client.Publisher`, whose queue
drops the oldest events when full and tells no one which were stored.

It retries while the server cannot take events, waiting on the follower's
stop event, so a stop never waits for a server that is gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from trainstream.client.backoff import Backoff
from trainstream.client.http import (
    HTTP,
    UNREACHABLE,
    ClientError,
    KeepAlive,
    decode,
    describe,
    error_text,
    headers,
    parse_endpoint,
)
from trainstream.events import encode_json
from trainstream.follow.follower import Event, Report, Stopped

__all__ = ["HTTPSink"]

#: Events per POST at most (a body stays well under the server's 8 MiB).
BATCH = 5_000
#: Events per ``GET /api/events`` page (the server's most).
PAGE = 10_000


class HTTPSink:
    """
    A trainstream server at ``url``.

    :param give_up_after: seconds the server may stay unreachable (or
        failing) before a call gives up with ``ClientError``; ``None``: retry
        until stopped (``follow`` without ``--once``).
    :raises ClientError: from any call, when the server refuses the token
        (401), or has been down for ``give_up_after`` seconds.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        report: Report,
        stop: threading.Event,
        timeout: float = 10.0,
        give_up_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = parse_endpoint(url)
        self.token = token
        self.report = report
        self.stop = stop
        self.http = HTTP(self.endpoint, token, timeout)
        self.transport = KeepAlive(self.endpoint, timeout)
        self.backoff = Backoff(0.25, 5.0)
        self._down = False
        self._down_since = 0.0
        self.give_up_after = give_up_after
        self.clock = clock
        #: events the server refused for good (named in a log line each)
        self.rejected = 0

    def _retry(self, why: str) -> None:
        if not self._down:
            self._down = True
            self._down_since = self.clock()
            self.report("warning", f"server {self.endpoint.base}: {why}; retrying")
        wait = self.backoff.next()
        patience = self.give_up_after
        if patience is not None:
            left = patience - (self.clock() - self._down_since)
            if left <= 0:
                raise ClientError(
                    f"server {self.endpoint.base}: {why}; gave up after {patience:g} s"
                )
            wait = min(wait, left)
        if self.stop.wait(wait):
            raise Stopped()

    def _up(self) -> None:
        if self._down:
            self._down = False
            self.report("info", f"server {self.endpoint.base} reachable again")
        self.backoff.reset()

    def _get(self, path: str, query: dict[str, Any] | None = None) -> tuple[int, Any]:
        while True:
            try:
                status, body = self.http.get_json(path, query)
            except UNREACHABLE as e:
                self._retry(f"unreachable ({describe(e)})")
                continue
            if status >= 500:
                self._retry(error_text(status, body))
                continue
            self._up()
            return status, body

    def identity(self) -> tuple[str, int]:
        _, body = self._get("/api/health")
        epoch = body.get("epoch") if isinstance(body, dict) else None
        last_id = body.get("last_id") if isinstance(body, dict) else None
        if not isinstance(epoch, str) or type(last_id) is not int:
            raise ClientError(f"{self.endpoint.base} is not a trainstream server (GET /api/health)")
        self._get("/api/runs")  # the token, said now (health needs none): ClientError on 401
        return epoch, last_id

    def stored_since(self, after_id: int, runs: set[str]) -> list[Event]:
        out: list[Event] = []
        while True:
            query = {"after": after_id, "run": sorted(runs), "limit": PAGE}
            status, body = self._get("/api/events", query)
            if status != 200 or not isinstance(body, dict):
                raise ClientError(f"GET /api/events: {error_text(status, body)}")
            events = body.get("events") or []
            out.extend(events)
            if len(events) < PAGE:
                return out
            after_id = int(events[-1]["id"])

    def send(self, events: list[Event]) -> int | None:
        last: int | None = None
        for i in range(0, len(events), BATCH):
            answer = self._send(events[i : i + BATCH])
            last = answer if answer is not None else last
        return last

    def _send(self, batch: list[Event]) -> int | None:
        """POST ``batch`` until stored; the id of its last stored event."""
        last: int | None = None
        while batch:
            body = encode_json(batch).encode()
            try:
                status, raw = self.transport.post(
                    "/api/events", body, headers(self.token, **{"Content-Type": "application/json"})
                )
            except UNREACHABLE as e:
                self._retry(f"unreachable ({describe(e)})")
                continue
            answer = decode(raw)
            if status == 200:
                self._up()
                got = answer.get("last_id") if isinstance(answer, dict) else None
                return got if type(got) is int else last
            if status in (401, 403):  # no token, or one that may only read
                raise ClientError(error_text(status, answer, "a token that may write: --token"))
            if status == 413 and len(batch) > 1:
                half = len(batch) // 2
                last = self._send(batch[:half]) or last
                batch = batch[half:]
                continue
            index = answer.get("index") if isinstance(answer, dict) else None
            if status in (400, 413) and type(index) is int and 0 <= index < len(batch):
                self.rejected += 1
                self.report(
                    "warning",
                    f"server refused an event of run {batch[index].get('run')}: "
                    f"{error_text(status, answer)}",
                )
                batch = batch[:index] + batch[index + 1 :]
                continue
            if status in (400, 413):
                self.rejected += len(batch)
                self.report(
                    "warning", f"server refused {len(batch)} events: {error_text(status, answer)}"
                )
                return last
            self._retry(error_text(status, answer))  # 5xx, 507 (disk full): wait
        return last

    def close(self) -> None:
        self.transport.close()
