"""
Publishing to a trainstream server in another process (``twistd trainstream``
or another machine): the same Run API as the embedded server.

``log()`` only appends to a bounded queue; a background thread sends
batches with ``POST /api/events`` over one keep-alive connection, retrying
with backoff while the server is unreachable. When the queue is full the
oldest events are dropped and counted, so the training loop never blocks and
never grows without bound. No reactor is involved: this module imports no
Twisted, so a training script pays nothing for it.

``Subscriber`` reads the other way: the server's events as an iterator of
dicts, resuming by id across reconnects (the SSE reader of
``trainstream.watch``); ``subscribe_deferred`` is its form for code in the
reactor thread (Twisted is imported only when it is called).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from trainstream.events import encode_json, metric_events, validate_event
from trainstream.watch import WatchError as SubscriberError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from trainstream.watch import Event as WatchEvent, Reset

Event = dict[str, object]

_logger = logging.getLogger(__name__)


def api_base(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path prefix)`` of a server URL (base, ``/api`` or ``/events``)."""
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"trainstream URL must be http(s)://host:port, not {url!r}")
    if parts.hostname is None:
        raise ValueError(f"trainstream URL {url!r} has no host")
    prefix = parts.path.rstrip("/")
    for suffix in ("/api", "/events", "/ws"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, prefix


class Publisher:
    """
    A run published to a remote server. Every method may be called from any
    thread; none waits for the network except ``flush`` and ``close``.

    :param url: the server, e.g. ``http://127.0.0.1:8890`` (any listener).
    :param run: the run's name.
    :param token: the server's bearer token, if it has one.
    :param max_queue: events kept while the server is unreachable; past it
        the oldest are dropped (``dropped`` counts them).
    :param linger: seconds to let events gather before a POST (``flush``
        does not wait for it).
    :param report_every: seconds between the publisher's own metrics
        (``trainstream/log_us``, ``trainstream/queue_depth``,
        ``trainstream/dropped``), or 0 for none.
    """

    def __init__(
        self,
        url: str,
        run: str,
        token: str | None = None,
        hparams: Mapping[str, object] | None = None,
        max_queue: int = 100_000,
        batch_size: int = 5_000,
        timeout: float = 10.0,
        max_backoff: float = 10.0,
        report_every: float = 10.0,
        flush_at_exit: float = 5.0,
        linger: float = 0.25,
    ) -> None:
        self.scheme, self.host, self.port, self.prefix = api_base(url)
        self.run = run
        self.token = token
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.report_every = report_every
        self.linger = linger
        #: events dropped because the queue was full (server unreachable)
        self.dropped = 0
        #: events the server refused for good (should not happen: log()
        #: checks them); the others of their batch are sent all the same
        self.rejected = 0
        #: the latest refused events with the server's reason (at most 100)
        self.rejected_events: deque[tuple[Event, str]] = deque(maxlen=100)
        #: events the server acknowledged (stored)
        self.sent = 0
        self.last_error: str | None = None
        self._queue: deque[Event] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._in_flight = 0
        self._closing = False
        self._flushing = 0
        self._log_ns = 0
        self._log_calls = 0
        self._checked: set[str] = set()
        self._connection: http.client.HTTPConnection | None = None
        validate_event({"type": "log", "run": run, "level": "info", "message": ""})
        self._thread = threading.Thread(
            target=self._send_loop, name=f"trainstream-publisher-{run}", daemon=True
        )
        self._thread.start()
        if flush_at_exit:
            atexit.register(self._at_exit, flush_at_exit)
        self.status("created")
        if hparams:
            self.hparams(hparams)

    # The Run API

    def log(self, metrics: Mapping[str, Any], step: int, time_s: float | None = None) -> None:
        """Queue one metric event per ``{name: value}``; raises ``EventError`` at once if bad."""
        started = time.perf_counter_ns()
        t = time.time() if time_s is None else time_s
        events = metric_events(self.run, metrics, step, t, self._checked)
        self._put(events)
        self._log_ns += time.perf_counter_ns() - started
        self._log_calls += 1

    def status(self, state: str, epoch: int | None = None, message: str | None = None) -> None:
        event: Event = {"type": "status", "run": self.run, "state": state}
        if epoch is not None:
            event["epoch"] = epoch
        if message is not None:
            event["message"] = message
        self._put([self._checked_event(event)])

    def text(self, message: str, level: str = "info") -> None:
        self._put(
            [
                self._checked_event(
                    {"type": "log", "run": self.run, "level": level, "message": message}
                )
            ]
        )

    def hparams(self, params: Mapping[str, object]) -> None:
        self._put(
            [self._checked_event({"type": "hparams", "run": self.run, "params": dict(params)})]
        )

    def finish(self) -> None:
        self.status("finished")

    def fail(self, message: str) -> None:
        self.status("failed", message=message)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored; ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            self._flushing += 1
            try:
                self._wake.notify_all()
                while self._queue or self._in_flight:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._wake.wait(remaining if remaining is not None else 1.0)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush (bounded) and stop the sending thread."""
        flushed = self.flush(timeout)
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout)
        return flushed

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # Inside

    def _checked_event(self, event: Event) -> Event:
        return validate_event(event)  # raises EventError here, in the caller; sets "time"

    def _put(self, events: list[Event]) -> None:
        queue = self._queue
        with self._lock:
            overflow = len(queue) + len(events) - self.max_queue
            if overflow > 0:
                for _ in range(min(overflow, len(queue))):
                    queue.popleft()
                self.dropped += overflow
                events = events[-self.max_queue :]
            queue.extend(events)
            if len(queue) == len(events):  # was empty: the sender may be asleep
                self._wake.notify()

    def _send_loop(self) -> None:
        backoff = 0.25
        last_report = time.monotonic()
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait(self.report_every or None)
                    if self.report_every and time.monotonic() - last_report >= self.report_every:
                        break
                if self._closing and not self._queue:
                    return
                # Let a batch build up: one POST per ``linger`` rather than one
                # per few steps keeps the sending thread off the training
                # thread's back (bench/overhead.py: 1.7x -> 1.0x a short step).
                until = time.monotonic() + self.linger
                while (
                    len(self._queue) < self.batch_size
                    and not self._closing
                    and not self._flushing
                    and (left := until - time.monotonic()) > 0
                ):
                    self._wake.wait(left)
                batch = [
                    self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))
                ]
                self._in_flight = len(batch)
            if self.report_every and time.monotonic() - last_report >= self.report_every:
                last_report = time.monotonic()
                batch.extend(self._own_metrics())
            unsent = self._send(batch)
            ok = not unsent
            with self._wake:
                if not ok:  # keep them, oldest first, within the bound
                    room = self.max_queue - len(self._queue)
                    keep = unsent[-room:] if room > 0 else []
                    self.dropped += len(unsent) - len(keep)
                    self._queue.extendleft(reversed(keep))
                self._in_flight = 0
                self._wake.notify_all()
                if not ok and not self._closing:
                    self._wake.wait(backoff)
            backoff = 0.25 if ok else min(self.max_backoff, backoff * 2)
            if not ok and self._closing:
                return

    def _own_metrics(self) -> list[Event]:
        calls, ns = self._log_calls, self._log_ns
        self._log_calls = self._log_ns = 0
        step = int(time.time())
        values = {
            "trainstream/log_us": ns / calls / 1000 if calls else 0.0,
            "trainstream/queue_depth": len(self._queue),
            "trainstream/dropped": self.dropped,
        }
        return [
            {
                "type": "metric",
                "run": self.run,
                "time": time.time(),
                "name": name,
                "step": step,
                "value": value,
            }
            for name, value in values.items()
        ]

    def _send(self, batch: list[Event]) -> list[Event]:
        """
        POST one batch; return what is still to send later (empty once all
        of it is stored or refused for good).

        The server takes a batch all or nothing, so an event it refuses
        (400, naming its index) is taken out, reported and counted in
        ``rejected``, and the rest is sent again; a batch too large (413) is
        sent in halves.
        """
        while batch:
            status, answer = self._post(batch)
            if status is None:
                return batch  # unreachable: retry later
            if status == 200:
                self.sent += len(batch)
                self.last_error = None
                return []
            message = _error_text(answer)
            self.last_error = f"server answered {status}: {message}"
            if status == 413 and len(batch) > 1:
                half = len(batch) // 2
                rest = self._send(batch[:half])
                if rest:
                    return rest + batch[half:]
                batch = batch[half:]
                continue
            if status not in (400, 413):
                self._drop_connection()
                return batch  # 401 (token), 5xx: retry later
            index = _error_index(answer)
            if index is None or not 0 <= index < len(batch) or len(batch) == 1:
                self._reject(batch, message)  # will never be accepted: do not retry
                return []
            self._reject([batch[index]], message)
            batch = batch[:index] + batch[index + 1 :]
        return []

    def _post(self, batch: list[Event]) -> tuple[int | None, bytes]:
        """``(status, body)`` of one POST, ``(None, b"")`` when the server is unreachable."""
        body = encode_json(batch).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            connection = self._connect()
            connection.request("POST", self.prefix + "/api/events", body, headers)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as e:
            self.last_error = f"{self.host}:{self.port} unreachable: {e}"
            self._drop_connection()
            return None, b""
        return response.status, answer

    def _reject(self, events: list[Event], message: str) -> None:
        """The server refused ``events`` for good: count them, say which and why."""
        self.rejected += len(events)
        self.rejected_events.extend((event, message) for event in events)
        shown = encode_json(events[0])[:200] if len(events) == 1 else f"{len(events)} events"
        _logger.warning("trainstream publisher %s: server refused %s: %s", self.run, shown, message)

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            cls = (
                http.client.HTTPSConnection
                if self.scheme == "https"
                else http.client.HTTPConnection
            )
            self._connection = cls(self.host, self.port, timeout=self.timeout)
        return self._connection

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _at_exit(self, timeout: float) -> None:
        if self._thread.is_alive():
            self.close(timeout)


def _error_index(answer: bytes) -> int | None:
    """The ``index`` of a 400 answer: which event of the batch was refused."""
    try:
        index = json.loads(answer).get("index")
    except (ValueError, AttributeError):
        return None
    return index if type(index) is int else None


def _error_text(answer: bytes) -> str:
    try:
        return str(json.loads(answer).get("error", answer[:200]))
    except (ValueError, AttributeError):
        return answer[:200].decode("utf-8", "replace")


# Subscribing


class Subscriber:
    """
    The events of a remote server, as an iterator of dicts, resuming by id.

    A blocking client (no reactor, no thread of its own): iterating reads the
    server's ``/events`` stream (Server-Sent Events) with
    ``trainstream.watch.SSEClient``, the resuming reader of ``trainstream
    tail``. After a disconnect, an ``overflow`` (too slow) or a server
    restart it reconnects with backoff (the server's ``retry:``) and
    ``Last-Event-ID``, so no event is handed out twice or skipped while the
    server still holds it. When it no longer does (history trimmed, or a new
    history: another ``epoch``), a ``{"type": "reset", "reason",
    "oldest_id"}`` dict is handed out first; it has no ``id``.

    The iterator ends only after ``close()`` (from any thread, or leaving the
    ``with`` block); a refusal that retrying will not fix (401, a bad filter,
    a URL that is no trainstream server) raises ``SubscriberError``.
    ``last_id`` is the id of the latest event handed out: give it as
    ``after`` to a new ``Subscriber`` to go on from there.

    :param url: the server (any listener; a base, ``/api`` or ``/events`` URL).
    :param runs: run globs (``*`` matches any); ``names``: metric-name
        globs; ``types``: event types. Empty: everything.
    :param after: first replay every stored matching event after this id
        (0: the whole history); ``None``: live events only.
    """

    def __init__(
        self,
        url: str,
        runs: Sequence[str] = (),
        names: Sequence[str] = (),
        types: Sequence[str] = (),
        after: int | None = None,
        token: str | None = None,
        backoff_max: float = 10.0,
        read_timeout: float = 45.0,
    ) -> None:
        from trainstream.watch import SSEClient, parse_endpoint

        endpoint = parse_endpoint(url)
        self._client = SSEClient(
            endpoint,
            token,
            runs=runs,
            names=names,
            types=types,
            after=after,
            backoff_max=backoff_max,
            read_timeout=read_timeout,
        )
        self._items = cast(Generator["WatchEvent | Reset", None, None], self._client.items())

    @property
    def last_id(self) -> int | None:
        """The id after which the stream goes on (``after`` until an event came)."""
        return self._client.last_id

    @property
    def connections(self) -> int:
        """How many times a stream was opened (1 + reconnections)."""
        return self._client.connections

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        from trainstream.watch import Reset

        item = next(self._items)
        if isinstance(item, Reset):
            return item.to_json()
        return item.data

    def close(self) -> None:
        """Stop: from any thread; a ``next()`` waiting for an event ends the iteration."""
        self._client.close()
        with contextlib.suppress(ValueError):  # running in another thread: it ends by itself
            self._items.close()

    @property
    def closed(self) -> bool:
        return self._client.closed

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def subscribe_deferred(
    url: str,
    callback: Callable[[Event], object],
    runs: Sequence[str] = (),
    names: Sequence[str] = (),
    types: Sequence[str] = (),
    after: int | None = None,
    token: str | None = None,
    reactor: Any = None,
) -> Deferred[int | None]:
    """
    For code in the reactor thread: a ``Subscriber`` read by a thread of its
    own, each event handed to ``callback(event)`` in the reactor thread, one
    at a time. If the callback returns a Deferred, the next event waits for
    it (so a slow consumer slows the reading, and the server's slow-client
    rules apply instead of a queue growing here).

    The returned Deferred fires when the subscription ends:

    - with the ``last_id`` handed out, when ``callback`` returns ``False``
      (give it as ``after`` to go on later);
    - with ``CancelledError`` when it is cancelled (``d.cancel()``), which
      stops the subscription;
    - with the error, when the callback raises (or its Deferred fails) or the
      server refuses for good (``SubscriberError``).

    The reactor's shutdown stops it too (the Deferred then fails with
    ``CancelledError``).
    """
    from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
    from twisted.internet.threads import blockingCallFromThread
    from twisted.python.failure import Failure

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        subscriber = Subscriber(url, runs, names, types, after, token)
    except SubscriberError:
        return fail()
    state = {"stopped": False}

    def cancel(_: Deferred[int | None]) -> None:
        state["stopped"] = True
        subscriber.close()

    done: Deferred[int | None] = Deferred(cancel)
    trigger = reactor.addSystemEventTrigger("before", "shutdown", done.cancel)

    def finish(result: int | Failure | None) -> None:
        reactor.removeSystemEventTrigger(trigger)
        if done.called:
            return  # cancelled: already fired
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)

    def deliver(event: Event) -> Deferred[bool]:
        if state["stopped"]:
            return succeed(False)
        return maybeDeferred(callback, event).addCallback(lambda answer: answer is not False)

    def read() -> None:
        result: int | Failure | None
        try:
            for event in subscriber:
                # It waits for deliver's Deferred and gives its result (mypy
                # cannot pick _R from the union of its signature: say bool).
                go_on = blockingCallFromThread(
                    reactor, cast(Callable[[Event], bool], deliver), event
                )
                if not go_on:
                    break
            result = subscriber.last_id
        except BaseException:
            result = Failure()
        finally:
            subscriber.close()
        if state["stopped"] and not isinstance(result, Failure):
            result = Failure(CancelledError())
        reactor.callFromThread(finish, result)

    threading.Thread(target=read, name="trainstream-subscriber", daemon=True).start()
    return done


__all__ = ["Publisher", "Subscriber", "SubscriberError", "api_base", "subscribe_deferred"]
