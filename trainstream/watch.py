"""
Terminal clients of a trainstream server: ``tail`` prints every event as one
JSON line, ``watch`` shows a live table of runs (rich).

Both use a small blocking Server-Sent Events client over ``http.client``
(no reactor): it remembers the last event id, reconnects with backoff and
``Last-Event-ID`` after any disconnect, an ``overflow`` or a server restart,
and never hands out an event twice (ids strictly increase within one
history). A ``reset`` (the server no longer holds what came after our id, or
its history changed: a new ``epoch`` in ``/api/health``) is handed out as a
``Reset``, after which ids follow the server's new history.

The model of ``watch`` (``WatchModel``) only applies events and snapshots;
``render`` turns it into a rich renderable. Both are pure and unit-tested.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import json
import math
import os
import queue
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

TOKEN_ENV = "TRAINSTREAM_TOKEN"
#: First reconnect delay when the server sent no ``retry:``; doubles per failure.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
#: No byte for this long (the server sends a keepalive every 15 s): reconnect.
READ_TIMEOUT = 45.0
CONNECT_TIMEOUT = 10.0
SPARK_LEN = 30
SPARK_GLYPHS = "▁▂▃▄▅▆▇█"
EVENT_TYPES = frozenset({"metric", "status", "log", "hparams", "alert"})
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class WatchError(Exception):
    """A refusal that retrying will not fix (bad URL, 401, bad filter)."""


# URLs


@dataclass(frozen=True)
class Endpoint:
    """
    Where the server is: its base URL (scheme, host, port, path prefix). Any
    listener serves everything, so ``/events`` and ``/api`` hang off the base.
    """

    scheme: str
    host: str
    port: int
    prefix: str = ""
    #: ``?run=`` and ``?token=`` found in an SSE URL given on the command line.
    query: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def parse_endpoint(url: str) -> Endpoint:
    """
    ``http://host:port``, ``http://host:port/``, ``.../events?run=x``,
    ``.../api``, ``.../api/health`` or ``host:port``: the server's base.
    """
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WatchError(f"unsupported URL scheme {parts.scheme!r} in {url!r}: use http or https")
    if not parts.hostname:
        raise WatchError(f"no host in {url!r}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise WatchError(f"bad port in {url!r}") from None
    path = parts.path.rstrip("/")
    segments = path.split("/")
    for marker in ("events", "api", "ws"):
        if marker in segments:
            path = "/".join(segments[: segments.index(marker)])
            break
    query = {k: tuple(v) for k, v in parse_qs(parts.query).items()}
    return Endpoint(scheme, parts.hostname, port, path, query)


def quote_segment(name: str) -> str:
    """A run or metric name as one path segment (``/`` as ``%2F``)."""
    return quote(name, safe="")


# HTTP


class HTTP:
    """Blocking JSON GETs against one server."""

    def __init__(self, endpoint: Endpoint, token: str | None, timeout: float = CONNECT_TIMEOUT):
        self.endpoint = endpoint
        self.token = token
        self.timeout = timeout

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {"User-Agent": "trainstream-cli", **extra}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def get_json(self, path: str, query: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """``(status, body)``; ``OSError``/``HTTPException`` when unreachable."""
        target = self.endpoint.prefix + path
        if query:
            target += "?" + urlencode(query, doseq=True)
        conn = self.endpoint.connection(self.timeout)
        try:
            conn.request("GET", target, headers=self.headers(Accept="application/json"))
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if response.status == 401:
            raise WatchError(_error_text(401, body, "a token is needed: --token or $" + TOKEN_ENV))
        return response.status, body


def _error_text(status: int, body: object, fallback: str = "") -> str:
    message = body.get("error") if isinstance(body, dict) else None
    return f"HTTP {status}: {message or fallback or 'request refused'}"


# Server-Sent Events


@dataclass(frozen=True)
class SSEMessage:
    event: str
    data: str
    id: str | None


class SSEParser:
    """The line protocol of text/event-stream (WHATWG), one line at a time."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SSEMessage | None:
        """A line without its end of line; returns a message at a blank line."""
        if line == "":
            if not self._data:
                self._event = ""
                return None
            message = SSEMessage(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return message
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


@dataclass(frozen=True)
class Event:
    id: int
    data: dict[str, Any]


@dataclass(frozen=True)
class Reset:
    """Events after our id are gone, or the server's history is another one."""

    reason: str
    oldest_id: int | None

    def to_json(self) -> dict[str, Any]:
        return {"type": "reset", "reason": self.reason, "oldest_id": self.oldest_id}


@dataclass(frozen=True)
class ConnState:
    status: str  # connecting | connected | reconnecting | stopped
    detail: str = ""
    retry_at: float | None = None  # time.monotonic() of the next attempt
    last_id: int | None = None


class SSEClient:
    """
    A resuming stream of events: iterate ``items()`` for ``Event`` and
    ``Reset`` objects, forever (until ``close()`` from another thread).

    :param after: resume after this id (``None``: live events only).
    :param on_state: called (in the iterating thread) at each change of
        connection state.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        token: str | None = None,
        runs: Sequence[str] = (),
        names: Sequence[str] = (),
        types: Sequence[str] = (),
        after: int | None = None,
        on_state: Callable[[ConnState], None] | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self.http = HTTP(endpoint, token)
        self.runs, self.names, self.types = tuple(runs), tuple(names), tuple(types)
        self.last_id = after
        self.epoch: object = None
        self.retry_s: float | None = None
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.read_timeout = read_timeout
        self.on_state = on_state
        self.state = ConnState("connecting", last_id=after)
        self.connections = 0
        self._closed = threading.Event()
        self._sock: socket.socket | None = None

    # Control

    def close(self) -> None:
        """From any thread: stop iterating as soon as possible."""
        self._closed.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _set_state(self, status: str, detail: str = "", retry_at: float | None = None) -> None:
        self.state = ConnState(status, detail, retry_at, self.last_id)
        if self.on_state is not None:
            self.on_state(self.state)

    def _path(self) -> str:
        query: list[tuple[str, str]] = [("run", r) for r in self.runs]
        query += [("name", n) for n in self.names]
        if self.types:
            query.append(("type", ",".join(self.types)))
        path = self.endpoint.prefix + "/events"
        return path + ("?" + urlencode(query) if query else "")

    # The stream

    def items(self) -> Iterator[Event | Reset]:
        failures = 0
        while not self.closed:
            delay: float | None = None
            try:
                reset = self._check_epoch()
                if reset is not None:
                    yield reset
                ended = yield from self._one_connection()
                failures = 0
                if ended == "overflow":
                    delay = 0.0
                    why = "server closed the stream (too slow); resuming"
                else:
                    why = "server ended the stream"
            except WatchError:
                self._set_state("stopped")
                raise
            except (OSError, http.client.HTTPException, ValueError) as e:
                why = _describe(e)
            if self.closed:
                break
            if delay is None:
                base = self.retry_s if self.retry_s is not None else self.backoff_initial
                delay = min(self.backoff_max, base * (2**failures))
                failures += 1
            self._set_state("reconnecting", why, time.monotonic() + delay)
            if delay and self._closed.wait(delay):
                break
        self._set_state("stopped")

    def _check_epoch(self) -> Reset | None:
        """A new ``epoch`` in health: ids restarted, resume from the start."""
        status, body = self.http.get_json("/api/health")
        if status != 200 or not isinstance(body, dict) or "epoch" not in body:
            return None
        epoch = body["epoch"]
        if self.epoch is None:
            self.epoch = epoch
            return None
        if epoch == self.epoch:
            return None
        self.epoch = epoch
        self.last_id = 0
        return Reset("the server's history changed (new epoch): its ids started again", None)

    def _one_connection(self) -> Generator[Event | Reset, None, str]:
        """Events of one response; returns how it ended (``"eof"``/``"overflow"``)."""
        self._set_state("connecting")
        headers = self.http.headers(Accept="text/event-stream")
        headers["Cache-Control"] = "no-cache"
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        conn = self.endpoint.connection(CONNECT_TIMEOUT)
        try:
            conn.request("GET", self._path(), headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                raw = response.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                text = _error_text(response.status, body)
                if response.status == 401:
                    raise WatchError(text + " (--token or $" + TOKEN_ENV + ")")
                if 400 <= response.status < 500:
                    raise WatchError(text)
                raise http.client.HTTPException(text)
            ctype = response.getheader("content-type", "")
            if not ctype.startswith("text/event-stream"):
                raise WatchError(f"{self.endpoint.base}/events is not an event stream ({ctype})")
            self._sock = conn.sock
            if conn.sock is not None:
                conn.sock.settimeout(self.read_timeout)
            self.connections += 1
            self._set_state("connected")
            parser = SSEParser()
            while not self.closed:
                raw_line = response.readline()
                if not raw_line:
                    return "eof"
                line = raw_line.decode("utf-8", "replace")
                if line.endswith("\n"):
                    line = line[:-1]
                if line.endswith("\r"):
                    line = line[:-1]
                message = parser.feed(line)
                if parser.retry_ms is not None:
                    self.retry_s = min(self.backoff_max, max(0.05, parser.retry_ms / 1000))
                if message is None:
                    continue
                if message.event == "overflow":
                    return "overflow"
                if message.event == "reset":
                    info = json.loads(message.data)
                    oldest = info.get("oldest_id")
                    self.last_id = oldest - 1 if isinstance(oldest, int) else None
                    yield Reset(str(info.get("reason", "")), oldest)
                    continue
                item = self._event(message)
                if item is not None:
                    yield item
            return "closed"
        finally:
            self._sock = None
            conn.close()

    def _event(self, message: SSEMessage) -> Event | None:
        data = json.loads(message.data)
        if not isinstance(data, dict):
            return None
        raw_id: Any = data.get("id", message.id)
        try:
            event_id = int(raw_id)
        except (TypeError, ValueError):
            return None
        if self.last_id is not None and event_id <= self.last_id:
            return None  # already handed out: never twice
        self.last_id = event_id
        return Event(event_id, data)


def _describe(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    text = str(error) or type(error).__name__
    return text if len(text) < 80 else text[:77] + "..."


# tail


def compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass
class TailOptions:
    url: str
    runs: Sequence[str] = ()
    names: Sequence[str] = ()
    types: Sequence[str] = ()
    token: str | None = None
    after: int | None = None
    limit: int | None = None
    once: bool = False
    quiet: bool = False


def run_tail(options: TailOptions, out: IO[str], err: IO[str]) -> int:
    """
    Print each event as one JSON line on ``out`` (flushed per line); a reset
    is printed there too, as ``{"type": "reset", "reason", "oldest_id"}``.
    Connection news goes to ``err`` unless ``quiet``.
    """
    endpoint = parse_endpoint(options.url)
    runs = list(options.runs) + list(endpoint.query.get("run", ()))
    token = options.token or _first(endpoint.query.get("token"))
    printed = 0

    def emit(obj: object) -> None:
        out.write(compact(obj) + "\n")
        out.flush()

    if options.once:
        return _tail_once(endpoint, token, runs, options, emit)

    def news(state: ConnState) -> None:
        if options.quiet:
            return
        if state.status == "reconnecting" and state.retry_at is not None:
            wait = max(0.0, state.retry_at - time.monotonic())
            err.write(f"trainstream tail: {state.detail}; reconnecting in {wait:.1f}s\n")
            err.flush()

    client = SSEClient(
        endpoint, token, runs, options.names, options.types, options.after, on_state=news
    )
    for item in client.items():
        if isinstance(item, Reset):
            emit(item.to_json())
            continue
        emit(item.data)
        printed += 1
        if options.limit is not None and printed >= options.limit:
            client.close()
            break
    return 0


def _tail_once(
    endpoint: Endpoint,
    token: str | None,
    runs: Sequence[str],
    options: TailOptions,
    emit: Callable[[object], None],
) -> int:
    """The stored events after ``--after`` (default 0) up to now, then exit."""
    http_ = HTTP(endpoint, token)
    after = options.after or 0
    printed = 0
    query: dict[str, Any] = {"run": list(runs), "name": list(options.names)}
    if options.types:
        query["type"] = ",".join(options.types)
    end: int | None = None
    while True:
        status, body = http_.get_json("/api/events", {**query, "after": after, "limit": 1000})
        if status != 200 or not isinstance(body, dict):
            raise WatchError(_error_text(status, body))
        if end is None:
            end = int(body.get("last_id", 0))
        events = [e for e in body.get("events", []) if int(e["id"]) <= end]
        for event in events:
            emit(event)
            printed += 1
            if options.limit is not None and printed >= options.limit:
                return 0
        if len(events) < len(body.get("events", [])) or not events:
            return 0
        after = int(events[-1]["id"])


def _first(values: Sequence[str] | None) -> str | None:
    return values[0] if values else None


# watch: the model


def to_float(value: object) -> float | None:
    """A metric value: a JSON number or one of "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return _NON_FINITE.get(value)
    return None


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.5g}"


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@dataclass
class Series:
    """The latest values of one (run, metric), for the value and its sparkline."""

    points: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=SPARK_LEN))
    last_step: int | None = None
    last_value: float | None = None

    def add(self, step: int, value: float) -> None:
        if self.last_step is not None and step < self.last_step:
            self.points.clear()  # resumed from a checkpoint: a new segment
        self.points.append((step, value))
        self.last_step, self.last_value = step, value

    def holds(self, step: int, value: float) -> bool:
        return any(s == step and _same(v, value) for s, v in self.points)


