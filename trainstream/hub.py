"""
Where an event gets its id, and how it reaches every live subscriber.

Everything here runs in the reactor thread, so ``accept`` and ``subscribe``
never interleave: a subscriber replayed from the store and then added to the
live set can neither miss nor repeat an event.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from attrs import field, frozen

from trainstream.events import Limits, encode_event, validate_events
from trainstream.store import Record, Store

DEFAULT_LIMITS = Limits()


def _glob(patterns: Iterable[str]) -> re.Pattern[str] | None:
    pats = [p for p in patterns if p]
    if not pats or "*" in pats:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats))


@frozen
class Filter:
    """
    Which events a subscriber wants: run globs, metric-name globs, types.
    An empty tuple (or ``*``) means all. The name filter only applies to
    events that carry a name; status and log events pass it.
    """

    runs: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    _runs: re.Pattern[str] | None = field(init=False, eq=False, repr=False)
    _names: re.Pattern[str] | None = field(init=False, eq=False, repr=False)
    _types: frozenset[str] | None = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_runs", _glob(self.runs))
        object.__setattr__(self, "_names", _glob(self.names))
        types = frozenset(t for t in self.types if t)
        object.__setattr__(self, "_types", None if not types or "*" in types else types)

    @property
    def matches_all(self) -> bool:
        return self._runs is None and self._names is None and self._types is None

    def matches(self, record: Record) -> bool:
        if self._types is not None and record.type not in self._types:
            return False
        if self._runs is not None and self._runs.match(record.run) is None:
            return False
        if (
            self._names is not None
            and record.name is not None
            and self._names.match(record.name) is None
        ):
            return False
        return True


class Subscriber(Protocol):
    """A live client: an SSE stream or a WebSocket session."""

    def deliver(self, records: Sequence[Record]) -> None:
        """Send ``records`` (already filtered, in id order)."""

    def reset(self, reason: str, oldest_id: int) -> None:
        """Say that events after the client's id are no longer stored."""


def make_record(event_id: int, event: dict[str, object]) -> Record:
    """Give a validated event its id and encode it once."""
    event = {"id": event_id, **event}
    name = event.get("name")
    return Record(
        id=event_id,
        type=str(event["type"]),
        run=str(event["run"]),
        name=name if isinstance(name, str) else None,
        event=event,
        json=encode_event(event),
    )


class Hub:
    """
    Accepts events from every publisher, numbers them, stores them and fans
    them out to subscribers.
    """

    def __init__(
        self,
        store: Store,
        limits: Limits = DEFAULT_LIMITS,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits
        self._now = now
        self._next_id = store.last_id + 1
        self._subscribers: dict[Subscriber, Filter] = {}
        self.accepted_total = 0
        # Called with each published batch, after every subscriber had it (runs
        # registry, counters). An observer may publish in turn.
        self.observers: list[Callable[[Sequence[Record]], object]] = []

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def accept(self, items: object) -> tuple[int, int, int]:
        """
        Validate a batch from a publisher, all or nothing, then publish it.

        :raises trainstream.events.EventError: naming the first bad event.
        :return: ``(accepted, first_id, last_id)``.
        """
        return self.publish(validate_events(items, self.limits, self._now))

    def publish(self, events: Sequence[dict[str, object]]) -> tuple[int, int, int]:
        """Publish events that are already validated."""
        first = self._next_id
        records = [make_record(first + i, e) for i, e in enumerate(events)]
        if not records:
            return (0, first, first - 1)
        self._next_id = first + len(records)
        self.store.append(records)
        self.accepted_total += len(records)
        for subscriber, flt in list(self._subscribers.items()):
            if flt.matches_all:
                subscriber.deliver(records)
            else:
                wanted = [r for r in records if flt.matches(r)]
                if wanted:
                    subscriber.deliver(wanted)
        for observer in self.observers:
            observer(records)
        return (len(records), first, self._next_id - 1)

    def subscribe(self, subscriber: Subscriber, flt: Filter, after: int | None = None) -> None:
        """
        Add a live subscriber. With ``after``, first replay every stored
        matching event after that id (or a reset, if the store no longer has
        them all), then go live.
        """
        if after is not None and after != self.last_id:
            oldest = self.store.oldest_id
            if after > self.last_id:
                # An id from another history (a memory server that restarted):
                # this history's events are all new to the client.
                subscriber.reset("that id is newer than this server's history", oldest)
                after = 0
            elif after + 1 < oldest:
                subscriber.reset("history no longer holds the events after that id", oldest)
            replay = self.store.after(after, flt.matches)
            if replay:
                subscriber.deliver(replay)
        self._subscribers[subscriber] = flt

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.pop(subscriber, None)
