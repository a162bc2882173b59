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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from attrs import field, frozen
from twisted.internet.interfaces import IDelayedCall, IReactorTime

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


class SharedFormat:
    """
    The last batch one kind of sink formatted, and its bytes. The Hub hands
    every client with the same filter the same list, so with a thousand
    clients a batch is formatted once, not a thousand times.
    """

    def __init__(self) -> None:
        self._records: Sequence[Record] | None = None
        self._data = b""

    def get(
        self,
        records: Sequence[Record],
        coalesced: Mapping[int, int],
        render: Callable[[Sequence[Record], Mapping[int, int]], bytes],
    ) -> bytes:
        if coalesced:
            return render(records, coalesced)  # particular to one client
        if records is not self._records:
            self._records, self._data = records, render(records, coalesced)
        return self._data


class Sink(Protocol):
    """Where a subscription writes: an SSE stream or a WebSocket session."""

    def write(self, records: Sequence[Record], coalesced: Mapping[int, int]) -> None:
        """
        Send ``records`` (filtered, in id order). ``coalesced`` maps the id of
        a metric event to how many earlier values of its (run, name) were
        folded into it.
        """

    def reset(self, reason: str, oldest_id: int) -> None:
        """Say that events after the client's id are no longer stored."""

    def overflow(self, reason: str, last_id: int) -> None:
        """Close the client, saying why and the id to resume after."""


DEFAULT_CLIENT_BUFFER = 1 << 20
_CHUNK_BYTES = 64 * 1024
_REPLAY_BATCH = 2000


class Subscription:
    """
    What happens when a client is slow, in one place.

    A subscription hands its sink every matching event exactly once, in id
    order. Live events are written while the transport takes them (its push
    producer says ``pause``/``resume``); while it does not, they wait in a
    buffer of at most ``limit_bytes``: past that, metric events are coalesced
    to the latest value per (run, name), and if that is not enough the client
    is closed with a reason and the id to resume after. A replay (resume by
    id) is read from the store in batches as the client drains, never
    buffered, so a client far behind costs no memory; live events that
    arrive meanwhile are in the store too, so nothing is missed or doubled.
    ``min_interval`` (WebSocket ``max_rate``) holds writes back the same way.
    """

    def __init__(
        self,
        hub: Hub,
        sink: Sink,
        flt: Filter,
        limit_bytes: int = DEFAULT_CLIENT_BUFFER,
        clock: IReactorTime | None = None,
        min_interval: float = 0.0,
    ) -> None:
        self.hub = hub
        self.sink = sink
        self.filter = flt
        self.limit_bytes = limit_bytes
        self.clock = clock
        self.min_interval = min_interval
        self.cursor = hub.last_id  # the last id written, or skipped as unmatched
        self.replaying = False
        self.paused = False
        self.closed = False
        self.coalesced_total = 0
        self._gated = False
        self._gate_call: IDelayedCall | None = None
        self._pending: list[Record] = []
        self._pending_bytes = 0
        self._coalesced: dict[int, int] = {}

    @property
    def buffered_bytes(self) -> int:
        return self._pending_bytes

    def start(self, after: int | None) -> None:
        """Go live now, or first replay what is stored after ``after``."""
        last = self.hub.last_id
        if after is None or after == last:
            return
        oldest = self.hub.store.oldest_id
        if after > last:
            # An id from another history (a memory server that restarted):
            # all of this history is new to the client.
            self.sink.reset("that id is newer than this server's history", oldest)
            self.cursor = oldest - 1
        elif after + 1 < oldest:
            self.sink.reset("history no longer holds the events after that id", oldest)
            self.cursor = oldest - 1
        else:
            self.cursor = after
        self.replaying = True
        self._pump()

    # Flow control, from the transport's producer and the rate gate.

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._drain()

    def close(self) -> None:
        self.closed = True
        self._pending = []
        self._pending_bytes = 0
        if self._gate_call is not None and self._gate_call.active():
            self._gate_call.cancel()
        self._gate_call = None

    @property
    def _held(self) -> bool:
        return self.paused or self._gated or self.closed

    # Events from the Hub.

    def offer(self, records: Sequence[Record]) -> None:
        """Live events, already filtered for this subscription (may be empty)."""
        if self.closed or self.replaying or not records:
            return  # a replay reads these from the store
        if self._pending or self._held:
            self._buffer(records)
        else:
            self._send(records)

    def _send(self, records: Sequence[Record]) -> None:
        """Write in chunks while the transport takes them; buffer the rest."""
        chunk_bytes = _CHUNK_BYTES if self.min_interval <= 0 else self.limit_bytes + 1
        i, n = 0, len(records)
        while i < n:
            if self._held:
                self._buffer(records[i:])
                return
            j, size = i, 0
            while j < n and size < chunk_bytes:
                size += records[j].size
                j += 1
            self._write(records if i == 0 and j == n else records[i:j])
            i = j

    def _write(self, chunk: Sequence[Record]) -> None:
        counts: dict[int, int] = {}
        if self._coalesced:
            for r in chunk:
                n = self._coalesced.pop(r.id, 0)
                if n:
                    counts[r.id] = n
        self.cursor = chunk[-1].id
        self.sink.write(chunk, counts)  # may pause us at once
        if self.min_interval > 0 and self.clock is not None and not self.closed:
            self._gated = True
            self._gate_call = self.clock.callLater(self.min_interval, self._ungate)

    def _ungate(self) -> None:
        self._gate_call = None
        self._gated = False
        self._drain()

    def _drain(self) -> None:
        if self._held:
            return
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self._send(pending)
        if self.replaying and not self._held:
            self._pump()

    def _buffer(self, records: Sequence[Record]) -> None:
        self._pending.extend(records)
        self._pending_bytes += sum(r.size for r in records)
        if self._pending_bytes > self.limit_bytes:
            self._coalesce()
            if self._pending_bytes > self.limit_bytes:
                self._overflow()

    def _coalesce(self) -> None:
        """Keep only the latest metric value per (run, name); count the folded."""
        latest: dict[tuple[str, str | None], Record] = {}
        folded: dict[tuple[str, str | None], int] = {}
        for r in self._pending:
            if r.type == "metric":
                key = (r.run, r.name)
                previous = latest.get(key)
                if previous is not None:
                    folded[key] = folded.get(key, 0) + 1 + self._coalesced.pop(previous.id, 0)
                latest[key] = r
        if not folded:
            return
        kept = [r for r in self._pending if r.type != "metric" or latest[(r.run, r.name)] is r]
        for key, n in folded.items():
            rid = latest[key].id
            self._coalesced[rid] = self._coalesced.get(rid, 0) + n
        dropped = len(self._pending) - len(kept)  # earlier folds are counted already
        self.coalesced_total += dropped
        self.hub.coalesced_total += dropped
        self._pending = kept
        self._pending_bytes = sum(r.size for r in kept)

    def _overflow(self) -> None:
        last = self.cursor
        self.hub.unsubscribe(self)
        self.close()
        self.hub.overflows += 1
        self.sink.overflow(
            f"client too slow: more than {self.limit_bytes} bytes of events waited for it "
            f"after coalescing; reconnect with Last-Event-ID/after = {last} to resume",
            last,
        )

    def _pump(self) -> None:
        """Replay from the store while the client takes it."""
        store = self.hub.store
        while self.replaying and not self._held:
            oldest = store.oldest_id
            if self.cursor + 1 < oldest:
                self.sink.reset("history no longer holds the events after that id", oldest)
                self.cursor = oldest - 1
            batch = store.after(self.cursor, self.filter.matches, _REPLAY_BATCH)
            i, n = 0, len(batch)
            while i < n and not self._held:
                j, size = i, 0
                while j < n and size < _CHUNK_BYTES:
                    size += batch[j].size
                    j += 1
                self._write(batch[i:j])
                i = j
            if i < n:
                return  # held: resume() pumps on
            if n < _REPLAY_BATCH:
                # Nothing more matches in the store: caught up, go live.
                self.cursor = max(self.cursor, self.hub.last_id)
                self.replaying = False