@dataclass
class RunView:
    run: str
    state: str = "created"
    updated: float | None = None
    last_step: int | None = None
    epoch: int | None = None
    rewind_to: int | None = None
    alerts: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Series] = field(default_factory=dict)


@dataclass
class Snapshot:
    """
    What REST said: ``last_id`` is health's before the reads (the stream
    resumes after it), ``boundary`` health's after them (events up to it may
    already be in ``runs``).
    """

    last_id: int
    boundary: int
    epoch: object
    runs: list[RunView]


class WatchModel:
    """The state ``watch`` shows; fed snapshots and events, in one thread."""

    def __init__(self, spark_len: int = SPARK_LEN, messages: int = 5) -> None:
        self.spark_len = spark_len
        self.runs: dict[str, RunView] = {}
        self.last_id: int | None = None
        self.boundary = 0
        self.loaded = False
        self.messages: deque[str] = deque(maxlen=messages)

    def load(self, snapshot: Snapshot) -> None:
        self.runs = {view.run: view for view in snapshot.runs}
        for view in self.runs.values():
            for series in view.metrics.values():
                series.points = deque(series.points, maxlen=self.spark_len)
        self.last_id = snapshot.last_id
        self.boundary = snapshot.boundary
        self.loaded = True

    def reset(self, reset: Reset) -> None:
        self.note(f"reset: {reset.reason}")

    def note(self, text: str) -> None:
        self.messages.append(text)

    def _series(self, view: RunView, name: str) -> Series:
        series = view.metrics.get(name)
        if series is None:
            series = view.metrics[name] = Series(deque(maxlen=self.spark_len))
        return series

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one event; ``False`` for one already applied (by id or snapshot)."""
        event_id = event.get("id")
        if isinstance(event_id, int):
            if self.last_id is not None and event_id <= self.last_id:
                return False
            self.last_id = event_id
        run = event.get("run")
        kind = event.get("type")
        if not isinstance(run, str):
            return False
        view = self.runs.get(run)
        if view is None:
            view = self.runs[run] = RunView(run)
        when = event.get("time")
        if isinstance(when, int | float):
            view.updated = max(view.updated or 0.0, float(when))
        in_snapshot = isinstance(event_id, int) and event_id <= self.boundary
        if kind == "metric":
            value = to_float(event.get("value"))
            step = event.get("step")
            name = event.get("name")
            if value is None or not isinstance(step, int) or not isinstance(name, str):
                return False
            series = self._series(view, name)
            if in_snapshot and series.holds(step, value):
                return False
            series.add(step, value)
            view.last_step = step
            if view.state in ("created", "stalled"):
                view.state = "running"
        elif kind == "status":
            state = event.get("state")
            if isinstance(state, str):
                view.state = state
            if isinstance(event.get("epoch"), int):
                view.epoch = event["epoch"]
            if isinstance(event.get("rewind_to"), int):
                view.rewind_to = event["rewind_to"]
                self.note(f"{run}: resumed from a checkpoint at step {view.rewind_to}")
            elif state in ("failed", "stalled") and event.get("message"):
                self.note(f"{run}: {state}: {event['message']}")
        elif kind == "alert":
            view.alerts += 1
            if not in_snapshot:
                self.note(f"{run}: alert {event.get('kind', '')}: {event.get('message', '')}")
        elif kind in ("log", "hparams"):
            if view.state == "stalled":
                view.state = "running"
            if kind == "hparams" and isinstance(event.get("params"), dict):
                view.hparams.update(event["params"])
            if kind == "log" and event.get("level") in ("warning", "error"):
                self.note(f"{run}: {event['level']}: {event.get('message', '')}")
        return True

    def columns(self, limit: int, name_globs: Sequence[str] = ()) -> list[str]:
        """The metric names to show: the most common across runs, matching the globs."""
        return choose_columns((list(v.metrics) for v in self.runs.values()), limit, name_globs)


def choose_columns(
    names_per_run: Iterable[Iterable[str]], limit: int, name_globs: Sequence[str] = ()
) -> list[str]:
    counts: Counter[str] = Counter()
    for names in names_per_run:
        counts.update(set(names))
    picked = [n for n in counts if not name_globs or matches_any(n, name_globs)]
    picked.sort(key=lambda n: (-counts[n], n))
    return picked[: max(0, limit)]


def matches_any(name: str, globs: Sequence[str]) -> bool:
    return any(g == "*" or fnmatch.fnmatchcase(name, g) for g in globs)


# watch: loading from REST


def load_snapshot(
    http_: HTTP,
    run_globs: Sequence[str] = (),
    name_globs: Sequence[str] = (),
    columns: int = 4,
    spark_len: int = SPARK_LEN,
) -> Snapshot:
    """Health, then the runs and the recent points of the shown metrics, then health."""
    health = _ok(http_, "/api/health")
    last_id = int(health.get("last_id", 0))
    listing = _ok(http_, "/api/runs").get("runs", [])
    wanted = [r for r in listing if not run_globs or matches_any(str(r.get("run")), run_globs)]
    shown = choose_columns((r.get("metrics", []) for r in wanted), columns, name_globs)
    views: list[RunView] = []
    for summary in wanted:
        run = str(summary["run"])
        status, detail = http_.get_json("/api/runs/" + quote_segment(run))
        if status == 404:
            continue  # deleted meanwhile
        if status != 200 or not isinstance(detail, dict):
            raise http.client.HTTPException(_error_text(status, detail))
        view = RunView(
            run,
            state=str(detail.get("state", "created")),
            updated=_number(detail.get("updated", summary.get("updated"))),
            last_step=_int(detail.get("last_step", summary.get("last_step"))),
            hparams=dict(detail.get("hparams") or {}),
        )
        for name, info in (detail.get("metrics") or {}).items():
            series = Series(deque(maxlen=spark_len))
            if name in shown:
                for step, value in _recent_points(http_, run, name, info, spark_len):
                    series.add(step, value)
            last_step, last_value = _int(info.get("last_step")), to_float(info.get("last_value"))
            if last_step is not None and last_value is not None:
                if not series.points or series.points[-1][0] != last_step:
                    series.add(last_step, last_value)
            view.metrics[name] = series
        views.append(view)
    boundary = int(_ok(http_, "/api/health").get("last_id", last_id))
    return Snapshot(last_id, boundary, health.get("epoch"), views)


def _recent_points(
    http_: HTTP, run: str, name: str, info: Mapping[str, Any], n: int
) -> list[tuple[int, float]]:
    """About the last ``n`` points of the current segment."""
    count = _int(info.get("count")) or 0
    last_step = _int(info.get("last_step")) or 0
    path = f"/api/runs/{quote_segment(run)}/metrics/{quote_segment(name)}"
    query: dict[str, int] = {"max_points": max(2, 8 * n)}
    if count > 8 * n and last_step > 0:
        # Guess a step range holding ~2n points from the mean spacing.
        query["from_step"] = max(0, last_step - math.ceil(last_step * 2 * n / count))
    status, body = http_.get_json(path, query)
    points = body.get("points", []) if status == 200 and isinstance(body, dict) else []
    out = [
        (int(p[0]), v)
        for p in points
        if (v := to_float(p[1])) is not None and isinstance(p[0], int)
    ]
    return out[-n:]


def _ok(http_: HTTP, path: str) -> dict[str, Any]:
    status, body = http_.get_json(path)
    if status != 200 or not isinstance(body, dict):
        raise http.client.HTTPException(_error_text(status, body, f"GET {path} failed"))
    return body


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# watch: rendering

_STATE_STYLES = {
    "running": "bold green",
    "created": "cyan",
    "paused": "yellow",
    "finished": "blue",
    "failed": "bold red",
    "stalled": "bold magenta",
}


def sparkline(values: Sequence[float]) -> str:
    """``▁▂▃▄▅▆▇█`` scaled to the finite values; ``!`` for NaN or an infinity."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "!" * len(values)
    lo, hi = min(finite), max(finite)
    top = len(SPARK_GLYPHS) - 1
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append("!")
        elif hi == lo:
            out.append(SPARK_GLYPHS[top // 2])
        else:
            out.append(SPARK_GLYPHS[round((v - lo) / (hi - lo) * top)])
    return "".join(out)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h"
    return f"{seconds // 86400:.0f}d"


def header_text(url: str, state: ConnState, model: WatchModel, now_monotonic: float) -> Any:
    from rich.text import Text

    text = Text()
    text.append("trainstream ", style="bold")
    text.append(url, style="dim")
    text.append("  ")
    if state.status == "connected":
        text.append("● connected", style="green")
    elif state.status == "reconnecting":
        wait = max(0.0, (state.retry_at or now_monotonic) - now_monotonic)
        text.append(f"◌ reconnecting in {wait:.1f}s", style="yellow")
        if state.detail:
            text.append(f" ({state.detail})", style="yellow dim")
    elif state.status == "stopped":
        text.append("■ stopped", style="red")
    else:
        text.append("◌ connecting", style="yellow")
    last = model.last_id
    text.append(f"  last id {last if last is not None else '-'}", style="dim")
    text.append(f"  {len(model.runs)} run{'s' if len(model.runs) != 1 else ''}", style="dim")
    return text


def render(
    model: WatchModel,
    state: ConnState,
    url: str,
    columns: Sequence[str],
    now: float | None = None,
    now_monotonic: float | None = None,
    max_rows: int = 40,
    width: int = 120,
) -> RenderableType:
    """The whole screen: header, runs table, recent notes; ``width`` sizes the sparklines."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    now_monotonic = time.monotonic() if now_monotonic is None else now_monotonic
    views = sorted(model.runs.values(), key=lambda v: (-(v.updated or 0.0), v.run))[:max_rows]
    run_width = min(32, max((len(v.run) for v in views), default=3))
    # run, state (+ alerts), age, step, with padding; a metric needs 12 (value)
    # and then gets up to spark_len + 1 for its sparkline.
    avail = width - (run_width + 2 + 14 + 6 + 9)
    hidden = list(columns)
    columns = list(columns)
    while columns and avail // len(columns) < 12:
        columns.pop()
    hidden = hidden[len(columns) :]
    spark = max(0, min(model.spark_len, avail // max(1, len(columns)) - 13))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    table.add_column("run", style="bold", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("state", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    for name in columns:
        table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=11 + spark + 1)
    for view in views:
        state_text = Text(view.state, style=_STATE_STYLES.get(view.state, ""))
        if view.alerts:
            state_text.append(f" ⚠{view.alerts}", style="red")
        age = format_age(now - view.updated if view.updated is not None else None)
        step = "-" if view.last_step is None else str(view.last_step)
        cells: list[Any] = [view.run, state_text, age, step]
        for name in columns:
            series = view.metrics.get(name)
            if series is None or series.last_value is None:
                cells.append(Text(""))
                continue
            value = series.last_value
            cell = Text(format_value(value), style="" if math.isfinite(value) else "bold red")
            if spark:
                values = [v for _, v in series.points][-spark:]
                cell.append(" ")
                cell.append(sparkline(values), style="cyan")
            cells.append(cell)
        table.add_row(*cells)
    parts: list[Any] = [header_text(url, state, model, now_monotonic)]
    if not model.loaded:
        parts.append(Text("loading…", style="dim"))
    elif not views:
        parts.append(Text("no runs yet", style="dim"))
    else:
        parts.append(table)
        if len(model.runs) > max_rows:
            parts.append(Text(f"… and {len(model.runs) - max_rows} more runs", style="dim"))
        if hidden:
            parts.append(Text(f"not shown (too narrow): {', '.join(hidden)}", style="dim"))
    for message in model.messages:
        parts.append(Text(message, style="dim"))
    return Group(*parts)


# watch: the feeder thread and the screen loop


@dataclass
class WatchOptions:
    url: str
    runs: Sequence[str] = ()
    names: Sequence[str] = ()
    token: str | None = None
    columns: int = 4
    frames: int | None = None
    refresh_hz: float = 4.0


class Feeder:
    """
    Runs in a thread: loads a snapshot from REST, then streams events from
    the id taken before it; after a reset, loads again. Puts ``Snapshot``,
    ``Event`` and ``Reset`` items on ``sink``.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        token: str | None,
        runs: Sequence[str],
        names: Sequence[str],
        columns: int,
        sink: Callable[[Snapshot | Event | Reset], None],
        backoff_initial: float = BACKOFF_INITIAL,
    ) -> None:
        self.http = HTTP(endpoint, token)
        self.endpoint = endpoint
        self.token = token
        self.runs, self.names = tuple(runs), tuple(names)
        self.columns = columns
        self.sink = sink
        self.backoff_initial = backoff_initial
        self.state = ConnState("connecting")
        self.error: WatchError | None = None
        self._closed = threading.Event()
        self._client: SSEClient | None = None

    def close(self) -> None:
        self._closed.set()
        client = self._client
        if client is not None:
            client.close()

    def _set_state(self, state: ConnState) -> None:
        self.state = state

    def run(self) -> None:
        try:
            self._run()
        except WatchError as e:
            self.error = e
            self.state = ConnState("stopped", str(e))

    def _run(self) -> None:
        failures = 0
        while not self._closed.is_set():
            try:
                snapshot = load_snapshot(self.http, self.runs, self.names, self.columns)
            except (OSError, http.client.HTTPException, ValueError) as e:
                delay = min(BACKOFF_MAX, self.backoff_initial * 2**failures)
                failures += 1
                self.state = ConnState("reconnecting", _describe(e), time.monotonic() + delay)
                if self._closed.wait(delay):
                    return
                continue
            failures = 0
            self.sink(snapshot)
            client = SSEClient(
                self.endpoint,
                self.token,
                self.runs,
                self.names,
                after=snapshot.last_id,
                on_state=self._set_state,
                backoff_initial=self.backoff_initial,
            )
            client.epoch = snapshot.epoch
            self._client = client
            if self._closed.is_set():
                return
            for item in client.items():
                self.sink(item)
                if isinstance(item, Reset):
                    client.close()
                    break  # load again: the snapshot is the truth after a reset


def run_watch(options: WatchOptions, console: Console | None = None) -> int:
    """
    On a terminal, a live screen until Ctrl-C (or ``frames``); otherwise
    (a pipe, a file) nothing until the end, then the last frame.
    """
    from rich.console import Console
    from rich.live import Live

    endpoint = parse_endpoint(options.url)
    runs = list(options.runs) + list(endpoint.query.get("run", ()))
    token = options.token or _first(endpoint.query.get("token"))
    console = console or Console()
    model = WatchModel()
    inbox: queue.Queue[Snapshot | Event | Reset] = queue.Queue()
    feeder = Feeder(endpoint, token, runs, options.names, options.columns, inbox.put)
    thread = threading.Thread(target=feeder.run, name="trainstream-feed", daemon=True)
    thread.start()
    period = 1.0 / max(0.1, options.refresh_hz)

    def screen() -> RenderableType:
        columns = model.columns(options.columns, options.names)
        return render(model, feeder.state, endpoint.base, columns, width=console.width)

    live = Live(screen(), console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        frames = 0
        while feeder.error is None:
            _drain(inbox, model, time.monotonic() + period)
            if live is not None:
                live.update(screen(), refresh=True)
            frames += model.loaded
            if options.frames is not None and frames >= options.frames:
                break
    except KeyboardInterrupt:
        pass
    finally:
        feeder.close()
        if live is not None:
            live.stop()
    if live is None:
        console.print(screen())
    if feeder.error is not None:
        console.print(f"trainstream watch: {feeder.error}", style="red")
        return 1
    return 0


def _drain(inbox: queue.Queue[Snapshot | Event | Reset], model: WatchModel, until: float) -> None:
    """Apply what the feeder sends until ``until`` (monotonic)."""
    while (left := until - time.monotonic()) > 0:
        try:
            item = inbox.get(timeout=left)
        except queue.Empty:
            return
        if isinstance(item, Snapshot):
            model.load(item)
        elif isinstance(item, Reset):
            model.reset(item)
        else:
            model.apply(item.data)


def quiet_broken_pipe() -> None:
    """After EPIPE on stdout: make the interpreter's final flush silent."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
