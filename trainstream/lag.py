"""
Event-loop monitoring: how late the reactor runs what it was asked to run.

A call scheduled every ``interval`` seconds (0.25 s) on the server's
reactor notes, each time it runs, how much later than planned it ran: that
is the reactor lag, the time every client, ack and keepalive waited behind
whatever held the reactor (a slow request, a blocking call, the GIL held
by a busy training thread). ``/metrics`` shows a histogram of it and the
recent maximum; ``/api/health`` shows the recent maximum and answers
``degraded`` while it is past ``--lag-warn``; one warning line is logged
when it crosses the threshold, and one when it is back under it.

While the reactor is blocked nothing here runs (nor does anything else):
the lag is measured once it runs again, and stays in the recent maximum for
``window`` seconds, so a poller of ``/api/health`` sees a stall it could not
reach the server during.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()

#: Seconds between two measurements.
DEFAULT_INTERVAL = 0.25
#: Seconds a lag counts in the recent maximum (and keeps health degraded).
DEFAULT_WINDOW = 10.0
#: Upper bounds (seconds) of the histogram's buckets (Prometheus ``le``).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@frozen
class LagStatus:
    """
    A snapshot of the reactor lag, for health and ``/metrics``.

    :ivar last_s: the lag of the latest measurement.
    :ivar max_s: the largest lag of the last ``window_s`` seconds.
    :ivar warn_s: the threshold past which the server is degraded.
    :ivar buckets: ``(upper bound, cumulative count)`` for each of ``BUCKETS``.
    :ivar count: measurements since the start; ``sum_s`` their total lag.
    """

    last_s: float
    max_s: float
    warn_s: float
    window_s: float
    buckets: tuple[tuple[float, int], ...]
    count: int
    sum_s: float

    @property
    def problem(self) -> str | None:
        """Why the server is degraded by lag, or ``None``."""
        if self.max_s <= self.warn_s:
            return None
        return (
            f"reactor lag: scheduled calls ran up to {self.max_s * 1000:.0f} ms late in the "
            f"last {self.window_s:g} s (threshold --lag-warn {self.warn_s:g} s): something "
            "blocks the event loop"
        )


class LagMonitor(Service):
    """
    Measures the lag of ``clock`` while running.

    :param warn: seconds of lag past which the server is degraded (``--lag-warn``).
    :param on_change: called with the new problem (or ``None``) when the
        lag crosses the threshold either way (the fault monitor).
    """

    name = "lag"

    def __init__(
        self,
        clock: IReactorTime,
        warn: float,
        interval: float = DEFAULT_INTERVAL,
        window: float = DEFAULT_WINDOW,
    ) -> None:
        self.clock = clock
        self.warn = warn
        self.interval = interval
        self.window = window
        self.on_change: Callable[[str | None], None] | None = None
        #: Measure at all: a test's virtual clock (no real reactor) jumps
        #: by whole seconds, which is no lag (``Monitoring`` decides).
        self.enabled = True
        self._call: IDelayedCall | None = None
        self._planned = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (when, lag), lag decreasing
        self._counts = [0] * len(BUCKETS)
        self._count = 0
        self._sum = 0.0
        self._last = 0.0
        self._lagging = False
        self._cached: LagStatus | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.enabled:
            self._schedule(self.clock.seconds())

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, now: float) -> None:
        self._planned = now + self.interval
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = self.clock.seconds()
        self.record(max(0.0, now - self._planned), now)
        self._schedule(now)

    def record(self, lag: float, now: float) -> None:
        """Count one measurement of ``lag`` seconds taken at ``now``."""
        self._cached = None
        self._last = lag
        self._count += 1
        self._sum += lag
        for i, bound in enumerate(BUCKETS):
            if lag <= bound:
                self._counts[i] += 1
                break
        recent = self._recent
        # A monotonic deque: only lags that may still become the maximum stay.
        while recent and recent[-1][1] <= lag:
            recent.pop()
        recent.append((now, lag))
        self._expire(now)
        lagging = self._max() > self.warn
        if lagging != self._lagging:
            self._lagging = lagging
            if lagging:
                _log.warn(
                    "reactor lag {ms:.0f} ms is past --lag-warn {warn:g} s: something "
                    "blocks the event loop (clients wait that long)",
                    ms=lag * 1000,
                    warn=self.warn,
                )
            else:
                _log.info("reactor lag is back under --lag-warn {warn:g} s", warn=self.warn)
            if self.on_change is not None:
                self.on_change(self.status().problem)

    def _expire(self, now: float) -> None:
        recent = self._recent
        while recent and recent[0][0] < now - self.window:
            recent.popleft()
            self._cached = None

    def _max(self) -> float:
        return self._recent[0][1] if self._recent else 0.0

    def problem(self) -> str | None:
        """Why the server is degraded by lag now, or ``None`` (cheap: for every health look)."""
        self._expire(self.clock.seconds())
        if self._max() <= self.warn:
            return None
        return self.status().problem

    def status(self) -> LagStatus:
        """The snapshot; made again only after a tick (every request's health look reads it)."""
        self._expire(self.clock.seconds())
        cached = self._cached
        if cached is not None and cached.warn_s == self.warn:
            return cached
        cumulative: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip(BUCKETS, self._counts, strict=True):
            total += count
            cumulative.append((bound, total))
        self._cached = LagStatus(
            last_s=self._last,
            max_s=self._max(),
            warn_s=self.warn,
            window_s=self.window,
            buckets=tuple(cumulative),
            count=self._count,
            sum_s=self._sum,
        )
        return self._cached


__all__ = ["BUCKETS", "LagMonitor", "LagStatus"]
