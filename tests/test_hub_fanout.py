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


class PreparedBatchTests(SynchronousTestCase):
    """
    A large POST is checked and encoded in a thread (``hub.prepare``), then
    numbered in the reactor thread (``publish_checked``): its records must
    be the very ones ``publish`` makes inline.
    """

    def batch(self) -> list[dict[str, Any]]:
        return [
            {"type": "status", "run": "a", "state": "running"},  # the server's time
            {"type": "metric", "run": "a", "name": "loss", "step": 5, "value": 0.5, "time": 1.5},
            {"type": "metric", "run": "a", "name": "loss", "step": 2, "value": 1},  # a rewind
            {"type": "metric", "run": "a", "name": "loss", "step": 2, "value": 1, "rank": 3},
            {"type": "log", "run": "a", "level": "info", "message": 'caf\u00e9 "q"'},
            {"type": "metric", "run": "a", "name": "x", "step": 0, "value": "NaN", "time": 2},
            {"type": "hparams", "run": "a", "params": {"lr": 0.1, "opt": "adam"}},
        ]

    def test_the_same_records_either_way(self) -> None:
        from trainstream.hub import prepare

        inline, threaded = (Hub(MemoryStore(), now=lambda: 7.25) for _ in range(2))
        for hub in (inline, threaded):
            hub.publish([{"type": "log", "run": "a", "level": "info", "message": "first"}])
        answers = []
        answers.append(self.successResultOf(inline.publish(self.batch())))
        answers.append(
            self.successResultOf(threaded.publish_checked(prepare(threaded.check(self.batch()))))
        )
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0], (7, 2, 9))  # 8 records: the rewind status has an id too
        made = [list(hub.store.after(0, lambda r: True)) for hub in (inline, threaded)]
        self.assertEqual(  # (the events as keys and text: a NaN equals no NaN)
            [
                (r.id, r.type, r.run, r.name, list(r.event), r.json, r.size, r.segment)
                for r in made[0]
            ],
            [
                (r.id, r.type, r.run, r.name, list(r.event), r.json, r.size, r.segment)
                for r in made[1]
            ],
        )
        self.assertEqual(len(made[1]), 9)
        self.assertEqual([next(iter(r.event)) for r in made[1]], ["id"] * 9)
        self.assertEqual(inline.last_id, threaded.last_id)
