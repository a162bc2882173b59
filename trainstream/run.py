"""
The training side: ``Run.log()`` and friends, which only queue.

A training thread never waits on the network or the reactor: events go into
a deque and the reactor is woken at most once per batch to publish them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from trainstream.api import Event, RunAPI
from trainstream.events import metric_events

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class Inbox:
    """
    Events queued by any thread, published in the reactor thread in batches.

    ``put`` appends and wakes the reactor only if no wake-up is pending;
    ``drain`` clears the flag *before* emptying the queue, so an event put
    while it runs is either taken now or triggers a new wake-up. With
    ``later`` (``lambda f: reactor.callLater(delay, f)``), the reactor
    publishes ``delay`` after the wake-up, so a training loop of short steps
    hands it one batch per ``delay`` instead of one per step (the reactor's
    work competes with the training thread for the GIL).
    """

    def __init__(
        self,
        call_from_thread: Callable[[Callable[[], None]], object],
        sink: Callable[[list[Event]], object],
        later: Callable[[Callable[[], None]], Any] | None = None,
    ) -> None:
        self._call_from_thread = call_from_thread
        self._later = later
        self._delayed: Any = None
        self._sink = sink
        self._queue: deque[list[Event] | tuple[str, float, int, dict[str, Any]]] = deque()
        self._scheduled = False
        self.wakeups = 0

    def put(self, events: list[Event] | tuple[str, float, int, dict[str, Any]]) -> None:
        """Queue events, or ``(run, time, step, {name: number})`` (see ``put_metrics``)."""
        self._queue.append(events)
        if not self._scheduled:
            self._scheduled = True
            self.wakeups += 1
            self._call_from_thread(self.drain if self._later is None else self._drain_later)

    put_metrics = put  # the tuple form, read as metric events by drain()

    def _drain_later(self) -> None:
        self._delayed = self._later(self.drain) if self._later is not None else None

    def drain(self) -> None:
        """Publish everything queued so far (reactor thread only)."""
        delayed, self._delayed = self._delayed, None
        if delayed is not None and delayed.active():
            delayed.cancel()  # drained now (flush, stop): no need to later
        self._scheduled = False
        batch: list[Event] = []
        queue = self._queue
        while queue:
            item = queue.popleft()
            if isinstance(item, tuple):
                run, t, step, metrics = item
                batch.extend(
                    {
                        "type": "metric",
                        "run": run,
                        "time": t,
                        "name": name,
                        "step": step,
                        "value": value,
                    }
                    for name, value in metrics.items()
                )
            else:
                batch.extend(item)
        if batch:
            self._sink(batch)


class Run(RunAPI):
    """
    One training run of the embedded server, as the training code sees it
    (the API of ``trainstream.api.RunAPI``). Every method may be called from
    any thread and returns without waiting for the server.
    """

    def __init__(
        self,
        name: str,
        inbox: Inbox,
        flush_deferred: Callable[[], Deferred[None]],
        blocking: Callable[[], Callable[..., Any] | None],
    ) -> None:
        """
        :param flush_deferred: reactor thread: publish what is queued, fire once stored.
        :param blocking: the embedded layer's way for another thread to wait on
            a Deferred (``embedded.call_blocking``), or ``None`` where there is none.
        """
        super().__init__(name)
        self._inbox = inbox
        self._flush_deferred = flush_deferred
        self._blocking = blocking

    def _enqueue(self, events: list[Event]) -> None:
        self._inbox.put(events)

    def log(self, metrics: Mapping[str, Any], step: int, time_s: float | None = None) -> None:
        """
        Queue one metric event per ``{name: value}`` at ``step``.

        :raises EventError: at once, naming the run, the metric and the
            field, for a bad name, step, value or time (the rules of
            ``POST /api/events``); nothing of this call is queued then.
        """
        t = time.time() if time_s is None else time_s
        # The common call: known names, plain numbers well inside the rules
        # (a float time >= 0 and finite, a step and int values in 64 bits).
        # Queue them as they are (floats and ints are immutable); the reactor
        # thread builds the events. Anything else, valid or not, takes
        # metric_events, which applies every rule of validate_event.
        if (
            type(step) is int
            and 0 <= step <= 9223372036854775807  # 2**63 - 1
            and type(metrics) is dict
            and (
                time_s is None  # time.time(): a float >= 0, finite
                or (type(t) is float and 0.0 <= t <= 1.7976931348623157e308)  # NaN fails too
            )
        ):
            checked = self._checked_names
            for name, value in metrics.items():
                kind = type(value)
                if name not in checked or (
                    kind is not float
                    and (
                        kind is not int or not -9223372036854775808 <= value <= 9223372036854775807
                    )
                ):
                    break
            else:
                self._inbox.put_metrics((self.name, t, step, metrics.copy()))
                return
        self._inbox.put(metric_events(self.name, metrics, step, t, self._checked_names))

    def flush(self) -> None:
        """Return once every event queued so far is stored (blocking; not in the reactor thread)."""
        blocking = self._blocking()
        if blocking is None:
            from trainstream.errors import TrainstreamError

            raise TrainstreamError(
                "flush() blocks, which needs the embedded server (get_stream_server()); "
                "in the reactor thread use flush_deferred()"
            )
        blocking("flush()", "Run.flush_deferred()", self._flush_deferred, timeout=60)

    def flush_deferred(self) -> Deferred[None]:
        """The Deferred form of ``flush`` for code in the reactor thread."""
        return self._flush_deferred()


__all__ = ["Inbox", "Run"]
