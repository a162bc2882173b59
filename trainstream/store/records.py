"""
What the stores hold and hand out: value types, shared by every store and
every reader of one.
"""

from __future__ import annotations

import json

from attrs import Factory, define, field, frozen

#: One point of a metric's history: ``(step, value, time)``. ``value`` may be
#: a non-finite float (NaN, infinities); the JSON codec writes those as strings.
Point = tuple[int, float, float]


def decode_event(text: str, kind: str) -> dict[str, object]:
    """An event's dict from its stored JSON (a metric's non-finite value as a float again)."""
    event: dict[str, object] = json.loads(text)
    if kind == "metric":
        value = event.get("value")
        if isinstance(value, str):
            event["value"] = float(value)  # "NaN", "Infinity", "-Infinity" on the wire
    return event


@define(unsafe_hash=True)
class Record:
    """
    One accepted event: its id, the fields filters look at, the event as a
    dict, and its JSON encoded once for every client.

    A value, never changed once made; not ``frozen`` only because a frozen
    attrs class sets each field through ``object.__setattr__``, which made
    creating one 3.6 times as costly (0.61 against 0.17 us; two are made
    per accepted event: the one in flight and the cache's slim one).

    A record in flight (just accepted: fanned out, observed, written) keeps
    the dict it was made from. A record kept for later (the recent-events
    cache) is :meth:`slim`: its JSON only, so a big message is held once, not
    twice; its ``event`` is decoded again on each use. Filters read only
    ``type``, ``run`` and ``name``, which every record holds.
    """

    id: int
    type: str
    run: str
    name: str | None
    #: The dict, or ``None`` for a slim record (``event`` decodes ``json``).
    _event: dict[str, object] | None = field(eq=False, repr=False)
    json: str
    #: ``len(json)``, counted once: buffer accounting adds it up per client.
    size: int = field(default=Factory(lambda self: len(self.json), takes_self=True))
    #: For a metric: which segment of its series (a new one each time the
    #: steps go back, as when training resumes from a checkpoint).
    segment: int = 0

    @property
    def event(self) -> dict[str, object]:
        """The event as a dict: the one in flight, or (slim) a new one decoded from ``json``."""
        event = self._event
        return decode_event(self.json, self.type) if event is None else event

    def slim(self) -> Record:
        """This record without its dict (itself if it has none): what a cache keeps."""
        if self._event is None:
            return self
        return Record(
            self.id, self.type, self.run, self.name, None, self.json, self.size, self.segment
        )


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
