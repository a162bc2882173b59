"""
The cluster engine: one server's two connections to Redis, and what flows
over them (docs/cluster.md).

    publish   one Lua script per batch gives it ids from the one counter
              and XADDs it to the one stream, atomically (``scripts.PUBLISH``)
    feed      XREAD BLOCK tails that stream in id order; each batch is
              appended to this server's own store, and only once committed
              there delivered to its subscribers (``Hub._deliver``)
    tick      twice a second: the leader lease, the hello after a reconnect,
              batches queued while Redis was away

A ``DELETE /api/runs/{run}`` travels the same way, as a control entry
every server applies in its place in the stream (``submit_control``).

Every server, the publishing one included, shows an event only when its
feed brings it back: so all show the same events, ids and order, and none
shows what Redis does not hold.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from trainstream.cluster.scripts import HELLO, LEASE, PUBLISH
from trainstream.cluster.wire import (
    CONTROL,
    Connection,
    Keys,
    entry_fields,
    raise_floor,
    redis_text,
)
from trainstream.config import RedisURL
from trainstream.errors import StoreError
from trainstream.events import encode_event
from trainstream.hub import Segments, make_record
from trainstream.store import Record, Store

_log = Logger()

#: Entries one XREAD brings at most, and how long it blocks (ms).
FEED_BATCH = 1000
FEED_BLOCK_MS = 1000
#: Seconds an ack waits for this server's own feed to show the batch
#: (read-your-writes); then it is sent anyway: Redis holds the batch.
ACK_WAIT = 5.0
#: Events of in-process publishers (run.log, the leader's observers) kept
#: while Redis is away, at most; past that the oldest batch is dropped, said.
QUEUE_EVENTS = 100_000
LEASE_MS = 5000
TICK = 0.5

#: (segment, event without id) of one batch, in the order its ids go.
Spec = list[tuple[int, dict[str, object]]]


class Replica(Protocol):
    """What the engine needs of its hub (``ClusterHub``): the local store it feeds."""

    @property
    def store(self) -> Store: ...

    @property
    def segments(self) -> Segments: ...

    def _deliver(self, records: Sequence[Record]) -> None: ...


class ClusterUnavailableError(StoreError):
    """Redis cannot be reached: nothing of the batch was accepted; try again."""


class ClusterEngine(Service):
    """
    One server's part in a cluster: its publishes go to Redis, and Redis's
    stream comes back to its hub. Started after the history (it continues
    from the store's last id), stopped before it.
    """

    def __init__(
        self,
        url: RedisURL,
        prefix: str,
        maxlen: int,
        retention: float | None,
        reactor: Any,
    ) -> None:
        self.setName("cluster")  # type: ignore[no-untyped-call]
        self.url = url
        self.keys = Keys(prefix)
        self.maxlen = maxlen
        self.retention_ms = int(retention * 1000) if retention else 0
        self.reactor = reactor
        self.node = uuid.uuid4().hex[:12]
        self.hub: Replica | None = None
        #: The cluster's epoch (Redis's), once known.
        self.epoch: str | None = None
        self.leader = False
        #: The newest id this server appended from the feed (its store's last).
        self.cursor = 0
        self.highest = 0  # the newest id this server knows Redis gave out
        self.gaps = 0  # times the feed skipped ids (trimmed or lost in Redis)
        self.events_dropped = 0
        self._pub: Connection | None = None
        self._feed: Connection | None = None
        self._hello_for: object | None = None  # the connection the hello ran on
        self._pub_error: str | None = None
        self._feed_error: str | None = None
        self._feed_up = False
        self._waiters: list[tuple[int, int, Deferred[None], IDelayedCall | None]] = []
        self._order = itertools.count()
        self._tokens = itertools.count()
        self._queue: deque[tuple[Spec, str, Deferred[int]]] = deque()
        self._queued_events = 0
        self._sending = False
        self._pending: set[Deferred[int]] = set()
        self._tick: LoopingCall | None = None
        self._following: Deferred[None] | None = None
        #: Applies a control entry here (the server sets it: a cluster-wide DELETE).
        self.on_control: Callable[[dict[str, object]], Deferred[Any]] | None = None
        self._applied: dict[int, object] = {}
        # The cluster's last id when this server first said hello: what its
        # feed brings up to there is history it catches up with.
        self._history_end: int | None = None

    # Lifecycle

    def startService(self) -> None:
        assert self.hub is not None, "ClusterHub(store, engine) binds the engine"
        self._pub = Connection(self.url)  # raises ConfigError without txredisapi
        self._feed = Connection(self.url)
        super().startService()  # type: ignore[no-untyped-call]
        self.cursor = self.highest = self.hub.store.last_id
        self._tick = LoopingCall(self._on_tick)
        self._tick.clock = self.reactor
        self._tick.start(TICK, now=True)
        self._following = Deferred.fromCoroutine(self._follow())
        self._following.addErrback(lambda f: _log.failure("cluster feed ended", f))

    async def _stop(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._tick is not None and self._tick.running:
            self._tick.stop()
        if self.leader and self._pub is not None and self._pub.current is not None:
            try:  # hand the lease on at once rather than after it expires
                await self._pub.call("execute_command", "DEL", self.keys.leader)
            except Exception:
                pass
        self.leader = False
        for conn in (self._pub, self._feed):
            if conn is not None:
                await conn.disconnect()
        if self._following is not None:
            await self._following
        for _, _, d, call in self._waiters:
            if call is not None and call.active():
                call.cancel()
            d.callback(None)
        self._waiters = []
        while self._queue:
            _, _, queued = self._queue.popleft()
            queued.errback(ClusterUnavailableError(self._unreachable("the server stopped")))

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    # What the hub and health ask

    @property
    def ready(self) -> bool:
        """Publishing works now: connected, and the hello ran on this connection."""
        current = self._pub.current if self._pub is not None else None
        return current is not None and current is self._hello_for

    def problems(self) -> tuple[str, ...]:
        if not self.running:
            return ()
        if self.ready and self._feed_up:
            return ()
        why = self._pub_error or self._feed_error or "not connected"
        return (self._unreachable(why),)

    def describe(self) -> dict[str, object]:
        """What ``/api/health`` shows of the cluster (cheap: no I/O)."""
        return {
            "redis": self.url.address,
            "connected": self.ready and self._feed_up,
            "node": self.node,
            "leader": self.leader,
            "feed_last_id": self.cursor,
            "highest_id": self.highest,
            "gaps": self.gaps,
            "queued_events": self._queued_events,
            "events_dropped": self.events_dropped,
        }

    def _unreachable(self, why: str) -> str:
        return (
            f"cluster: Redis at {self.url.address} unreachable ({why}); this server serves "
            "what it holds and refuses publishes until Redis is back"
        )

    @property
    def live(self) -> bool:
        """The feed is past the history that was there when this server joined."""
        return self._history_end is not None and self.cursor >= self._history_end

    @property
    def floor(self) -> int:
        """No id at or below this is ever given again (what this server has seen)."""
        return max(self.cursor, self.highest)

    # Publishing

    def submit(self, spec: Spec, queue: bool) -> Deferred[int]:
        """
        Give ``spec`` ids and add it to the stream; fires with its first id
        once Redis holds it and (at most ``ACK_WAIT`` s) this server's feed
        has delivered it. ``queue``: keep it while Redis is away and retry
        (in-process publishers); else fail at once with ``ClusterUnavailableError``.
        """
        d: Deferred[int] = Deferred()
        self._pending.add(d)
        d.addBoth(self._settled, d)
        if queue:
            self._enqueue(spec, d)
        elif not self.ready:
            d.errback(
                ClusterUnavailableError(self._unreachable(self._pub_error or "not connected"))
            )
        else:
            self._send(spec, "").addCallback(self._shown, len(spec)).chainDeferred(d)
        return d

    def _shown(self, first: int, n: int) -> Deferred[int]:
        """``first`` once this server's feed has delivered the batch (read-your-writes)."""
        return self.when_reached(first + n - 1, ACK_WAIT).addCallback(lambda _: first)

    def _settled(self, result: object, d: Deferred[int]) -> object:
        self._pending.discard(d)
        return result

    def sync(self) -> Deferred[None]:
        """Fires once everything submitted so far is in Redis; fails if it is away."""
        pending = list(self._pending)
        if not pending:
            return succeed(None)
        if not self.ready:
            return Deferred.fromCoroutine(self._fail_unreachable())
        waited: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        return waited.addCallback(self._synced)

    async def _fail_unreachable(self) -> None:
        raise ClusterUnavailableError(self._unreachable(self._pub_error or "not connected"))

    def _synced(self, results: list[tuple[bool, object]]) -> None:
        for ok, value in results:
            if not ok:
                raise ClusterUnavailableError(
                    self._unreachable(str(getattr(value, "value", value)))
                )

    def _enqueue(self, spec: Spec, d: Deferred[int]) -> None:
        token = f"{self.node}:{next(self._tokens)}"
        self._queue.append((spec, token, d))
        self._queued_events += len(spec)
        while self._queued_events > QUEUE_EVENTS and len(self._queue) > 1:
            dropped, _, lost = self._queue.popleft()
            self._queued_events -= len(dropped)
            self.events_dropped += len(dropped)
            _log.error(
                "cluster: {n} events dropped: Redis at {where} is away and more than "
                "{limit} events waited for it",
                n=len(dropped),
                where=self.url.address,
                limit=QUEUE_EVENTS,
            )
            lost.errback(ClusterUnavailableError(self._unreachable("queue full")))
        self._pump()

    def _pump(self) -> None:
        """Send queued batches one at a time, in order (a retry keeps its token)."""
        if self._sending or not self._queue or not self.ready:
            return
        spec, token, d = self._queue[0]
        self._sending = True

        def sent(first: int) -> None:
            self._sending = False
            if self._queue and self._queue[0][2] is d:
                self._queue.popleft()
                self._queued_events -= len(spec)
            self._shown(first, len(spec)).chainDeferred(d)
            self._pump()  # the next batch goes now, not once this one is shown

        def failed(failure: Any) -> None:
            self._sending = False  # kept at the head: the tick retries it, same token

        self._send(spec, token).addCallbacks(sent, failed)

    def _send(self, spec: Spec, token: str) -> Deferred[int]:
        assert self._pub is not None
        args: list[object] = [
            self.floor,
            self.maxlen,
            self.retention_ms,
            uuid.uuid4().hex,
            self.node,
            token,
            len(spec),
        ]
        for segment, event in spec:
            args.append(segment)
            args.append(encode_event(event))
        keys = [
            self.keys.counter,
            self.keys.stream,
            self.keys.epoch,
            self.keys.times,
            self.keys.batch(token),
        ]
        d: Deferred[Any] = self._pub.call("eval", PUBLISH, keys, args)
        return d.addCallbacks(self._published, self._publish_failed, callbackArgs=(len(spec),))

    def _published(self, reply: Sequence[Any], n: int) -> int:
        first = int(reply[0])
        self._note_epoch(redis_text(reply[1]))
        last = first + n - 1
        self.highest = max(self.highest, last)
        self._pub_error = None
        return first

    def _publish_failed(self, failure: Any) -> Any:
        why = failure.getErrorMessage()
        self._pub_error = why
        if failure.check(StoreError):
            return failure
        raise ClusterUnavailableError(self._unreachable(why))

    def _note_epoch(self, epoch: str) -> None:
        if self.epoch is not None and epoch != self.epoch:
            _log.warn(
                "cluster: Redis at {where} lost its history (epoch {old} -> {new}); "
                "ids go on from {floor}",
                where=self.url.address,
                old=self.epoch,
                new=epoch,
                floor=self.floor,
            )
        self.epoch = epoch

    # Waiting for the feed

    def when_reached(self, target: int, timeout: float | None) -> Deferred[None]:
        """Fires once the feed has delivered ``target`` (or after ``timeout`` s, or at stop)."""
        if self.cursor >= target or not self.running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        call = None
        if timeout is not None:
            call = self.reactor.callLater(timeout, self._expire, d)
        heapq.heappush(self._waiters, (target, next(self._order), d, call))
        return d

    def _expire(self, d: Deferred[None]) -> None:
        self._waiters = [w for w in self._waiters if w[2] is not d]
        heapq.heapify(self._waiters)
        d.callback(None)

    def _reached(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.cursor:
            _, _, d, call = heapq.heappop(self._waiters)
            if call is not None and call.active():
                call.cancel()
            d.callback(None)

    def counter(self) -> Deferred[int | None]:
        """The cluster's newest id as Redis has it, or ``None`` if it cannot say now."""
        if not self.ready:
            return succeed(None)
        assert self._pub is not None
        d: Deferred[Any] = self._pub.call("execute_command", "GET", self.keys.counter)
        return d.addCallbacks(lambda v: int(redis_text(v)) if v else 0, lambda _: None)

    # The feed

    async def _follow(self) -> None:
        """Tail the stream in id order, for as long as the service runs."""
        assert self._feed is not None
        while self.running:
            if self._feed.current is None:
                self._feed_up = False
                await deferLater(self.reactor, 0.1, lambda: None)
                continue
            try:
                reply = await self._feed.call(
                    "execute_command",
                    "XREAD",
                    "COUNT",
                    FEED_BATCH,
                    "BLOCK",
                    FEED_BLOCK_MS,
                    "STREAMS",
                    self.keys.stream,
                    f"{self.cursor}-0",
                )
            except Exception as e:
                self._feed_up = False
                self._feed_error = str(e) or type(e).__name__
                if self.running:
                    await deferLater(self.reactor, 0.2, lambda: None)
                continue
            self._feed_up = True
            self._feed_error = None
            if reply:
                try:
                    await self._take(reply[0][1])
                except Exception:
                    # Said, and the feed goes on: one bad batch must not
                    # stop this server from following the cluster.
                    _log.failure("cluster: a batch from the stream could not be delivered")

    async def _take(self, entries: Sequence[Any]) -> None:
        """Show a batch of stream entries, in id order; apply controls in their place."""
        hub = self.hub
        assert hub is not None
        records: list[Record] = []
        foreign: list[Record] = []
        expected = self.cursor + 1
        for entry in entries:
            event_id, segment, body, origin = entry_fields(entry)
            if event_id < expected:
                continue  # another epoch's id this server has already
            if event_id > expected:
                # Ids this server never got: trimmed from the stream before
                # it read them (it joined late, or was away longer than the
                # retention), or lost by Redis. A resume from before is reset.
                self.gaps += 1
                raise_floor(hub.store, event_id)
            expected = event_id + 1
            if segment == CONTROL:
                await self._show(records, foreign)
                records, foreign = [], []
                await self._apply(event_id, body, origin)
                continue
            record = make_record(event_id, body, segment)
            records.append(record)
            if origin != self.node:
                foreign.append(record)
        await self._show(records, foreign)

    async def _show(self, records: list[Record], foreign: list[Record]) -> None:
        """Append to the local store; once committed, to every subscriber."""
        if not records:
            return
        hub = self.hub
        assert hub is not None
        segments = hub.segments
        for r in foreign:
            if r.type == "metric" and r.name is not None and "rank" not in r.event:
                step = r.event["step"]
                assert isinstance(step, int)
                segments.note(r.run, r.name, r.segment, step)
        self.highest = max(self.highest, records[-1].id)
        kept = await hub.store.append(records)
        self.cursor = records[-1].id
        hub._deliver(kept)
        self._reached()

    async def _apply(self, control_id: int, control: dict[str, object], origin: str) -> None:
        """A control entry (``scripts.PUBLISH`` with segment ``CONTROL``), on this server."""
        result: object = None
        if self.on_control is not None:
            try:
                result = await self.on_control(control)
            except Exception as e:
                _log.error("cluster: control {c} failed here: {e}", c=control, e=e)
        if origin == self.node:
            self._applied[control_id] = result
        self.highest = max(self.highest, control_id)
        self.cursor = control_id
        self._reached()

    def submit_control(self, control: dict[str, object]) -> Deferred[object]:
        """
        Publish ``control`` for every server to apply in stream order; fires
        with what applying it here returned, once it has been (refused at once
        while Redis is away, like any publish).
        """
        d = self.submit([(CONTROL, control)], queue=False)
        return d.addCallback(lambda first: self._applied.pop(first, None))

    # The tick: hello, lease, queued batches

    def _on_tick(self) -> Deferred[None] | None:
        if self._pub is None:
            return None
        current = self._pub.current
        if current is None:
            self.leader = False
            return None
        if current is not self._hello_for:
            return self._hello(current)
        self._pump()
        return self._lease()

    def _hello(self, current: object) -> Deferred[None]:
        assert self._pub is not None
        d: Deferred[Any] = self._pub.call(
            "eval",
            HELLO,
            [self.keys.counter, self.keys.epoch],
            [self.floor, uuid.uuid4().hex],
        )

        def done(reply: Sequence[Any]) -> None:
            if self._history_end is None:
                self._history_end = int(reply[0])
            self.highest = max(self.highest, int(reply[0]))
            self._note_epoch(redis_text(reply[1]))
            self._hello_for = current
            self._pub_error = None
            _log.info(
                "cluster: connected to Redis at {where} (epoch {epoch}, last id {last})",
                where=self.url.address,
                epoch=self.epoch,
                last=reply[0],
            )
            self._pump()

        def failed(failure: Any) -> None:
            self._pub_error = failure.getErrorMessage()

        return d.addCallbacks(done, failed)

    def _lease(self) -> Deferred[None]:
        assert self._pub is not None
        d: Deferred[Any] = self._pub.call("eval", LEASE, [self.keys.leader], [self.node, LEASE_MS])

        def held(reply: object) -> None:
            was, self.leader = self.leader, bool(int(str(reply)))
            if self.leader and not was:
                _log.info("cluster: this server leads (publishes server-made events)")

        def failed(failure: Any) -> None:
            self.leader = False

        return d.addCallbacks(held, failed)


__all__ = ["ClusterEngine", "ClusterUnavailableError", "Keys"]
