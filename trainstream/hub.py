"""
Where an event gets its id, and how it reaches every live subscriber.

An event is numbered when it is accepted, and shown to anyone (live
subscribers, the runs registry, ``GET /api/events``, resumes) only once the
store has committed it: the store's ``append`` Deferred fires, batch by
batch in id order, and the Hub fans the batch out in that same call. So a
client never holds an id the history may not have; after a crash the ids of
events that were never committed are given again, but nobody saw them.

Everything here runs in the reactor thread, so delivery and ``subscribe``
never interleave: a subscriber replayed from the store and then added to the
live set can neither miss nor repeat an event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from trainstream.events import Limits, encode_event, validate_events
from trainstream.store import Record, Store
from trainstream.store.filter import Filter
from trainstream.subscription import DEFAULT_CLIENT_BUFFER, Sink, Subscription

DEFAULT_LIMITS = Limits()


def make_record(
    event_id: int, event: dict[str, object], segment: int = 0, tail: str | None = None
) -> Record:
    """
    Give a validated event its id and encode it once; or, given the ``tail``
    ``prepare`` encoded, a ``prepare``d event (its own dict) just its id.
    """
    if tail is None:
        event = {"id": event_id, **event}
        text = encode_event(event)
    else:
        event["id"] = event_id  # the key stays first
        text = f'{{"id":{event_id},{tail}'
    name = event.get("name")
    # Positional: a keyword call of the attrs __init__ costs half again as much.
    return Record(
        event_id,
        str(event["type"]),
        str(event["run"]),
        name if isinstance(name, str) else None,
        event,
        text,
        len(text),
        segment,
    )


_NO_ID = '{"id":0,'


def prepare(events: Sequence[dict[str, object]]) -> list[tuple[dict[str, object], str | None]]:
    """
    (In any thread.) ``make_record``'s costly half for validated events,
    before ids are known: each event with an ``id`` key first and its JSON
    after the id (``None`` if the text does not begin as expected); see
    ``Hub.publish_checked``.
    """
    prepared: list[tuple[dict[str, object], str | None]] = []
    for event in events:
        event = {"id": 0, **event}
        text = encode_event(event)
        prepared.append((event, text[len(_NO_ID) :] if text.startswith(_NO_ID) else None))
    return prepared


def _numbered_record(
    event_id: int, event: dict[str, object], tail: str | None, segment: int
) -> Record:
    """``make_record`` of a ``prepare``d event (its own dict, given its id now)."""
    if tail is None:  # its text did not begin as expected: encoded whole, here
        del event["id"]
    return make_record(event_id, event, segment, tail)


def rewind_status(event: dict[str, object], step: int) -> dict[str, object]:
    """The ``status`` that announces a rewind of ``event``'s run back to ``step``."""
    return {
        "type": "status",
        "run": event["run"],
        "time": event["time"],
        "state": "running",
        "rewind_to": step,
        "message": f"steps went back to {step} (resumed from a checkpoint?)",
    }


class Segments:
    """
    Checkpoint rewinds. A metric whose step goes below its series' last
    step starts a new segment of that series; the first series of a run to
    go back announces it once for the run (a ``status`` with ``rewind_to``),
    so charts drop the stale tail instead of drawing two overlapping lines.
    """

    def __init__(self, known: dict[tuple[str, str], tuple[int, int]]) -> None:
        self._series = dict(known)
        self._announced: dict[str, int] = {}
        for (run, _), (segment, _) in known.items():
            self._announced[run] = max(self._announced.get(run, 0), segment)

    def assign(self, run: str, name: str, step: int) -> tuple[int, bool]:
        """The segment of this point, and whether it starts a rewind of the run."""
        key = (run, name)
        known = self._series.get(key)
        if known is None:
            self._series[key] = (0, step)
            return 0, False
        segment, last = known
        announce = False
        if step < last:
            segment += 1
            if segment > self._announced.get(run, 0):
                self._announced[run] = segment
                announce = True
        self._series[key] = (segment, step)
        return segment, announce

    def note(self, run: str, name: str, segment: int, step: int) -> None:
        """A point another server numbered (a cluster's feed): follow its segment."""
        self._series[(run, name)] = (segment, step)
        if segment > self._announced.get(run, 0):
            self._announced[run] = segment

    def current(self, run: str, name: str) -> int:
        return self._series.get((run, name), (0, 0))[0]

    def forget(self, run: str) -> None:
        self._series = {k: v for k, v in self._series.items() if k[0] != run}
        self._announced.pop(run, None)


