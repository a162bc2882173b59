"""
What the stores hold and hand out: value types, shared by every store and
every reader of one.
"""

from __future__ import annotations

from attrs import Factory, field, frozen

#: One point of a metric's history: ``(step, value, time)``. ``value`` may be
#: a non-finite float (NaN, infinities); the JSON codec writes those as strings.
Point = tuple[int, float, float]


@frozen
class Record:
    """
    One accepted event: its id, the fields filters look at, the event as a
    dict, and its JSON encoded once for every client.
    """

    id: int
    type: str
    run: str
    name: str | None
    event: dict[str, object]
    json: str
    #: ``len(json)``, counted once: buffer accounting adds it up per client.
    size: int = field(default=Factory(lambda self: len(self.json), takes_self=True))
    #: For a metric: which segment of its series (a new one each time the
    #: steps go back, as when training resumes from a checkpoint).
    segment: int = 0


@frozen
class SeriesSummary:
    """A series' life so far, as a persistent store keeps it (see ``runs``)."""

    count: int
    last_step: int
    last_value: float
    min: float | None
    max: float | None
    last_time: float
    last_id: int


@frozen
class StoreHealth:
    """
    How a history is doing, for ``GET /api/health`` and ``/metrics``.

    :ivar problems: what is wrong now, each naming the history and what
        happened (empty: all is well).
    :ivar writer_restarts: times a writer (process) was started again after
        it died.
    :ivar events_lost: accepted events that could not be stored at all.
    """

    problems: tuple[str, ...] = ()
    writer_restarts: int = 0
    events_lost: int = 0
