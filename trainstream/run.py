"""
The training side: ``Run.log()`` and friends, which only queue.

A training thread never waits on the network or the reactor: events go into
a deque and the reactor is woken at most once per batch to publish them; an
event after a quiet spell goes at once, a busy loop's events in batches
(``Inbox``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from trainstream.api import BUSY_RATE, Event, RunAPI, busy_wait
from trainstream.events import metric_events, plain_events, plain_log

_time = time.time  # one global lookup less per Run.log

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Inbox:
    """
    Events queued by any thread, handed to the reactor thread in batches.

    ``put`` appends, and wakes the reactor only if the inbox is idle (its
    flag is clear): one ``call_from_thread`` per quiet spell, never one per
    event. With a ``clock`` and a ``window``, batching adapts to the load
    the way Nagle's algorithm does:

    - idle (the last batch was handed over ``window`` or more ago): the
      wake-up hands the queue over at once, so a point logged now and then
      reaches subscribers within a reactor turn;
    - busy (a batch was handed over less than ``window`` ago): the flag
      stays set and a timer takes the queue at the end of the window, and
      again a window after that while events keep coming, so a busy
      training thread neither wakes the reactor (a system call, and another
      thread scheduled) nor is joined by it more than once per window; a
      window that finds nothing clears the flag: idle again.

    So a loop that logs faster than once per ``window`` hands over at most
    one batch per ``window``, each event at most ``window`` after it was
    put (plus the reactor's own lag). With ``max_window``, a loop logging
    more than ``busy_rate`` events/s gets longer windows, in proportion up
    to ``max_window`` at twice that rate (``api.busy_wait``, the remote
    Publisher's rule): fewer, bigger batches, so the reactor thread takes
    the GIL from training less often (``bench/overhead.py --cycles``: 1.04x
    at 0.01 s, 1.01x at 0.1 s, at 5,000 events/s). ``drain`` (flush, stop)
    hands over at once whatever is queued.

    Every event put is taken by a hand-over: while the flag is set, a
    wake-up is on its way or the window's timer is armed; ``drain`` clears
    the flag *before* emptying the queue, and the timer that goes idle looks
    at the queue again *after* clearing it, so a put that saw the flag set
    is taken then, and one that saw it clear woke the reactor itself.

    :param call_from_thread: how another thread has the reactor call a function.
    :param sink: reactor thread: takes each batch, in order.
    :param clock: the reactor's time (``seconds``, ``callLater``); without
        it every wake-up hands over at once.
    :param window: seconds (see above); 0 hands over at every wake-up.
    :param max_window: the longest window, while busy (``None``: ``window``).
    :param busy_rate: events/s above which the window grows.
    :param checked_sink: reactor thread: takes, in place of ``sink``, a
        batch made only of ``put_metrics`` calls (their events checked when
        put, and built here), so the hub need not check them again.
    """

    def __init__(
        self,
        call_from_thread: Callable[[Callable[[], None]], object],
        sink: Callable[[list[Event]], object],
        *,
        clock: IReactorTime | None = None,
        window: float = 0.0,
        checked_sink: Callable[[list[Event]], object] | None = None,
        max_window: float | None = None,
        busy_rate: float = BUSY_RATE,
    ) -> None:
        self._call_from_thread = call_from_thread
        self._sink = sink
        self._checked_sink = sink if checked_sink is None else checked_sink
        self._clock = clock
        #: seconds between batches while busy, at first (after a quiet spell)
        self.window = window
        self.max_window = window if max_window is None else max(window, max_window)
        self.busy_rate = busy_rate
        #: the window now: ``window``, longer while the loop is busy (see busy_rate)
        self.wait = window
        self._timer: IDelayedCall | None = None  # the end of the window, while busy
        self._last = float("-inf")  # when the last batch was handed over (its end)
        self._queue: deque[list[Event] | tuple[str, float, int, dict[str, Any]]] = deque()
        self._scheduled = False  # set: a wake-up is on its way or the timer is armed
        #: wake-ups asked for (``call_from_thread`` calls)
        self.wakeups = 0
        #: batches handed to the sink
        self.batches = 0

    def put(self, events: list[Event] | tuple[str, float, int, dict[str, Any]]) -> None:
        """Queue events, or ``(run, time, step, {name: number})`` (see ``put_metrics``)."""
        # Run.log inlines these lines for its common call: change both alike.
        self._queue.append(events)
        if not self._scheduled:
            self._scheduled = True
            self.wakeups += 1
            self._call_from_thread(self._wake)

    put_metrics = put  # the tuple form, read as metric events by drain()

    def _wake(self) -> None:
        """Reactor thread: hand over now if idle, else at the end of the window."""
        clock = self._clock
        if clock is None or self.window <= 0:
            self.drain()
            return
        if self._timer is not None and self._timer.active():
            return  # the window's end takes it
        wait = self._last + self.window - clock.seconds()
        if wait <= 0:
            self._hand_over(clock)
        else:
            self._timer = clock.callLater(wait, self._window_end)

    def _window_end(self) -> None:
        """Reactor thread: take what the window gathered; nothing: idle again."""
        assert self._clock is not None
        self._timer = None
        if not self._queue:
            self._scheduled = False
            if not self._queue:
                return
            # A put between the look and the clear saw the flag set: take it now.
        self._hand_over(self._clock)

    def _hand_over(self, clock: IReactorTime) -> None:
        """Hand the queue over, and take the next at the end of a window (busy)."""
        since = clock.seconds() - self._last
        taken = 0
        try:
            taken = self._take()
        finally:
            # Even when the sink raised (the error goes on to the reactor's
            # log): the window's end looks again, else the flag stays set and
            # no later put would wake the reactor.
            self.wait = busy_wait(taken, since, self.window, self.max_window, self.busy_rate)
            self._timer = clock.callLater(self.wait, self._window_end)

    def drain(self) -> None:
        """Publish everything queued so far (reactor thread only)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()  # drained now (flush, stop); the next put wakes the reactor
        self._scheduled = False
        self._take()

    def _take(self) -> int:
        """Hand everything queued to the sink; how many events."""
        batch: list[Event] = []
        queue = self._queue
        checked = True  # so far, only put_metrics calls
        while queue:
            item = queue.popleft()
            if isinstance(item, tuple):
                batch.extend(plain_events(*item))
            else:
                batch.extend(item)
                checked = False
        if batch:
            self.batches += 1
            try:
                (self._checked_sink if checked else self._sink)(batch)
            finally:
                # The window runs from the end of the hand-over: what is put
                # while the hub takes a batch waits for the next one.
                if self._clock is not None:
                    self._last = self._clock.seconds()
        return len(batch)


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
        if (
            time_s is None
            and type(metrics) is dict
            and type(step) is int
            and 0 <= step <= 9223372036854775807
        ):
            # The common call: plain_log's rules, inlined for a call without
            # a time (the training thread's hot path: without the function
            # call and its globals, 0.9x the cost). Queued as it is (floats
            # and ints are immutable); the reactor thread builds the events.
            # The bounds are INT_MAX and INT_MIN of events.rules.
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
                # Inbox.put_metrics, inlined too: change both alike.
                inbox = self._inbox
                inbox._queue.append((self._name, _time(), step, metrics.copy()))  # type: ignore[attr-defined]
                if not inbox._scheduled:
                    inbox._scheduled = True
                    inbox.wakeups += 1
                    inbox._call_from_thread(inbox._wake)
                return
        t = _time() if time_s is None else time_s
        # Without a time, plain_log would only repeat the checks just failed.
        if time_s is not None and plain_log(metrics, step, t, True, self._checked_names):
            self._inbox.put_metrics((self._name, t, step, metrics.copy()))  # type: ignore[attr-defined]
            return
        # Anything else, valid or not, takes metric_events, which applies every rule.
        self._inbox.put(metric_events(self._name, metrics, step, t, self._checked_names))

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