def make_record(event_id: int, event: dict[str, object], segment: int = 0) -> Record:
    """Give a validated event its id and encode it once."""
    event = {"id": event_id, **event}
    name = event.get("name")
    text = encode_event(event)
    return Record(
        id=event_id,
        type=str(event["type"]),
        run=str(event["run"]),
        name=name if isinstance(name, str) else None,
        event=event,
        json=text,
        size=len(text),
        segment=segment,
    )


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

    def current(self, run: str, name: str) -> int:
        return self._series.get((run, name), (0, 0))[0]

    def forget(self, run: str) -> None:
        self._series = {k: v for k, v in self._series.items() if k[0] != run}
        self._announced.pop(run, None)


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
        self.segments = Segments(store.segments())
        self._subscriptions: dict[Subscription, None] = {}
        self.accepted_total = 0
        self.coalesced_total = 0
        self.overflows = 0
        # Called with each published batch, after every subscriber had it (runs
        # registry, counters). An observer may publish in turn.
        self.observers: list[Callable[[Sequence[Record]], object]] = []

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def accept(self, items: object) -> tuple[int, int, int]:
        """
        Validate a batch from a publisher, all or nothing, then publish it.

        :raises trainstream.events.EventError: naming the first bad event.
        :return: ``(accepted, first_id, last_id)``.
        """
        return self.publish(validate_events(items, self.limits, self._now))

    def publish(self, events: Sequence[dict[str, object]]) -> tuple[int, int, int]:
        """Publish events that are already validated."""
        first = next_id = self._next_id
        segments = self.segments
        records: list[Record] = []
        for e in events:
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
                    rewind: dict[str, object] = {
                        "type": "status",
                        "run": e["run"],
                        "time": e["time"],
                        "state": "running",
                        "rewind_to": step,
                        "message": f"steps went back to {step} (resumed from a checkpoint?)",
                    }
                    records.append(make_record(next_id, rewind, 0))
                    next_id += 1
                    if first == next_id - 1:
                        first = next_id  # first_id names the publisher's own first event
            records.append(make_record(next_id, e, segment))
            next_id += 1
        if not records:
            return (0, first, first - 1)
        self._next_id = next_id
        self.store.append(records)
        self.accepted_total += len(records)
        # Clients mostly share a few filters: filter once per distinct filter,
        # and hand them all the same list (so sinks can share formatting).
        filtered: dict[Filter, list[Record]] = {}
        for subscription in list(self._subscriptions):
            flt = subscription.filter
            if flt.matches_all:
                subscription.offer(records)
                continue
            wanted = filtered.get(flt)
            if wanted is None:
                wanted = filtered[flt] = [r for r in records if flt.matches(r)]
            subscription.offer(wanted)
        for observer in self.observers:
            observer(records)
        # The publisher's own events: a rewind status the server added may lie
        # between first and last (observers may have published after them).
        return (len(events), first, next_id - 1)

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
        subscription = Subscription(self, sink, flt, limit_bytes, clock, min_interval)
        self._subscriptions[subscription] = None
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.pop(subscription, None)
        subscription.close()
