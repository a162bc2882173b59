"""
The Run API (``PROTOCOL.md`` section 7), defined once.

:class:`RunAPI` is what training code calls, whoever takes the events: the
embedded ``trainstream.Run`` (a queue the reactor drains),
``trainstream.client.Publisher`` (a queue a thread POSTs) and the
integrations' ``Target`` (either of them, with a flush and close that behave
the same). Each checks what it is given in the caller's thread, with the
rules of ``POST /api/events`` (``trainstream.events``), and then only queues:
nothing here waits on the network or the reactor.

A subclass implements :meth:`RunAPI._enqueue`. It may override :meth:`RunAPI.log`
with a faster path for the common call, as ``Run`` does, provided that every
call its shortcut does not take goes through ``metric_events``: the rules
live there, once.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from typing import Any

from trainstream.events import EventError, metric_events, validate_event
from trainstream.events.rules import show

__all__ = ["BUSY_RATE", "Event", "RunAPI", "busy_wait"]

#: Events/s above which a training loop counts as busy (see :func:`busy_wait`):
#: headroom above 1 kHz for a rate measured over a few events.
BUSY_RATE = 1_500.0


def busy_wait(events: int, since: float, wait: float, max_wait: float, busy_rate: float) -> float:
    """
    How long to gather events before the next hand-over (the embedded
    ``Inbox``, the remote ``Publisher``), from the rate of the batch just
    taken: ``events`` over the ``since`` seconds since the one before.
    ``wait`` up to ``busy_rate``, growing in proportion to ``max_wait`` at
    twice that rate: a loop logging 5,000 events/s hands over 10 batches a
    second, not 100, so the thread that takes them (and the GIL it holds)
    interrupts training less often, while 1 kHz keeps ``wait``.
    """
    rate = events / since if since > 0 else 0.0
    busy = min(1.0, max(0.0, rate / busy_rate - 1.0))  # 0 up to busy_rate, 1 from twice it
    return wait + (max_wait - wait) * busy


Event = dict[str, object]


class RunAPI(abc.ABC):
    """
    One training run as its training code sees it. Every method may be
    called from any thread and returns without waiting for the server.

    :param name: the run's name, checked here (a bad one fails at once).
    """

    def __init__(self, name: str) -> None:
        validate_event({"type": "log", "run": name, "level": "info", "message": ""})
        self._name = name
        #: Metric names already checked: ``metric_events`` skips their check.
        self._checked_names: set[str] = set()

    @property
    def name(self) -> str:
        """The run's name (fixed: events checked against it are queued unchecked later)."""
        return self._name

    @abc.abstractmethod
    def _enqueue(self, events: list[Event]) -> None:
        """
        Queue ``events``, which passed ``validate_event`` or ``metric_events``,
        in order, from any thread, without waiting.
        """

    def log(self, metrics: Mapping[str, Any], step: int, time_s: float | None = None) -> None:
        """
        Queue one metric event per ``{name: value}`` at ``step``.

        :param time_s: the events' time (Unix seconds); now if not given.
        :raises EventError: at once, naming the run, the metric and the
            field, for a bad name, step, value or time (the rules of
            ``POST /api/events``); nothing of this call is queued then.
        """
        t = time.time() if time_s is None else time_s
        self._enqueue(metric_events(self.name, metrics, step, t, self._checked_names))

    def status(self, state: str, epoch: int | None = None, message: str | None = None) -> None:
        """Queue a status event (``running``, ``paused``, ...)."""
        event: Event = {"type": "status", "run": self.name, "state": state}
        if epoch is not None:
            event["epoch"] = epoch
        if message is not None:
            event["message"] = message
        self._enqueue([self._checked(event)])

    def text(self, message: str, level: str = "info") -> None:
        """Queue a log line (``level``: ``debug``, ``info``, ``warning``, ``error``)."""
        self._enqueue(
            [self._checked({"type": "log", "run": self.name, "level": level, "message": message})]
        )

    def hparams(self, params: Mapping[str, object]) -> None:
        """Queue the run's hyperparameters (names to strings, numbers, bools or ``None``)."""
        if not isinstance(params, Mapping):
            detail = f"hparams() takes a dict, got {show(params)}"
            raise EventError(f"run {show(self.name)}: {detail}", detail=detail)
        self._enqueue(
            [self._checked({"type": "hparams", "run": self.name, "params": dict(params)})]
        )

    def _checked(self, event: Event) -> Event:
        """``validate_event(event)``, its error naming this run and the event's type."""
        try:
            return validate_event(event)
        except EventError as e:
            where = f"run {show(self.name)}, {event['type']} event"
            raise EventError(f"{where}: {e.detail}", field=e.field, detail=e.detail) from None

    def finish(self) -> None:
        """The run ended well: a ``finished`` status."""
        self.status("finished")

    def fail(self, message: str) -> None:
        """The run ended badly: a ``failed`` status saying why."""
        self.status("failed", message=message)
