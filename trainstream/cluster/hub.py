"""
The Hub of a cluster member: the same one way in, numbered by Redis.

``accept`` and ``publish`` validate and assign segments here, as a single
server does, then hand the batch to the engine instead of numbering it:
ids come from the cluster's one counter, and the batch reaches this
server's store and subscribers only when the feed brings it back from
Redis, like every other server's batches (``ClusterEngine._take`` calls
``Hub._deliver``). Reads (replays, polls, series, the registries) are
served from the local store, the replica of the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred

from trainstream.cluster.engine import ClusterEngine, Spec
from trainstream.events import Limits, validate_events
from trainstream.hub import DEFAULT_LIMITS, Hub, rewind_status
from trainstream.store import Store
from trainstream.subscription import Subscription

#: Seconds a resume from an id this server has not reached yet waits for its
#: feed (the id may be the cluster's, just not delivered here yet).
RESUME_WAIT = 5.0


class ClusterHub(Hub):
    """A Hub whose ids come from the cluster (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        engine: ClusterEngine,
        limits: Limits = DEFAULT_LIMITS,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(store, limits, now)
        self.engine = engine
        engine.hub = self

    @property
    def epoch(self) -> str:
        """The cluster's epoch (Redis's): the same on every server."""
        return self.engine.epoch or self.store.epoch

    def _spec(self, events: Sequence[dict[str, object]]) -> tuple[Spec, int]:
        """
        The batch as (segment, event) in id order, rewind statuses in place
        (the rule of ``Hub._publish``); and how many of those come before the
        publisher's own first event.
        """
        segments = self.segments
        spec: Spec = []
        before = 0
        for e in events:
            segment = 0
            if e["type"] == "metric" and "rank" not in e:
                step = e["step"]
                assert isinstance(step, int)
                segment, announce = segments.assign(str(e["run"]), str(e["name"]), step)
                if announce:
                    if not spec:
                        before = 1
                    spec.append((0, rewind_status(e, step)))
            spec.append((segment, e))
        self.accepted_total += len(spec)
        return spec, before

    def _publish(
        self, events: Sequence[dict[str, object]], tails: Sequence[str | None] | None = None
    ) -> tuple[int, int, int]:
        """In-process publishers (``run.log``, the observers): queued while Redis is away."""
        if events:
            spec, _ = self._spec(events)
            self.engine.submit(spec, queue=True).addErrback(lambda _: None)  # said by the engine
        # Ids are Redis's, known only once it answers: publish() waits for them.
        return (len(events), 0, -1)

    def _accept_follow(self) -> None:
        """
        What observers return is published once per cluster: by the leader,
        and only for live events (not for history its feed catches up with,
        whose server-made events the leader of the time published).
        """
        if not (self.engine.leader and self.engine.live):
            self._follow.clear()
            return
        super()._accept_follow()

    def publish(self, items: object) -> Deferred[tuple[int, int, int]]:
        """
        Validate, then fire with ``(accepted, first_id, last_id)`` once Redis
        holds the batch and this server has delivered it; fail with
        ``ClusterUnavailableError`` (a ``StoreError``: 503) at once when Redis is away.
        """
        return self._submit(validate_events(items, self.limits, self._now))

    def publish_checked(
        self, prepared: Sequence[tuple[dict[str, object], str | None]]
    ) -> Deferred[tuple[int, int, int]]:
        """``publish`` of a large POST checked in a thread: Redis gives the ids."""
        events = [event for event, _ in prepared]
        for event in events:
            del event["id"]
        return self._submit(events)

    def _submit(self, events: list[dict[str, object]]) -> Deferred[tuple[int, int, int]]:
        if not events:
            first = self.engine.floor + 1
            d: Deferred[tuple[int, int, int]] = Deferred()
            d.callback((0, first, first - 1))
            return d
        spec, before = self._spec(events)
        n = len(spec)
        return self.engine.submit(spec, queue=False).addCallback(
            lambda first: (len(events), first + before, first + n - 1)
        )

    def sync(self) -> Deferred[None]:
        return self.engine.sync()


class ClusterSubscription(Subscription):
    """
    A subscription that, asked to resume from an id past this server's
    newest, first waits (at most ``RESUME_WAIT`` s) for the feed to reach
    it when the cluster has given that id: a client moving from a server
    that was ahead is no client of another history.
    """

    hub: ClusterHub

    def start(self, after: int | None) -> None:
        hub = self.hub
        if after is None or after <= hub.last_id:
            super().start(after)
            return
        self.replaying = True  # nothing live meanwhile: the replay reads it all
        engine = hub.engine

        def known(counter: int | None) -> Deferred[None] | None:
            if counter is not None and counter < after:
                return None  # not an id of this cluster: reset at once
            return engine.when_reached(after, RESUME_WAIT)

        engine.counter().addCallback(known).addBoth(lambda _: self._begin(after))

    def _begin(self, after: int) -> None:
        if self.closed:
            return
        self.replaying = False
        self.cursor = min(after, self.hub.last_id)
        super().start(after)
        if not self.replaying:
            self._replayed()


__all__ = ["RESUME_WAIT", "ClusterHub", "ClusterSubscription"]


ClusterHub.subscription_class = ClusterSubscription
