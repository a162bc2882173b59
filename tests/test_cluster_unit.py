"""
The cluster hub's own rules, without Redis: a resume from an id this server
has not reached yet, ids and rewinds of a published batch, stream entries
back to records. (tests/test_cluster.py runs the real thing.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trainstream.cluster.engine import Spec
from trainstream.cluster.hub import RESUME_WAIT, ClusterHub
from trainstream.cluster.wire import entry_record
from trainstream.events import encode_event
from trainstream.hub import make_record
from trainstream.store import Record
from trainstream.store.filter import Filter
from trainstream.store.memory import MemoryStore


class FakeSink:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.resets: list[tuple[str, int]] = []

    def write(self, records: Sequence[Record], coalesced: Mapping[int, int]) -> None:
        self.ids.extend(r.id for r in records)

    def reset(self, reason: str, oldest_id: int) -> None:
        self.resets.append((reason, oldest_id))

    def overflow(self, reason: str, last_id: int) -> None:
        raise AssertionError(reason)


class FakeEngine:
    """What ClusterHub asks of its engine; the feed is driven by hand."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.hub: ClusterHub | None = None
        self.leader = True
        self.live = True
        self.epoch = "cluster-epoch"
        self.cursor = 0
        self.count = 0
        self.floor = 0
        self.submitted: list[Spec] = []
        self.answers: list[Deferred[int]] = []
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def counter(self) -> Deferred[int | None]:
        return succeed(self.count)

    def when_reached(self, target: int, timeout: float | None) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.cursor >= target:
            d.callback(None)
            return d
        self._waiters.append((target, d))
        assert timeout is not None
        self.clock.callLater(timeout, lambda: d.called or d.callback(None))
        return d

    def submit(self, spec: Spec, queue: bool) -> Deferred[int]:
        self.submitted.append(spec)
        d: Deferred[int] = Deferred()
        self.answers.append(d)
        return d

    def feed(self, first: int, events: list[dict[str, object]]) -> None:
        """The stream brings ``events`` with ids from ``first``."""
        assert self.hub is not None
        records = [make_record(first + i, e) for i, e in enumerate(events)]
        self.hub.store.append(records).addCallback(self.hub._deliver)
        self.cursor = records[-1].id
        for target, d in list(self._waiters):
            if target <= self.cursor and not d.called:
                d.callback(None)


def log(i: int) -> dict[str, object]:
    return {"type": "log", "run": "r", "level": "info", "message": f"m{i}", "time": 1.0}


def metric(step: int) -> dict[str, object]:
    return {"type": "metric", "run": "r", "name": "loss", "step": step, "value": 1.0, "time": 1.0}


class ResumeAheadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = FakeEngine(self.clock)
        self.hub = ClusterHub(MemoryStore(), self.engine)  # type: ignore[arg-type]
        self.hub.open()
        self.engine.feed(1, [log(i) for i in range(3)])  # this server holds 1..3
        self.sink = FakeSink()

    def subscribe(self, after: int) -> None:
        self.hub.subscribe(self.sink, Filter(), clock=self.clock).start(after)

    def test_waits_for_the_feed(self) -> None:
        """An id the cluster gave but this server has not shown yet: wait, then resume."""
        self.engine.count = 8
        self.subscribe(5)
        self.assertEqual((self.sink.ids, self.sink.resets), ([], []))
        self.engine.feed(4, [log(i) for i in range(3, 8)])  # 4..8 arrive
        self.assertEqual(self.sink.ids, [6, 7, 8])
        self.assertEqual(self.sink.resets, [])
        self.engine.feed(9, [log(9)])
        self.assertEqual(self.sink.ids, [6, 7, 8, 9])  # live, once each

    def test_past_the_cluster_is_reset_at_once(self) -> None:
        """An id past the cluster's counter is another history's: reset, as alone."""
        self.engine.count = 3
        self.subscribe(50)
        self.assertEqual([oldest for _, oldest in self.sink.resets], [1])
        self.assertIn("newer", self.sink.resets[0][0])
        self.assertEqual(self.sink.ids, [1, 2, 3])

    def test_feed_too_slow_resets_after_the_wait(self) -> None:
        """The wait is bounded: past it, the client is reset (it then has it all)."""
        self.engine.count = 8
        self.subscribe(5)
        self.clock.advance(RESUME_WAIT - 0.1)
        self.assertEqual(self.sink.resets, [])
        self.clock.advance(0.2)
        self.assertEqual(len(self.sink.resets), 1)
        self.assertEqual(self.sink.ids, [1, 2, 3])


class PublishTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = FakeEngine(Clock())
        self.hub = ClusterHub(MemoryStore(), self.engine)  # type: ignore[arg-type]
        self.hub.open()

    def test_answer_names_the_publishers_events(self) -> None:
        """A rewind status the server adds before the batch is not the publisher's first id."""
        self.hub.segments.assign("r", "loss", 10)
        d = self.hub.publish([metric(3), metric(4)])
        spec = self.engine.submitted[0]
        self.assertEqual([e["type"] for _, e in spec], ["status", "metric", "metric"])
        self.assertEqual(spec[0][1]["rewind_to"], 3)
        self.assertEqual([s for s, _ in spec], [0, 1, 1])
        self.engine.answers[0].callback(41)  # Redis gave 41..43
        self.assertEqual(self.successResultOf(d), (2, 42, 43))

    def test_epoch_is_the_clusters(self) -> None:
        self.assertEqual(self.hub.epoch, "cluster-epoch")

    def test_server_made_events_only_from_the_leader(self) -> None:
        """What observers return is submitted by the leader only, for live events."""
        self.hub.observers.append(lambda records: [log(99)] if len(records) == 1 else None)
        self.engine.leader = False
        self.engine.feed(1, [log(0)])
        self.assertEqual(self.engine.submitted, [])
        self.engine.leader, self.engine.live = True, False  # catching up with history
        self.engine.feed(2, [log(1)])
        self.assertEqual(self.engine.submitted, [])
        self.engine.live = True
        self.engine.feed(3, [log(2)])
        self.assertEqual([[e["message"] for _, e in s] for s in self.engine.submitted], [["m99"]])

    def test_entries_become_the_same_records(self) -> None:
        """A stream entry decodes to the record the publishing server would make."""
        event: dict[str, Any] = metric(7)
        event["value"] = math.nan
        entry = ["12-0", ["s", "2", "e", encode_event(event), "o", "node1"]]
        record, origin = entry_record(entry)
        self.assertEqual(origin, "node1")
        self.assertEqual((record.id, record.segment), (12, 2))
        self.assertEqual(record.json, make_record(12, event, 2).json)
        self.assertTrue(math.isnan(record.event["value"]))  # type: ignore[arg-type]
