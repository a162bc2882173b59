"""
What happens when a client is slow, in one place: one subscriber's filter,
buffer, coalescing, overflow and replay.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from trainstream.config import DEFAULT_CLIENT_BUFFER
from trainstream.store import Page, Record
from trainstream.store.filter import Filter

_log = Logger()
_id = attrgetter("id")


class History(Protocol):
    """What a replay reads of the store (see ``Store``)."""

    @property
    def oldest_id(self) -> int: ...

    def after_cached(self, after_id: int, flt: Filter, limit: int) -> list[Record] | None:
        """What memory holds after ``after_id``, or ``None`` if the disk is needed."""

    def read_after(self, after_id: int, flt: Filter, limit: int) -> Deferred[Page]:
        """The same, off the reactor thread; what it covered up to ``Page.upto``."""


class Source(Protocol):
    """What a subscription needs of the hub that feeds it."""

    coalesced_total: int
    overflows: int

    @property
    def store(self) -> History: ...

    @property
    def last_id(self) -> int: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...


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
    id) is read from the store in batches as the client drains, one batch at
    a time, so a client far behind costs no memory; live events that arrive
    meanwhile are in the store too, so nothing is missed or doubled.
    ``min_interval`` (WebSocket ``max_rate``) holds writes back the same way.

    A batch the store's cache holds is read in the reactor thread; any
    other is read off it (``read_after``: the reactor never waits on the
    disk). While that read is out nothing is written; what it brings is
    written as the client takes it, the rest kept for the next ``resume``,
    never read again. The replay goes live only in the same turn as a read
    of the cache found nothing more, so no event committed while a read
    was out is missed.
    """

    def __init__(
        self,
        hub: Source,
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
        self._reading: Deferred[Page] | None = None  # a read_after out: nothing is written
        self._pumping = False
        # What a replay read and has not written yet (None: nothing); its read
        # covered up to _upto.
        self._backlog: Sequence[Record] | None = None
        self._backlog_at = 0
        self._upto = 0
        self._live: list[Deferred[None]] = []

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
        self._backlog, self._backlog_at = None, 0
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()  # nobody waits for it: the store skips or interrupts it
        if self._gate_call is not None and self._gate_call.active():
            self._gate_call.cancel()
        self._gate_call = None
        self._replayed()

    def live(self) -> Deferred[None]:
        """Fires once the replay (if any) is over: the subscription is live, or closed."""
        d: Deferred[None] = Deferred()
        if self.replaying and not self.closed:
            self._live.append(d)
        else:
            d.callback(None)
        return d

    def _replayed(self) -> None:
        waiting, self._live = self._live, []
        for d in waiting:
            d.callback(None)

    @property
    def _held(self) -> bool:
        return self.paused or self._gated or self.closed

    # Events from the Hub.

    def offer(self, records: Sequence[Record]) -> None:
        """Live events, already filtered for this subscription (may be empty)."""
        if self.closed or self.replaying or not records:
            return  # a replay reads these from the store
        last = self._pending[-1].id if self._pending else self.cursor
        if records[0].id <= last:  # had already (a replay went live within this batch)
            records = records[bisect.bisect_right(records, last, key=_id) :]
            if not records:
                return
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
        if self._pumping:
            return  # re-entered (a write resumed us): the loop below goes on
        self._pumping = True
        try:
            self._replay()
        finally:
            self._pumping = False

    def _replay(self) -> None:
        store = self.hub.store
        while self.replaying and not self._held and self._reading is None:
            if self._backlog is not None:
                if not self._write_backlog():
                    return  # held: resume() pumps on
                continue
            oldest = store.oldest_id
            if self.cursor + 1 < oldest:
                self.sink.reset("history no longer holds the events after that id", oldest)
                self.cursor = oldest - 1
            batch = store.after_cached(self.cursor, self.filter, _REPLAY_BATCH)
            if batch is None:
                self._read()  # on disk: read off the reactor thread
                continue
            self._backlog, self._backlog_at = batch, 0
            self._upto = batch[-1].id if batch else self.cursor
            if not self._write_backlog():
                return  # held: the rest is written, then the cache asked again
            if len(batch) < _REPLAY_BATCH:
                # Nothing more matches in the store, in this very turn: caught up, go live.
                self.cursor = max(self.cursor, self.hub.last_id)
                self.replaying = False
                self._replayed()

    def _write_backlog(self) -> bool:
        """Write the backlog in chunks while the client takes them; whether all went."""
        backlog, i = self._backlog or (), self._backlog_at
        n = len(backlog)
        while i < n:
            if self._held:
                self._backlog_at = i
                return False
            j, size = i, 0
            while j < n and size < _CHUNK_BYTES:
                size += backlog[j].size
                j += 1
            self._write(backlog if i == 0 and j == n else backlog[i:j])
            i = j
        if self.closed:
            return False
        self._backlog, self._backlog_at = None, 0
        self.cursor = max(self.cursor, self._upto)  # what matched up to there is written
        return True

    def _read(self) -> None:
        d = maybeDeferred(self.hub.store.read_after, self.cursor, self.filter, _REPLAY_BATCH)
        self._reading = d  # before the callbacks: they may run at once
        d.addCallbacks(self._read_back, self._read_failed)

    def _read_back(self, page: Page) -> None:
        self._reading = None
        if self.closed:
            return  # gone while the read was out
        records = page.records
        oldest = self.hub.store.oldest_id
        if self.cursor + 1 < oldest:
            # Trimmed while the read was out: it may have found them gone.
            self.sink.reset("history no longer holds the events after that id", oldest)
            self.cursor = oldest - 1
        if records and records[0].id <= self.cursor:
            records = records[bisect.bisect_right(records, self.cursor, key=_id) :]
        self._backlog, self._backlog_at, self._upto = records, 0, max(page.upto, self.cursor)
        self._pump()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = None
        if self.closed:
            return
        last = self.cursor
        why = failure.getErrorMessage()
        _log.warn("a replay could not read the history: {why}", why=why)
        self.hub.unsubscribe(self)
        self.close()
        self.sink.overflow(
            f"the history could not be read ({why}); "
            f"reconnect with Last-Event-ID/after = {last} to resume",
            last,
        )


__all__ = ["DEFAULT_CLIENT_BUFFER", "History", "SharedFormat", "Sink", "Source", "Subscription"]
