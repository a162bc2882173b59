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

from trainstream.events import metric_events, validate_event

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from trainstream.service import StreamServer

Event = dict[str, object]


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


class Run:
    """
    One training run as seen from the training code. Every method may be
    called from any thread and returns without waiting for the server.
    """

    def __init__(self, server: StreamServer, name: str, inbox: Inbox) -> None:
        self.server = server
        self.name = name
        self._inbox = inbox
        self._checked_names: set[str] = set()
        # Validate the run name now, so a bad one fails here and not later.
        validate_event({"type": "log", "run": name, "level": "info", "message": ""})

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

    def status(self, state: str, epoch: int | None = None, message: str | None = None) -> None:
        """Queue a status event (``running``, ``paused``, ...)."""
        event: Event = {"type": "status", "run": self.name, "state": state}
        if epoch is not None:
            event["epoch"] = epoch
        if message is not None:
            event["message"] = message
        self._put_checked(event)

    def text(self, message: str, level: str = "info") -> None:
        """Queue a log line."""
        self._put_checked({"type": "log", "run": self.name, "level": level, "message": message})

    def hparams(self, params: Mapping[str, object]) -> None:
        """Queue the run's hyperparameters."""
        self._put_checked({"type": "hparams", "run": self.name, "params": dict(params)})

    def finish(self) -> None:
        self.status("finished")

    def fail(self, message: str) -> None:
        self.status("failed", message=message)

    def flush(self) -> None:
        """Return once every event queued so far is stored (blocking)."""
        self.server.flush()

    def flush_deferred(self) -> Deferred[None]:
        """The Deferred form of ``flush`` for code in the reactor thread."""
        return self.server.flush_deferred()

    def _put_checked(self, event: Event) -> None:
        self._inbox.put([validate_event(event)])


__all__ = ["Inbox", "Run"]
