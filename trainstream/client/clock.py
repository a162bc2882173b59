"""
Time for the clients, which run without a reactor, so that their waiting can
be replaced in tests by a ``twisted.internet.task.Clock``:

- :class:`Scheduler` is the part of ``IReactorTime`` the Publisher uses
  (``seconds``, ``callLater``). :class:`ThreadClock` provides it on one
  daemon thread of its own; a test passes a ``Clock`` and ``advance()``\\ s it.
- :class:`Pause` is what a blocking loop (the SSE client) waits with:
  ``seconds`` and ``advance(amount)``, "let ``amount`` seconds pass". A
  ``Clock`` is one, where the time passes at once; :class:`WallClock`
  waits for real, and stops waiting when its event is set.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["DelayedCall", "Pause", "Scheduler", "ThreadClock", "WallClock"]

_logger = logging.getLogger(__name__)


class DelayedCall(Protocol):
    """A call :meth:`Scheduler.callLater` will make (``IDelayedCall``)."""

    def cancel(self) -> None: ...
    def active(self) -> bool: ...


class Scheduler(Protocol):
    """``seconds`` and ``callLater`` of ``IReactorTime``."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, f: Callable[[], object]) -> DelayedCall: ...


class Pause(Protocol):
    """What a blocking client reads the time from and waits with."""

    def seconds(self) -> float: ...
    def advance(self, amount: float) -> None: ...


class WallClock:
    """
    Real time (``time.monotonic``); :meth:`advance` waits, and stops
    waiting as soon as ``stop`` is set.
    """

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def seconds(self) -> float:
        return time.monotonic()

    def advance(self, amount: float) -> None:
        self.stop.wait(amount)


class _Call:
    def __init__(self, f: Callable[[], object]) -> None:
        self.f = f
        self.cancelled = False
        self.called = False

    def cancel(self) -> None:
        self.cancelled = True

    def active(self) -> bool:
        return not (self.cancelled or self.called)


class ThreadClock:
    """
    A :class:`Scheduler` whose calls run, in the order of their time, on one
    daemon thread started by the first :meth:`callLater`. A call that raises
    is logged; the next ones run all the same.

    :param name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._calls: list[tuple[float, int, _Call]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False

    def seconds(self) -> float:
        return time.monotonic()

    def callLater(self, delay: float, f: Callable[[], object]) -> _Call:
        """Call ``f()`` in the clock's thread ``delay`` seconds from now (from any thread)."""
        call = _Call(f)
        with self._cond:
            if self._stopped or (self._stopping and delay > 0):
                call.cancel()  # stopped: nothing runs any more
                return call
            heapq.heappush(self._calls, (self.seconds() + max(0.0, delay), next(self._order), call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return call

    def stop(self, timeout: float | None = None) -> bool:
        """
        Run the calls that are due now (and those they schedule for now),
        then end the thread. ``True`` once it ended within ``timeout``.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
            if thread is None:
                self._stopped = True
        if thread is None or thread is threading.current_thread():
            return thread is None
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    calls = self._calls
                    while calls and not calls[0][2].active():
                        heapq.heappop(calls)
                    now = self.seconds()
                    if calls and calls[0][0] <= now:
                        call = heapq.heappop(calls)[2]
                        break
                    if self._stopping:
                        calls.clear()
                        self._stopped = True
                        return
                    self._cond.wait(calls[0][0] - now if calls else None)
                call.called = True
            try:
                call.f()
            except Exception:
                _logger.exception("trainstream %s: a scheduled call failed", self.name)
