"""
What happens when a client is slow, in one place: one subscriber's filter,
buffer, coalescing, overflow and replay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from trainstream.config import DEFAULT_CLIENT_BUFFER
from trainstream.store import Record, Store
from trainstream.store.filter import Filter


class Source(Protocol):
    """What a subscription needs of the hub that feeds it."""

    store: Store
    coalesced_total: int
    overflows: int

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
    id) is read from the store in batches as the client drains, never
    buffered, so a client far behind costs no memory; live events that
    arrive meanwhile are in the store too, so nothing is missed or doubled.
    ``min_interval`` (WebSocket ``max_rate``) holds writes back the same way.
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
            batch = store.after(self.cursor, self.filter, _REPLAY_BATCH)
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


__all__ = ["DEFAULT_CLIENT_BUFFER", "SharedFormat", "Sink", "Source", "Subscription"]