class Hub:
    """
    The one way in for events, and where they get their ids.

    ``accept`` validates a batch from any publisher (REST, WebSocket,
    ``run.log``, the server's own observers), numbers it and appends it to
    the store; once committed, it is offered to every subscriber. Observers
    (runs, ranks) are told of each committed batch after the subscribers and
    *return* the events they want published; those are accepted in turn,
    after the batch, never re-entering it.
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
        self._next_id: int | None = None  # read from the store once it is open
        self._visible = 0  # the newest id committed and offered to subscribers
        self._segments: Segments | None = None
        # Live subscriptions grouped by filter (in subscription order within
        # each): a batch is filtered once per distinct filter, and a filter
        # it has nothing for costs its subscribers nothing.
        self._by_filter: dict[Filter, dict[Subscription, None]] = {}
        self._count = 0
        self._follow: list[dict[str, object]] = []  # what observers returned, to accept
        self._following = False
        self.accepted_total = 0
        self.coalesced_total = 0
        self.overflows = 0
        #: Called with each published batch, after every subscriber had it
        #: (runs registry, ranks). Each returns the events it wants published.
        self.observers: list[Callable[[Sequence[Record]], Sequence[dict[str, object]] | None]] = []

    def open(self) -> None:
        """Continue from the store's ids and segments (the store is started)."""
        self._next_id = self.store.last_id + 1
        self._visible = self.store.last_id
        self._segments = Segments(self.store.segments())

    @property
    def segments(self) -> Segments:
        if self._segments is None:
            self.open()
        assert self._segments is not None
        return self._segments

    @property
    def last_id(self) -> int:
        """The newest id a client may know: committed, and offered to subscribers."""
        if self._next_id is None:
            self.open()
        return self._visible

    def _numbered(self) -> int:
        """The newest id given (its event may not be committed yet)."""
        if self._next_id is None:
            self.open()
        assert self._next_id is not None
        return self._next_id - 1

    @property
    def subscriber_count(self) -> int:
        return self._count

    def subscriptions(self) -> list[Subscription]:
        """Every live subscription, grouped by filter."""
        return [s for group in self._by_filter.values() for s in group]

    def accept(self, items: object) -> tuple[int, int, int]:
        """
        Validate a batch from a publisher, all or nothing, then number it
        and hand it to the store (it reaches subscribers once committed:
        ``store.sync()`` says when).

        :raises trainstream.events.EventError: naming the first bad event.
        :return: ``(accepted, first_id, last_id)`` of the publisher's events.
        """
        return self.accept_checked(validate_events(items, self.limits, self._now))

    def check(self, items: object) -> list[dict[str, object]]:
        """
        ``accept``'s validation alone, safe in any thread (it touches no
        state of the hub): what ``accept_checked`` and ``publish_checked`` take.

        :raises trainstream.events.EventError: naming the first bad event.
        """
        return validate_events(items, self.limits, self._now)

    def accept_checked(self, events: Sequence[dict[str, object]]) -> tuple[int, int, int]:
        """
        ``accept`` for events already valid and normalized, each a new dict
        the caller no longer touches: the metric events ``run.log`` checked
        in the training thread (``plain_log``) and the reactor thread built.
        """
        answer = self._publish(events)
        self._accept_follow()  # a store that commits at once has delivered already
        return answer

    def publish(self, items: object) -> Deferred[tuple[int, int, int]]:
        """
        ``accept``, then fire with its answer once the batch is durable: what
        a ``POST /api/events`` 200 and a WebSocket ``ack`` wait for. Fails
        with ``StoreError`` when it could not be kept (nothing of it was).

        :raises trainstream.events.EventError: naming the first bad event.
        """
        answer = self.accept(items)
        return self.store.sync().addCallback(lambda _: answer)

    def publish_checked(
        self, prepared: Sequence[tuple[dict[str, object], str | None]]
    ) -> Deferred[tuple[int, int, int]]:
        """
        ``publish`` for events ``check`` returned and ``prepare`` encoded: a
        large POST does both in a thread, so the reactor thread only gives
        the batch its ids, whole.
        """
        answer = self._publish([event for event, _ in prepared], [tail for _, tail in prepared])
        self._accept_follow()
        return self.store.sync().addCallback(lambda _: answer)

    def sync(self) -> Deferred[None]:
        """Fires once every event accepted so far is durable (``run.flush()``, a stop)."""
        return self.store.sync()

    @property
    def epoch(self) -> str:
        """The history's identity, as ``/api/health`` shows it."""
        return self.store.epoch

    def _accept_follow(self) -> None:
        """Accept what the observers returned, validated like any batch, in order."""
        if self._following:
            return  # the loop below, further up the stack, takes it
        self._following = True
        try:
            while self._follow:
                follow, self._follow = self._follow, []
                self._publish(validate_events(follow, self.limits, self._now))
        finally:
            self._following = False

    def _publish(
        self, events: Sequence[dict[str, object]], tails: Sequence[str | None] | None = None
    ) -> tuple[int, int, int]:
        """Number validated events (``prepare``d ones, given their ``tails``) and store them."""
        first = next_id = self._numbered() + 1
        segments = self.segments
        records: list[Record] = []
        for index, e in enumerate(events):
            segment = 0
            if e["type"] == "metric" and "rank" not in e:
                # Ranks of one run interleave their steps; their own steps
                # going back are the ranks service's business, not a rewind.
                step = e["step"]
                assert isinstance(step, int)
                segment, announce = segments.assign(str(e["run"]), str(e["name"]), step)
                if announce:
                    # Numbered just before the point that went back, so it
                    # reads in order: a "finished" later in the same batch
                    # stays the run's last word.
                    records.append(make_record(next_id, rewind_status(e, step), 0))
                    next_id += 1
                    if first == next_id - 1:
                        first = next_id  # first_id names the publisher's own first event
            if tails is None:
                records.append(make_record(next_id, e, segment))
            else:
                records.append(_numbered_record(next_id, e, tails[index], segment))
            next_id += 1
        if not records:
            return (0, first, first - 1)
        self._next_id = next_id
        self.accepted_total += len(records)
        # The publisher's own events: a rewind status the server added may lie
        # between first and last.
        answer = (len(events), first, next_id - 1)
        self.store.append(records).addCallback(self._deliver)
        return answer

    def _deliver(self, records: Sequence[Record]) -> None:
        """
        A batch is committed (``records``: what of it was stored): offer it
        to every subscriber, then the observers.
        """
        if not records:
            # Refused (a full disk): those ids were never shown, and after a
            # restart may be given to other events; last_id must not name them.
            return
        self._visible = max(self._visible, records[-1].id)
        # Clients mostly share a few filters: filter once per distinct filter,
        # and hand them all the same list (so sinks can share formatting).
        # 9,000 idle subscribers of one quiet run cost one select a batch.
        for flt, group in list(self._by_filter.items()):
            wanted = records if flt.matches_all else flt.select(records)
            if wanted:
                for subscription in list(group):
                    subscription.offer(wanted)
        for observer in self.observers:
            self._follow.extend(observer(records) or ())
        self._accept_follow()

    #: What ``subscribe`` makes (the cluster's hub makes subscriptions that
    #: wait for its feed before a resume past its newest id).
    subscription_class: type[Subscription] = Subscription

    def subscribe(
        self,
        sink: Sink,
        flt: Filter,
        limit_bytes: int = DEFAULT_CLIENT_BUFFER,
        clock: IReactorTime | None = None,
        min_interval: float = 0.0,
    ) -> Subscription:
        """
        Add a client. Nothing is sent until the caller, holding the
        subscription (so its producer can pause it), calls ``start(after)``.
        """
        subscription = self.subscription_class(self, sink, flt, limit_bytes, clock, min_interval)
        self._by_filter.setdefault(flt, {})[subscription] = None
        self._count += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        group = self._by_filter.get(subscription.filter)
        if group is not None and group.pop(subscription, 0) is None:
            self._count -= 1
            if not group:
                del self._by_filter[subscription.filter]
        subscription.close()
