"""
The slow-client policy in one place (hub.Subscription), deterministically:
buffering while paused, coalescing, overflow, replay that reads the store as
the client drains, and the max_rate gate on a Clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from trainstream.hub import Hub
from trainstream.store import Record
from trainstream.store.filter import Filter
from trainstream.store.memory import MemoryStore
from trainstream.subscription import Subscription


class FakeSink:
    """Records what a client would see; may pause its subscription on write."""

    def __init__(self) -> None:
        self.frames: list[list[tuple[int, int]]] = []  # [(id, coalesced)]
        self.records: list[Record] = []
        self.resets: list[tuple[str, int]] = []
        self.overflows: list[tuple[str, int]] = []
        self.subscription: Subscription | None = None
        self.pause_after_write = False

    def write(self, records: Sequence[Record], coalesced: Mapping[int, int]) -> None:
        self.frames.append([(r.id, coalesced.get(r.id, 0)) for r in records])
        self.records.extend(records)
        if self.pause_after_write and self.subscription is not None:
            self.subscription.pause()

    def reset(self, reason: str, oldest_id: int) -> None:
        self.resets.append((reason, oldest_id))

    def overflow(self, reason: str, last_id: int) -> None:
        self.overflows.append((reason, last_id))

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.records]


def metric(run: str, name: str, step: int) -> dict[str, object]:
    return {"type": "metric", "run": run, "name": name, "step": step, "value": 0.25, "time": 1.0}


def log(run: str, i: int) -> dict[str, object]:
    return {"type": "log", "run": run, "level": "info", "message": f"line {i:04d}", "time": 1.0}


class SubscriptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub = Hub(MemoryStore(10_000))
        self.sink = FakeSink()

    def subscribe(self, after: int | None = None, **kw: object) -> Subscription:
        sub = self.hub.subscribe(self.sink, Filter(), **kw)  # type: ignore[arg-type]
        self.sink.subscription = sub
        sub.start(after)
        return sub

    def test_live_in_order(self) -> None:
        self.subscribe()
        self.hub.accept([metric("r", "a", i) for i in range(5)])
        self.assertEqual(self.sink.ids, [1, 2, 3, 4, 5])

    def test_paused_buffers_then_drains(self) -> None:
        sub = self.subscribe()
        sub.pause()
        self.hub.accept([log("r", i) for i in range(3)])
        self.assertEqual(self.sink.ids, [])
        self.assertGreater(sub.buffered_bytes, 0)
        sub.resume()
        self.assertEqual(self.sink.ids, [1, 2, 3])
        self.assertEqual(sub.buffered_bytes, 0)

    def test_coalesces_metrics_past_the_bound(self) -> None:
        """Past the bound, only the latest value per (run, name) waits, with its count."""
        sub = self.subscribe(limit_bytes=2000)
        sub.pause()
        events = [metric("r", name, step) for step in range(50) for name in ("a", "b")]
        events.insert(10, log("r", 1))
        self.hub.accept(events)
        self.assertLessEqual(sub.buffered_bytes, 2000)
        sub.resume()
        delivered = [(r.type, r.name, r.event.get("step")) for r in self.sink.records]
        self.assertIn(("log", None, None), delivered)
        # The newest step of each series survived; the folded count adds up.
        last = {(r.name): r for r in self.sink.records if r.type == "metric"}
        self.assertEqual({n: r.event["step"] for n, r in last.items()}, {"a": 49, "b": 49})
        counts = dict(pair for frame in self.sink.frames for pair in frame)
        metric_ids = [r.id for r in self.sink.records if r.type == "metric"]
        self.assertEqual(sum(1 + counts.get(i, 0) for i in metric_ids), 100)
        self.assertEqual(self.sink.ids, sorted(self.sink.ids))
        self.assertEqual(self.hub.coalesced_total, 100 - len(metric_ids))

    def test_overflow_closes_with_resume_id(self) -> None:
        """Events that cannot be coalesced past the bound: closed, with the id to resume after."""
        sub = self.subscribe(limit_bytes=2000)
        self.hub.accept([log("r", 0)])
        sub.pause()
        self.hub.accept([log("r", i) for i in range(1, 100)])
        self.assertEqual(len(self.sink.overflows), 1)
        reason, last_id = self.sink.overflows[0]
        self.assertEqual(last_id, 1)
        self.assertIn("2000 bytes", reason)
        self.assertIn("resume", reason)
        self.assertTrue(sub.closed)
        self.assertEqual(self.hub.subscriber_count, 0)
        self.assertEqual(sub.buffered_bytes, 0)
        self.hub.accept([log("r", 100)])
        self.assertEqual(self.sink.ids, [1])

    def test_replay_reads_the_store_as_the_client_drains(self) -> None:
        """
        A replay far behind is read in pieces from the store, never buffered,
        while live events keep arriving: no gap, no duplicate.
        """
        self.hub.accept([log("r", i) for i in range(5000)])
        self.sink.pause_after_write = True
        sub = self.subscribe(after=10)
        self.assertTrue(sub.replaying)
        self.assertEqual(sub.buffered_bytes, 0)
        rounds = 0
        while sub.replaying and rounds < 10_000:
            self.hub.accept([log("live", rounds)])
            self.assertEqual(sub.buffered_bytes, 0)
            sub.resume()
            rounds += 1
        self.sink.pause_after_write = False
        sub.resume()
        self.hub.accept([log("live", -1)])
        self.assertEqual(self.sink.ids, list(range(11, self.hub.last_id + 1)))
        self.assertGreater(rounds, 3)  # it went in pieces

    def test_reset_when_history_is_gone(self) -> None:
        self.hub = Hub(MemoryStore(100))
        self.hub.accept([log("r", i) for i in range(300)])
        self.subscribe(after=5)
        self.assertEqual(self.sink.resets[0][1], 201)
        self.assertEqual(self.sink.ids, list(range(201, 301)))

    def test_id_from_another_history(self) -> None:
        self.hub.accept([log("r", i) for i in range(3)])
        self.subscribe(after=999)
        self.assertEqual(len(self.sink.resets), 1)
        self.assertIn("newer", self.sink.resets[0][0])
        self.assertEqual(self.sink.ids, [1, 2, 3])

    def test_max_rate_gates_frames(self) -> None:
        """max_rate 10: at most one frame per 0.1 s, each with all since the last."""
        clock = Clock()
        self.subscribe(clock=clock, min_interval=0.1)
        self.hub.accept([log("r", 0)])
        for i in range(1, 30):
            self.hub.accept([log("r", i)])
            clock.advance(0.01)
        self.assertEqual(len(self.sink.frames), 3)  # t=0, 0.1, 0.2 (t=0.29 now)
        clock.advance(0.1)
        self.assertEqual(len(self.sink.frames), 4)
        self.assertEqual(self.sink.ids, list(range(1, 31)))
        clock.advance(1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_filter_applies_to_live_and_replay(self) -> None:
        self.hub.accept([log("a", 1), log("b", 2)])
        sub = self.hub.subscribe(self.sink, Filter(runs=("a*",)))
        sub.start(0)
        self.hub.accept([log("b", 3), log("a", 4)])
        self.assertEqual([r.run for r in self.sink.records], ["a", "a"])
        self.assertFalse(sub.replaying)


class SubscriptionPropertyTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("publish"), st.integers(1, 40), st.booleans()),
                st.tuples(st.just("pause"), st.just(0), st.just(False)),
                st.tuples(st.just("resume"), st.just(0), st.just(False)),
            ),
            max_size=40,
        ),
        st.integers(0, 30),
        st.integers(600, 20_000),
    )
    def test_exactly_once_in_order(
        self, ops: list[tuple[str, int, bool]], after: int, limit: int
    ) -> None:
        """
        Whatever the interleaving of publishing, pausing and resuming, a client
        sees strictly increasing ids; unless it overflowed, every event after
        its resume id reaches it, each metric either itself or folded into a
        later value of its series that says so.
        """
        hub = Hub(MemoryStore(100_000))
        hub.accept([log("pre", i) for i in range(30)])
        sink = FakeSink()
        sub = hub.subscribe(sink, Filter(), limit_bytes=limit)
        sink.subscription = sub
        sub.start(after)
        step = 0
        for op, n, metrics in ops:
            if op == "publish":
                events = [
                    metric("r", f"m{i % 3}", step + i) if metrics else log("r", step + i)
                    for i in range(n)
                ]
                step += n
                hub.accept(events)
            elif op == "pause":
                sub.pause()
            else:
                sub.resume()
        sub.resume()
        ids = sink.ids
        self.assertEqual(ids, sorted(set(ids)))
        if sink.overflows:
            self.assertTrue(sub.closed)
            return
        counts = dict(pair for frame in sink.frames for pair in frame)
        covered = sum(1 + counts.get(i, 0) for i in ids)
        self.assertEqual(covered, hub.last_id - after)
        self.assertEqual(ids[-1] if ids else after, hub.last_id)
