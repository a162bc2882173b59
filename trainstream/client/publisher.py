"""
Publishing to a trainstream server in another process (``twistd trainstream``
or another machine): the Run API of the embedded server
(:class:`trainstream.api.RunAPI`).

``log()`` only appends to a bounded queue; the publisher's own thread (a
:class:`~trainstream.client.clock.ThreadClock`) sends batches with
``POST /api/events`` over one keep-alive connection: an event after a quiet
spell at once, a busy loop's events together, at most one POST per
``linger`` (see :class:`Publisher`), retrying with the
backoff policy of every client while the server is unreachable. When the
queue is full the oldest events are dropped and counted, so the training
loop never blocks and never grows without bound. No reactor is involved:
this module imports no Twisted, so a training script pays nothing for it.

Its time and its transport are parameters: a test gives a
``twisted.internet.task.Clock`` and a fake transport, and drives every
retry with ``clock.advance()``, with no thread and no socket.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from trainstream.api import BUSY_RATE, Event, RunAPI, busy_wait
from trainstream.client.backoff import Backoff
from trainstream.client.clock import DelayedCall, Scheduler, ThreadClock
from trainstream.client.http import UNREACHABLE, KeepAlive, decode, headers, parse_endpoint
from trainstream.events import encode_json, metric_events, plain_events, plain_log

__all__ = ["Publisher", "Transport"]

_logger = logging.getLogger(__name__)

_time = time.time  # one global lookup less per log()
_ns = time.perf_counter_ns

#: One ``log()`` call in this many is timed for ``trainstream/log_us``.
LOG_US_SAMPLE = 16

#: Seconds ``close`` waits in silence before it says what it waits for.
CLOSE_QUIET = 1.0

#: The first retry's delay (seconds); it doubles per failure up to ``max_backoff``.
RETRY_INITIAL = 0.25


class Transport(Protocol):
    """How batches reach the server (:class:`~trainstream.client.http.KeepAlive`)."""

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """``(status, answer)``; raises ``OSError`` or ``HTTPException`` when unreachable."""
        ...

    def close(self) -> None: ...


class Publisher(RunAPI):
    """
    A run published to a remote server. Every method may be called from any
    thread; none waits for the network except ``flush`` and ``close``.

    :param url: the server, e.g. ``http://127.0.0.1:8890`` (any listener).
    :param run: the run's name.
    :param token: the server's bearer token, if it has one.
    :param max_queue: events kept while the server is unreachable; past it
        the oldest are dropped (``dropped`` counts them). The bound is
        applied as the sending thread takes ``log()``'s calls, or once
        ``batch_size`` calls wait for it.
    :param linger: how batching adapts to the load (Nagle-style). Idle (no
        POST under way, the last one began ``linger`` or more ago), an event
        is sent at once; busy, events gather and go in one POST ``linger``
        after the last one began, or when it ends if it took longer. So a
        loop logging faster than that sends one POST per ``linger``, each
        event at most about ``linger`` plus a POST late (``flush``, a close
        and a full batch do not wait for it).
    :param busy_rate: above this many events/s (measured over each batch),
        the wait grows, in proportion, from ``linger`` to ``max_linger`` at
        twice the rate: each POST costs the training process about the same
        whatever it holds (a thread woken, the GIL taken from the training
        loop twice), so the busier the loop, the fewer POSTs it can afford.
        At or below it (1,500/s, room above 1 kHz for a rate measured over
        a few events) the wait is ``linger``; at 2,000/s it is 40 ms (25
        POSTs/s); from 3,000/s on, ``max_linger`` (10 POSTs/s). Measured
        with ``bench/overhead.py`` (3 scalars a step, about 3,300 events/s):
        10 ms windows slowed the loop 1.17x, 0.1 s about as little as the
        fixed 0.25 s of before.
    :param max_linger: the longest wait, however high the rate.
    :param report_every: seconds between the publisher's own metrics
        (``trainstream/log_us``, ``trainstream/queue_depth``,
        ``trainstream/dropped``), or 0 for none.
    :param clock: where the sending runs (``seconds`` and ``callLater`` of
        ``IReactorTime``): a thread of its own by default; in tests a
        ``twisted.internet.task.Clock`` (``flush`` then only waits).
    :param transport: how batches are POSTed (:class:`Transport`): one
        keep-alive ``http.client`` connection by default.
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
        linger: float = 0.01,
        busy_rate: float = BUSY_RATE,
        max_linger: float = 0.1,
        *,
        clock: Scheduler | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.endpoint = parse_endpoint(url)
        super().__init__(run)
        self.token = token
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.timeout = timeout
        self.report_every = report_every
        for what, value in (("linger", linger), ("max_linger", max_linger)):
            if not value >= 0:
                raise ValueError(f"Publisher {what} must be seconds >= 0, got {value!r}")
        if not 0 < busy_rate < math.inf:
            raise ValueError(f"Publisher busy_rate must be events/s > 0, got {busy_rate!r}")
        self.linger = linger
        self.busy_rate = busy_rate
        self.max_linger = max(linger, max_linger)
        #: the wait between POSTs now: ``linger``, more while busy (see busy_rate)
        self.wait = linger
        self.backoff = Backoff(RETRY_INITIAL, max_backoff)
        #: events dropped because the queue was full (server unreachable)
        self.dropped = 0
        #: events the server refused for good (should not happen: log()
        #: checks them); the others of their batch are sent all the same
        self.rejected = 0
        #: the latest refused events with the server's reason (at most 100)
        self.rejected_events: deque[tuple[Event, str]] = deque(maxlen=100)
        #: events the server acknowledged (stored)
        self.sent = 0
        #: why the last POST failed (``None`` after one that succeeded)
        self.last_error: str | None = None
        #: the server's answer to a refused token (401 or 403), until one
        #: is taken: ``flush`` stops waiting then (sending goes on)
        self.refused: str | None = None
        #: what was left unsent when :meth:`close` returned (``None`` before)
        self.undelivered: int | None = None
        # why the retries are ("" for none: "unreachable", or the server's
        # status), said once when it starts and once when it ends (``_say``)
        self._failing = ""
        self._retry_status = ""
        self._step = 0  # the latest step logged: the publisher's own metrics use it
        self._pending: deque[Event] = deque()
        # log()'s common calls, ``(run, time, step, {name: number})``, appended
        # without the lock; the sending thread (or the next _enqueue) turns
        # them into events in ``_pending`` (``_take_inlet``)
        self._inlet: deque[tuple[str, float, int, dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._in_flight = 0
        self._sending = False
        # log()'s shortcut: a send is scheduled or under way (it schedules the
        # next), and a full batch could not make it sooner (``_soonest``)
        self._busy = False
        self._soonest = False
        self._flushing = 0
        self._closing = False
        self._stopped = False
        self._retry_at: float | None = None
        self._pump_call: DelayedCall | None = None
        self._pump_at = 0.0
        self._last_post = float("-inf")  # when the last POST began (clock time)
        self._log_ns = 0  # time spent in the timed log() calls
        self._log_timed = 0
        self._log_calls = 0
        self._own_clock: ThreadClock | None = None
        if clock is None:
            clock = self._own_clock = ThreadClock(f"trainstream-publisher-{run}")
        self._clock = clock
        self._transport = KeepAlive(self.endpoint, timeout) if transport is None else transport
        self._report_call: DelayedCall | None = None
        if report_every:
            self._report_call = self._clock.callLater(report_every, self._report)
        if flush_at_exit:
            atexit.register(self._at_exit, flush_at_exit)
        self.status("created")
        if hparams:
            self.hparams(hparams)

    @property
    def run(self) -> str:
        """The run's name."""
        return self.name

    # The Run API

    def log(self, metrics: Mapping[str, Any], step: int, time_s: float | None = None) -> None:
        """Queue one metric event per ``{name: value}``; raises ``EventError`` at once if bad."""
        calls = self._log_calls = self._log_calls + 1
        started = _ns() if calls % LOG_US_SAMPLE == 1 else 0  # a sample, for log_us
        t = _time() if time_s is None else time_s
        if plain_log(metrics, step, t, time_s is not None, self._checked_names):
            # The common call, queued as it is (floats and ints are
            # immutable) with no lock: the sending thread makes the events
            # metric_events would make. plain_log saw a dict.
            inlet = self._inlet
            inlet.append((self._name, t, step, metrics.copy()))  # type: ignore[attr-defined]
            # Appended, then _busy read: _pump clears _busy before it looks
            # at the inlet (_schedule), so one of the two sees the other.
            if not self._busy or len(inlet) >= self.batch_size:
                self._enqueue([])  # wake the sender; a long inlet: bound it here
        else:
            self._enqueue(metric_events(self._name, metrics, step, t, self._checked_names))
        if started:
            self._log_ns += _ns() - started
            self._log_timed += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored; ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            self._flushing += 1
            try:
                self._schedule(at_once=True)
                while self._inlet or self._pending or self._in_flight:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if (remaining is not None and remaining <= 0) or (
                        self.refused is not None and not self._sending
                    ):
                        return False  # (a refused token: waiting would not help)
                    self._wake.wait(remaining if remaining is not None else 1.0)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """
        Flush (bounded), make a last attempt with what is left, stop sending.
        What could not be delivered is counted in :attr:`undelivered` and
        said in a warning, with the last error.
        """
        with self._lock:
            if self._report_call is not None and self._report_call.active():
                self._report_call.cancel()  # no more of its own metrics while it waits
        first = CLOSE_QUIET if timeout is None else min(timeout, CLOSE_QUIET)
        flushed = self.flush(first)
        if not flushed and self.refused is None and (timeout is None or timeout > first):
            with self._lock:
                self._take_inlet()
                waiting = len(self._pending) + self._in_flight
            rest = None if timeout is None else timeout - first
            _logger.warning(
                "trainstream publisher %s: waiting %sfor %s:%s to take %d events (%s)",
                self.name,
                "" if rest is None else f"up to {rest:g} s more ",
                self.endpoint.host,
                self.endpoint.port,
                waiting,
                self.last_error or "no answer yet",
            )
            flushed = self.flush(rest)
        with self._wake:
            self._closing = True
            if self._report_call is not None and self._report_call.active():
                self._report_call.cancel()
            self._schedule(at_once=True)
        if self._own_clock is None:
            self._stopped = True
            self._transport.close()
        elif self._own_clock.stop(timeout):
            self._stopped = True
            self._transport.close()
        with self._lock:
            self._take_inlet()
            left = self.undelivered = len(self._pending) + self._in_flight
        if left or self.dropped:
            dropped = f", {self.dropped} dropped from the full queue before" if self.dropped else ""
            _logger.warning(
                "trainstream publisher %s: %d events not delivered to %s:%s%s (last error: %s)",
                self.name,
                left + self.dropped,
                self.endpoint.host,
                self.endpoint.port,
                dropped,
                self.last_error or "not sent in time",
            )
        return flushed and not left

    @property
    def queue_depth(self) -> int:
        with self._lock:
            self._take_inlet()
            return len(self._pending)

    # Queueing

    def _enqueue(self, events: list[Event]) -> None:
        with self._lock:
            self._take_inlet()  # first: the events keep the order of the calls
            if events and events[-1]["type"] == "metric":
                self._step = events[-1]["step"]  # type: ignore[assignment]
            self._add(events)
            queue = self._pending
            if not self._busy or (len(queue) >= self.batch_size and not self._soonest):
                self._schedule()

    def _add(self, events: list[Event]) -> None:
        """(With the lock.) Queue ``events``, dropping the oldest past ``max_queue``."""
        queue = self._pending
        overflow = len(queue) + len(events) - self.max_queue
        if overflow > 0:
            for _ in range(min(overflow, len(queue))):
                queue.popleft()
            self.dropped += overflow
            events = events[-self.max_queue :]
        queue.extend(events)

    def _take_inlet(self) -> None:
        """(With the lock.) Turn the calls ``log()`` appended into queued events."""
        inlet = self._inlet
        if not inlet:
            return
        events: list[Event] = []
        try:
            while inlet:  # log() may append meanwhile; only the lock's holder takes
                call = inlet.popleft()
                events.extend(plain_events(*call))
            self._step = call[2]
        finally:
            self._add(events)  # what was taken is kept, even if Ctrl-C lands in the loop

    def _schedule(self, at_once: bool = False) -> None:
        """
        (With the lock.) Have the queue sent when it is due: at once for a
        flush, a close or a full batch, else ``linger`` after the last POST
        began (at once if that is past: idle); after a failure not before
        the backoff's delay, unless ``at_once``. While a batch is being
        sent, its end schedules the next.
        """
        self._take_inlet()
        if self._sending or self._stopped or not self._pending:
            return
        urgent = (
            at_once or self._flushing > 0 or self._closing or len(self._pending) >= self.batch_size
        )
        pending = self._pump_call is not None and self._pump_call.active()
        if pending and not urgent:
            return
        now = self._clock.seconds()
        if self._retry_at is not None and not at_once:
            when = max(now, self._retry_at)
        else:
            when = now if urgent else max(now, self._last_post + self.wait)
        if pending:
            if self._pump_at <= when:
                return
            self._pump_call.cancel()  # type: ignore[union-attr]
        self._pump_at = when
        self._pump_call = self._clock.callLater(when - now, self._pump)
        self._busy = True
        self._soonest = urgent or self._retry_at is not None or when <= now

    # Sending (in the clock's thread)

    def _pump(self) -> None:
        """Send one batch; keep it, and retry later, if the server is unreachable."""
        with self._lock:
            self._pump_call = None
            self._take_inlet()
            queue = self._pending
            if not queue:
                self._busy = False
                self._schedule()  # what log() appended before it saw _busy cleared
                return
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            self._in_flight = len(batch)
            self._sending = self._soonest = True
            now = self._clock.seconds()
            self._adapt(len(batch), now - self._last_post)
            self._last_post = now
        try:
            unsent = self._send(batch)
        except Exception as e:  # a bug, not the network: drop the batch rather than stall
            _logger.exception("trainstream publisher %s: sending failed", self.name)
            self._reject(batch, f"not sent: {e!r}")
            unsent = []
        self._say(unsent)
        with self._wake:
            self._sending = False
            if unsent:  # keep them, oldest first, within the bound
                room = self.max_queue - len(queue)
                keep = unsent[-room:] if room > 0 else []
                self.dropped += len(unsent) - len(keep)
                queue.extendleft(reversed(keep))
                self._retry_at = self._clock.seconds() + self.backoff.next()
            else:
                self.backoff.reset()
                self._retry_at = None
            self._in_flight = 0
            self._busy = False
            self._wake.notify_all()
            if not (unsent and self._closing):  # closing: that was the last attempt
                self._schedule()

    def _say(self, unsent: list[Event]) -> None:
        """A warning when retries start (or their reason changes), and when they end."""
        failing = self._retry_status if unsent else ""
        if failing == self._failing:
            return
        was, self._failing = self._failing, failing
        where = f"{self.endpoint.host}:{self.endpoint.port}"
        if not failing:
            _logger.warning("trainstream publisher %s: %s takes events again", self.name, where)
        elif failing in ("401", "403"):
            _logger.warning(
                "trainstream publisher %s: %s refused the token (%s): set $TRAINSTREAM_TOKEN "
                "(or token=) to the server's; events are kept (up to %s) and retried",
                self.name,
                where,
                self.last_error,
                f"{self.max_queue:,}",
            )
        elif not was:
            _logger.warning(
                "trainstream publisher %s: %s; events are kept (up to %s) and sent again "
                "when it answers",
                self.name,
                self.last_error,
                f"{self.max_queue:,}",
            )

    def _adapt(self, events: int, since: float) -> None:
        """The next wait, from the rate of the batch just taken (``since`` the last POST began)."""
        self.wait = busy_wait(events, since, self.linger, self.max_linger, self.busy_rate)

    def _report(self) -> None:
        """Queue the publisher's own metrics, and schedule the next report."""
        self._enqueue(self._own_metrics())
        with self._lock:
            if not self._closing:
                self._report_call = self._clock.callLater(self.report_every, self._report)

    def _own_metrics(self) -> list[Event]:
        timed, ns = self._log_timed, self._log_ns
        self._log_timed = self._log_ns = 0
        now = time.time()
        step = self._step  # the run's latest: the same axis as its own metrics
        values = {
            "trainstream/log_us": ns / timed / 1000 if timed else 0.0,
            "trainstream/queue_depth": self.queue_depth,
            "trainstream/dropped": self.dropped,
        }
        return [
            {
                "type": "metric",
                "run": self.name,
                "time": now,
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
                self._retry_status = "unreachable"
                return batch  # unreachable: retry later
            if status == 200:
                self.sent += len(batch)
                self.last_error = self.refused = None
                return []
            body = decode(answer)
            if isinstance(body, dict) and "error" in body:
                message = str(body["error"])
            else:
                message = answer[:200].decode("utf-8", "replace")
            self.last_error = f"server answered {status}: {message}"
            if status == 413 and len(batch) > 1:
                half = len(batch) // 2
                rest = self._send(batch[:half])
                if rest:
                    return rest + batch[half:]
                batch = batch[half:]
                continue
            if status not in (400, 413):
                self._transport.close()
                self._retry_status = str(status)
                if status in (401, 403):
                    self.refused = self.last_error
                return batch  # 401 (token), 5xx: retry later
            index = body.get("index") if isinstance(body, dict) else None
            if type(index) is not int or not 0 <= index < len(batch) or len(batch) == 1:
                self._reject(batch, message)  # will never be accepted: do not retry
                return []
            self._reject([batch[index]], message)
            batch = batch[:index] + batch[index + 1 :]
        return []

    def _post(self, batch: list[Event]) -> tuple[int | None, bytes]:
        """``(status, body)`` of one POST, ``(None, b"")`` when the server is unreachable."""
        body = encode_json(batch).encode()
        try:
            return self._transport.post(
                "/api/events", body, headers(self.token, **{"Content-Type": "application/json"})
            )
        except UNREACHABLE as e:
            self.last_error = f"{self.endpoint.host}:{self.endpoint.port} unreachable: {e}"
            return None, b""

    def _reject(self, events: list[Event], message: str) -> None:
        """The server refused ``events`` for good: count them, say which and why."""
        self.rejected += len(events)
        self.rejected_events.extend((event, message) for event in events)
        shown = encode_json(events[0])[:200] if len(events) == 1 else f"{len(events)} events"
        _logger.warning(
            "trainstream publisher %s: server refused %s: %s", self.name, shown, message
        )

    def _at_exit(self, timeout: float) -> None:
        if not self._closing:
            self.close(timeout)
