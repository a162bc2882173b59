"""
The hub's fan-out groups live subscriptions by filter: a batch is filtered
once per distinct filter, subscribers of a filter it has nothing for are not
touched, and every subscriber still gets exactly its events, in order.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_subscription import FakeSink, metric
from trainstream.hub import Hub
from trainstream.store.filter import Filter
from trainstream.store.memory import MemoryStore
from trainstream.subscription import Subscription


class CountingSubscription:
    """Counts the offers a subscription gets (wrapping its real ``offer``)."""

    def __init__(self, subscription: Subscription) -> None:
        self.offers = 0
        real = subscription.offer

        def offer(records: Any) -> None:
            self.offers += 1
            real(records)

        subscription.offer = offer  # type: ignore[method-assign]


class GroupedFanOutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub = Hub(MemoryStore(10_000))

    def subscribe(self, flt: Filter) -> tuple[FakeSink, Subscription]:
        sink = FakeSink()
        subscription = self.hub.subscribe(sink, flt)  # type: ignore[arg-type]
        sink.subscription = subscription
        subscription.start(None)
        return sink, subscription

    def test_idle_filters_are_not_offered_anything(self) -> None:
        idle = [self.subscribe(Filter(runs=("quiet",))) for _ in range(500)]
        counters = [CountingSubscription(sub) for _, sub in idle]
        busy, _ = self.subscribe(Filter(runs=("busy",)))
        everything, _ = self.subscribe(Filter())
        for step in range(20):
            self.hub.accept([metric("busy", "loss", step)])
        self.assertEqual(sum(c.offers for c in counters), 0)
        self.assertEqual(busy.ids, list(range(1, 21)))
        self.assertEqual(everything.ids, list(range(1, 21)))
        self.assertEqual([sink.ids for sink, _ in idle[:3]], [[], [], []])

    def test_interleaved_filters_each_get_theirs_in_order(self) -> None:
        sinks = {run: [self.subscribe(Filter(runs=(run,)))[0] for _ in range(3)] for run in "abc"}
        self.hub.accept([metric(run, "x", i) for i in range(4) for run in "abca"])
        for run, expected in (("a", [1, 4, 5, 8, 9, 12, 13, 16]), ("b", [2, 6, 10, 14])):
            for sink in sinks[run]:
                self.assertEqual(sink.ids, expected, run)

    def test_count_and_unsubscribe(self) -> None:
        subs = [self.subscribe(Filter(runs=(f"r{i % 3}",)))[1] for i in range(9)]
        self.assertEqual(self.hub.subscriber_count, 9)
        for sub in subs[:5]:
            self.hub.unsubscribe(sub)
        self.hub.unsubscribe(subs[0])  # twice: counted once
        self.assertEqual(self.hub.subscriber_count, 4)
        self.assertEqual(set(self.hub.subscriptions()), set(subs[5:]))
        for sub in subs[5:]:
            self.hub.unsubscribe(sub)
        self.assertEqual((self.hub.subscriber_count, self.hub.subscriptions()), (0, []))
